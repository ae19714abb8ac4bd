//! The client half of a SOCKS5 CONNECT (RFC 1928), without authentication: enough to reach an MX through an egress
//! proxy and to learn which source address the proxy used, which its reply names (BND.ADDR).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 1;
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// Why the proxy did not open the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    #[error("the proxy does not speak SOCKS5 (version byte {0})")]
    NotSocks5(u8),
    #[error("the proxy requires authentication")]
    AuthenticationRequired,
    #[error("the proxy chose an authentication method it was not offered ({0})")]
    UnexpectedMethod(u8),
    #[error("the proxy refused the connection: {}", refusal(*.0))]
    Refused(u8),
    #[error("the proxy's reply names an address of unknown type {0}")]
    UnknownAddressType(u8),
    #[error("the proxy's reply names a host name, not the address it sent from")]
    NamedSource,
    #[error("connection to the proxy lost: {0}")]
    Io(String),
}

impl From<std::io::Error> for Socks5Error {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err.kind().to_string())
    }
}

/// Asks the proxy on `stream` to connect to `target`; returns the address the proxy's connection leaves from. On
/// success `stream` carries the connection to `target`.
pub async fn connect<S>(stream: &mut S, target: SocketAddr) -> Result<SocketAddr, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&[VERSION, 1, NO_AUTHENTICATION]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    match choice {
        [VERSION, NO_AUTHENTICATION] => {}
        [VERSION, NO_ACCEPTABLE_METHOD] => return Err(Socks5Error::AuthenticationRequired),
        [VERSION, method] => return Err(Socks5Error::UnexpectedMethod(method)),
        [version, _] => return Err(Socks5Error::NotSocks5(version)),
    }
    stream.write_all(&connect_request(target)).await?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let [version, reply, _reserved, address_type] = head;
    if version != VERSION {
        return Err(Socks5Error::NotSocks5(version));
    }
    if reply != 0 {
        return Err(Socks5Error::Refused(reply));
    }
    let ip = match address_type {
        ATYP_IPV4 => {
            let mut octets = [0u8; 4];
            stream.read_exact(&mut octets).await?;
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        ATYP_IPV6 => {
            let mut octets = [0u8; 16];
            stream.read_exact(&mut octets).await?;
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        ATYP_DOMAIN => return Err(Socks5Error::NamedSource),
        other => return Err(Socks5Error::UnknownAddressType(other)),
    };
    let port = stream.read_u16().await?;
    Ok(SocketAddr::new(ip, port))
}

fn connect_request(target: SocketAddr) -> Vec<u8> {
    let mut request = vec![VERSION, CONNECT, 0];
    match target.ip() {
        IpAddr::V4(ip) => {
            request.push(ATYP_IPV4);
            request.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            request.push(ATYP_IPV6);
            request.extend_from_slice(&ip.octets());
        }
    }
    request.extend_from_slice(&target.port().to_be_bytes());
    request
}

/// RFC 1928's meaning of a reply code.
fn refusal(code: u8) -> String {
    let meaning = match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned reply code",
    };
    format!("{meaning} (reply {code})")
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    /// Plays the proxy's side of one exchange: answers `answer` and returns what the client sent.
    async fn exchange(answer: Vec<u8>, target: SocketAddr) -> (Result<SocketAddr, Socks5Error>, Vec<u8>) {
        let (mut client, mut proxy) = duplex(1024);
        let proxy = tokio::spawn(async move {
            proxy.write_all(&answer).await.unwrap();
            // Nothing more comes from the proxy: a client waiting for more reads end of file.
            proxy.shutdown().await.unwrap();
            let mut heard = Vec::new();
            // The client stops writing when it returns; dropping it ends this read.
            let _ = proxy.read_to_end(&mut heard).await;
            heard
        });
        let result = connect(&mut client, target).await;
        drop(client);
        (result, proxy.await.unwrap())
    }

    #[tokio::test]
    async fn returns_the_source_address_the_proxy_reports() {
        let target: SocketAddr = "192.0.2.25:25".parse().unwrap();
        let answer = [&[5, 0][..], &[5, 0, 0, 1, 198, 51, 100, 21, 0x9c, 0x40]].concat();
        let (result, heard) = exchange(answer, target).await;
        assert_eq!(result, Ok("198.51.100.21:40000".parse().unwrap()));
        assert_eq!(heard, [&[5, 1, 0][..], &[5, 1, 0, 1, 192, 0, 2, 25, 0, 25]].concat());

        let target: SocketAddr = "[2001:db8::25]:25".parse().unwrap();
        let mut answer = vec![5, 0, 5, 0, 0, 4];
        answer.extend_from_slice(&"2001:db8:100::21".parse::<Ipv6Addr>().unwrap().octets());
        answer.extend_from_slice(&[0, 1]);
        let (result, heard) = exchange(answer, target).await;
        assert_eq!(result, Ok("[2001:db8:100::21]:1".parse().unwrap()));
        assert_eq!(&heard[3..7], &[5, 1, 0, 4]);
    }

    #[tokio::test]
    async fn every_refusal_is_named() {
        let target: SocketAddr = "192.0.2.25:25".parse().unwrap();
        let cases: [(Vec<u8>, Socks5Error); 6] = [
            (vec![5, 0xff], Socks5Error::AuthenticationRequired),
            (vec![4, 0], Socks5Error::NotSocks5(4)),
            (vec![5, 2], Socks5Error::UnexpectedMethod(2)),
            (vec![5, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0], Socks5Error::Refused(2)),
            (vec![5, 0, 5, 0, 0, 3, 4], Socks5Error::NamedSource),
            (vec![5, 0, 5, 0, 0, 9], Socks5Error::UnknownAddressType(9)),
        ];
        for (answer, expected) in cases {
            assert_eq!(exchange(answer, target).await.0, Err(expected));
        }
        assert_eq!(
            Socks5Error::Refused(2).to_string(),
            "the proxy refused the connection: connection not allowed by ruleset (reply 2)"
        );
        let (result, _) = exchange(vec![5, 0, 5, 0], target).await;
        assert!(matches!(result, Err(Socks5Error::Io(_))), "{result:?}");
    }
}
