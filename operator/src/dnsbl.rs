//! DNS blocklist watch: every pool address is looked up in each zone of `spec.ipPool.dnsbl` at the tenant's
//! interval. A listing is a condition (`IpListed`, naming address and zone), an event and a severe signal for the
//! warmup loop; a lookup that fails is Unknown, never "not listed".

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use jiff::{SignedDuration, Timestamp};
use securemail_api::tenant::DnsblSpec;

/// Longest wait for one lookup; a blocklist that does not answer in time is Unknown until the next check.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// What one zone says about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Listed, with the zone's return code (127.0.0.x says which of its lists).
    Listed(Ipv4Addr),
    NotListed,
    /// The zone could not be asked or gave an answer that is not a verdict.
    Unknown(String),
}

/// One address's verdicts, by zone.
pub type Verdicts = BTreeMap<String, Verdict>;

/// Looks up addresses in blocklist zones, remembering each verdict for the tenant's interval.
pub struct DnsblWatch {
    resolver: TokioResolver,
    checked: Mutex<HashMap<(IpAddr, String), (Timestamp, Verdict)>>,
}

impl std::fmt::Debug for DnsblWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsblWatch").finish_non_exhaustive()
    }
}

impl DnsblWatch {
    /// Asks `nameserver`, or the resolvers of /etc/resolv.conf when `None`. Blocklists refuse queries from large
    /// public resolvers, so production wants the cluster's own recursive resolver.
    pub fn new(nameserver: Option<SocketAddr>) -> Result<Self, String> {
        let (config, mut options) = match nameserver {
            Some(address) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = address.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = address.port();
                let server = NameServerConfig::new(address.ip(), true, vec![udp, tcp]);
                (
                    ResolverConfig::from_parts(None, vec![], vec![server]),
                    ResolverOpts::default(),
                )
            }
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(|err| format!("cannot read /etc/resolv.conf for DNSBL lookups: {err}"))?,
        };
        options.timeout = LOOKUP_TIMEOUT;
        options.attempts = 1;
        options.ndots = 0;
        options.use_hosts_file = ResolveHosts::Never;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .map_err(|err| format!("cannot build the DNSBL resolver: {err}"))?;
        Ok(Self {
            resolver,
            checked: Mutex::new(HashMap::new()),
        })
    }

    /// Verdicts for each of `addresses` in each zone of `spec`: remembered ones younger than the interval, fresh
    /// lookups (concurrently) for the rest.
    pub async fn check(&self, addresses: &[IpAddr], spec: &DnsblSpec, now: Timestamp) -> BTreeMap<IpAddr, Verdicts> {
        let interval = SignedDuration::from_mins(i64::from(spec.interval_minutes));
        let pairs: Vec<(IpAddr, &String)> = addresses
            .iter()
            .flat_map(|address| spec.zones.iter().map(move |zone| (*address, zone)))
            .collect();
        let remembered: Vec<Option<Verdict>> = {
            let checked = self.lock();
            pairs
                .iter()
                .map(|(address, zone)| {
                    checked
                        .get(&(*address, (*zone).clone()))
                        .filter(|(at, _)| now.duration_since(*at) < interval)
                        .map(|(_, verdict)| verdict.clone())
                })
                .collect()
        };
        let lookups = pairs
            .iter()
            .zip(&remembered)
            .map(|((address, zone), remembered)| async move {
                match remembered {
                    Some(verdict) => (verdict.clone(), false),
                    None => (self.look_up(*address, zone).await, true),
                }
            });
        let verdicts = futures::future::join_all(lookups).await;
        let mut checked = self.lock();
        let mut result: BTreeMap<IpAddr, Verdicts> = BTreeMap::new();
        for ((address, zone), (verdict, fresh)) in pairs.into_iter().zip(verdicts) {
            if fresh {
                checked.insert((address, zone.clone()), (now, verdict.clone()));
            }
            result.entry(address).or_default().insert(zone.clone(), verdict);
        }
        result
    }

    async fn look_up(&self, address: IpAddr, zone: &str) -> Verdict {
        let Ok(name) = Name::from_ascii(query_name(address, zone)) else {
            return Verdict::Unknown(format!("{zone} does not form a valid DNS name with {address}"));
        };
        let answer = match self.resolver.lookup(name, RecordType::A).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|record| match &record.data {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect()),
            Err(NetError::Dns(DnsError::NoRecordsFound(no_records)))
                if matches!(no_records.response_code, ResponseCode::NXDomain | ResponseCode::NoError) =>
            {
                Ok(Vec::new())
            }
            Err(NetError::Timeout) => Err("timed out".to_owned()),
            Err(err) => Err(err.to_string()),
        };
        classify(answer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(IpAddr, String), (Timestamp, Verdict)>> {
        self.checked.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The name a blocklist answers for `address`: IPv4 octets or IPv6 nibbles reversed, then the zone.
pub fn query_name(address: IpAddr, zone: &str) -> String {
    let reversed = match address {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}")
        }
        IpAddr::V6(v6) => v6
            .octets()
            .iter()
            .rev()
            .flat_map(|byte| [byte & 0x0f, byte >> 4])
            .map(|nibble| format!("{nibble:x}"))
            .collect::<Vec<_>>()
            .join("."),
    };
    format!("{reversed}.{}.", zone.trim_end_matches('.'))
}

