//! The socketmap wire format (Postfix socketmap_table(5)): every request and reply is one netstring,
//! `<decimal length>:<bytes>,`, and a request's bytes are `<map name> <key>`. Pure functions over byte slices, so
//! the framing can be fuzzed and property-tested without a socket.

/// Largest request accepted: a map name and a domain name (at most 253 bytes) fit with room to spare. Anything
/// longer is not a TLS policy lookup, and refusing it before reading it bounds what a client can make us buffer.
pub const MAX_REQUEST_BYTES: usize = 1024;

/// Why the bytes from a client are not a netstring. The stream cannot be resynchronised after any of these, so
/// the connection is answered once and closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("netstring length must be decimal digits followed by ':', found byte 0x{0:02x}")]
    BadLength(u8),
    #[error("netstring has no length before ':'")]
    EmptyLength,
    #[error("netstring length has a leading zero")]
    LeadingZero,
    #[error("request of {length} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes")]
    TooLong { length: u64 },
    #[error("netstring of {length} bytes is not followed by ',' (found byte 0x{found:02x})")]
    MissingComma { length: usize, found: u8 },
}

/// Why a well-framed request is not `<map name> <key>`. The stream is still in step: the client gets a PERM
/// reply and may go on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("request is not UTF-8 text")]
    NotUtf8,
    #[error("request must be \"<map name> <key>\" with a space between two non-empty words")]
    NotNameAndKey,
    #[error("request contains control characters")]
    ControlCharacters,
}

/// One lookup: the map name Postfix was configured with (the last field of `socketmap:inet:host:port:name`)
/// and the key, here a next-hop destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub name: &'a str,
    pub key: &'a str,
}

/// The first netstring of `buf`: `Ok(None)` while more bytes are needed, else its payload and the number of
/// bytes it took. Refuses an over-long length as soon as its digits show it, without waiting for the payload,
/// and leading zeros (which would let a length's digits go on for ever).
pub fn decode(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    let digits = buf.iter().take_while(|b| b.is_ascii_digit()).count();
    let length = buf[..digits]
        .iter()
        .fold(0u64, |n, d| n.saturating_mul(10).saturating_add(u64::from(d - b'0')));
    if digits > 1 && buf[0] == b'0' {
        return Err(FrameError::LeadingZero);
    }
    let Some(length) = usize::try_from(length).ok().filter(|l| *l <= MAX_REQUEST_BYTES) else {
        return Err(FrameError::TooLong { length });
    };
    match buf.get(digits) {
        None => Ok(None),
        Some(b':') if digits == 0 => Err(FrameError::EmptyLength),
        Some(b':') => {
            let start = digits + 1;
            let end = start + length;
            match buf.get(end) {
                None => Ok(None),
                Some(b',') => Ok(Some((&buf[start..end], end + 1))),
                Some(&found) => Err(FrameError::MissingComma { length, found }),
            }
        }
        Some(&other) => Err(FrameError::BadLength(other)),
    }
}

/// `payload` as a netstring.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(payload);
    out.push(b',');
    out
}

/// Splits a request payload into map name and key at the first space.
pub fn parse_request(payload: &[u8]) -> Result<Request<'_>, RequestError> {
    let text = std::str::from_utf8(payload).map_err(|_| RequestError::NotUtf8)?;
    if text.chars().any(char::is_control) {
        return Err(RequestError::ControlCharacters);
    }
    match text.split_once(' ') {
        Some((name, key)) if !name.is_empty() && !key.is_empty() => Ok(Request { name, key }),
        _ => Err(RequestError::NotNameAndKey),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_complete_netstrings_and_reports_their_size() {
        assert_eq!(
            decode(b"19:postfix example.org,"),
            Ok(Some((&b"postfix example.org"[..], 23)))
        );
        assert_eq!(decode(b"0:,rest"), Ok(Some((&b""[..], 3))));
        // Postfix sends one request at a time, but bytes of the next one may already be buffered.
        assert_eq!(decode(b"3:abc,4:"), Ok(Some((&b"abc"[..], 6))));
    }

    #[test]
    fn asks_for_more_bytes_until_the_comma() {
        for partial in [&b""[..], b"1", b"19", b"19:", b"19:postfix", b"19:postfix example.org"] {
            assert_eq!(decode(partial), Ok(None), "{:?}", String::from_utf8_lossy(partial));
        }
    }

    #[test]
    fn refuses_broken_framing_by_name() {
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(FrameError::BadLength(b'G')));
        assert_eq!(decode(b":abc,"), Err(FrameError::EmptyLength));
        assert_eq!(decode(b"-1:"), Err(FrameError::BadLength(b'-')));
        assert_eq!(decode(b"00"), Err(FrameError::LeadingZero));
        assert_eq!(decode(b"05:hello,"), Err(FrameError::LeadingZero));
        assert_eq!(
            decode(b"3:abcd"),
            Err(FrameError::MissingComma { length: 3, found: b'd' })
        );
    }

    #[test]
    fn refuses_an_oversized_length_before_its_payload_arrives() {
        assert_eq!(decode(b"1025"), Err(FrameError::TooLong { length: 1025 }));
        assert_eq!(
            decode(b"99999999999999999999999999"),
            Err(FrameError::TooLong { length: u64::MAX })
        );
        let largest = encode(&[b'a'; MAX_REQUEST_BYTES]);
        assert_eq!(
            decode(&largest).map(|f| f.map(|(p, _)| p.len())),
            Ok(Some(MAX_REQUEST_BYTES))
        );
    }

    #[test]
    fn encodes_as_postfix_expects() {
        assert_eq!(encode(b"NOTFOUND "), b"9:NOTFOUND ,");
        assert_eq!(encode(b""), b"0:,");
    }

    #[test]
    fn parses_name_and_key() {
        assert_eq!(
            parse_request(b"postfix example.org"),
            Ok(Request {
                name: "postfix",
                key: "example.org"
            })
        );
        // Only the first space separates; what follows is the key as sent.
        assert_eq!(parse_request(b"postfix a b").map(|r| r.key), Ok("a b"));
        for bad in [&b"postfix"[..], b" example.org", b"postfix ", b""] {
            assert_eq!(parse_request(bad), Err(RequestError::NotNameAndKey), "{bad:?}");
        }
        assert_eq!(parse_request(b"postfix \xff.org"), Err(RequestError::NotUtf8));
        assert_eq!(parse_request(b"postfix a\r\nb"), Err(RequestError::ControlCharacters));
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            #[test]
            fn every_payload_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..=MAX_REQUEST_BYTES)) {
                let wire = encode(&payload);
                prop_assert_eq!(decode(&wire), Ok(Some((&payload[..], wire.len()))));
            }

            #[test]
            fn a_prefix_never_decodes_to_something_else(payload in proptest::collection::vec(any::<u8>(), 0..64),
                                                        cut in 0usize..80) {
                let wire = encode(&payload);
                let cut = cut.min(wire.len() - 1);
                prop_assert_eq!(decode(&wire[..cut]), Ok(None));
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_stay_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                if let Ok(Some((payload, consumed))) = decode(&bytes) {
                    prop_assert!(consumed <= bytes.len());
                    prop_assert!(payload.len() <= MAX_REQUEST_BYTES);
                    let _ = parse_request(payload);
                }
            }
        }
    }
}