/// An A answer's meaning (RFC 5782): none is "not listed", 127.0.0.0/8 is listed, except the 127.255.255.0/24 codes
/// lists use to refuse a query (e.g. through a public resolver); anything else is not a blocklist answer.
pub fn classify(answer: Result<Vec<Ipv4Addr>, String>) -> Verdict {
    let codes = match answer {
        Err(reason) => return Verdict::Unknown(reason),
        Ok(codes) => codes,
    };
    if let Some(refusal) = codes.iter().find(|code| code.octets()[..3] == [127, 255, 255]) {
        return Verdict::Unknown(format!(
            "the blocklist refused the query ({refusal}); query it through a resolver it serves"
        ));
    }
    if let Some(foreign) = codes.iter().find(|code| code.octets()[0] != 127) {
        return Verdict::Unknown(format!("answer {foreign} is not a blocklist code"));
    }
    codes.first().map_or(Verdict::NotListed, |code| Verdict::Listed(*code))
}

/// A zone listing an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing<'a> {
    pub address: IpAddr,
    pub zone: &'a str,
    pub code: Ipv4Addr,
}

/// A zone that could not say whether it lists an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unchecked<'a> {
    pub address: IpAddr,
    pub zone: &'a str,
    pub reason: &'a str,
}

/// Listings and failures across a tenant's addresses, in address and zone order.
pub fn findings(verdicts: &BTreeMap<IpAddr, Verdicts>) -> (Vec<Listing<'_>>, Vec<Unchecked<'_>>) {
    let mut listed = Vec::new();
    let mut unknown = Vec::new();
    for (&address, zones) in verdicts {
        for (zone, verdict) in zones {
            match verdict {
                Verdict::Listed(code) => listed.push(Listing {
                    address,
                    zone,
                    code: *code,
                }),
                Verdict::Unknown(reason) => unknown.push(Unchecked { address, zone, reason }),
                Verdict::NotListed => {}
            }
        }
    }
    (listed, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_reverse_the_address() {
        assert_eq!(
            query_name("192.0.2.10".parse().unwrap(), "zen.spamhaus.org"),
            "10.2.0.192.zen.spamhaus.org."
        );
        assert_eq!(
            query_name("2001:db8::1".parse().unwrap(), "bl.example."),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example."
        );
    }

    #[test]
    fn answers_are_listed_not_listed_or_unknown_never_guessed() {
        let ip = |text: &str| text.parse::<Ipv4Addr>().unwrap();
        assert_eq!(classify(Ok(vec![])), Verdict::NotListed);
        assert_eq!(classify(Ok(vec![ip("127.0.0.2")])), Verdict::Listed(ip("127.0.0.2")));
        assert!(matches!(classify(Ok(vec![ip("127.255.255.254")])), Verdict::Unknown(r) if r.contains("refused")));
        assert!(
            matches!(classify(Ok(vec![ip("192.0.2.1")])), Verdict::Unknown(r) if r.contains("not a blocklist code"))
        );
        assert_eq!(classify(Err("timed out".into())), Verdict::Unknown("timed out".into()));
    }
}
