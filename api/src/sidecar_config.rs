//! `sidecar.yaml`: the contract between the operator, which renders one per MTA pod, and the sidecar, which
//! loads it at start and on change. Unknown fields are refused so a typo or a version skew is an error, not a
//! silently ignored setting.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::provider::ProviderSuffix;
use crate::tenant::{DkimAlgorithm, ProviderShares, TlsPolicySpec};

/// Everything one sidecar needs to deliver for one pool address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// `namespace/name` of the SecureMailTenant, used in metrics and evidence.
    pub tenant: String,
    /// The pool address this pod sends from and the name it announces.
    pub source: SourceAddress,
    /// Where the sidecar listens.
    pub listen: Listen,
    /// DKIM keys per signing domain; the key for a message is picked by its From: domain.
    pub signing: Vec<SigningDomain>,
    /// The tenant's transport security policy, exactly as in the spec.
    pub tls_policy: TlsPolicySpec,
    /// Today's warmup limits for this address.
    pub warmup: WarmupCaps,
    /// Delivery evidence.
    pub evidence: EvidenceSettings,
    /// Directory on the pod's volume for counters that must survive restarts.
    pub state_dir: PathBuf,
    /// Largest message accepted over LMTP, in bytes (the same limit Postfix applies on submission).
    pub max_message_bytes: u64,
    /// How DNS is resolved; the defaults suit a pod.
    #[serde(default, skip_serializing_if = "DnsSettings::is_default")]
    pub dns: DnsSettings,
    /// Postfix's queue directory as the sidecar sees it, counted for `/status` (the operator's proof that a pod
    /// may be removed). Absent: `/status` reports the queue as unknown rather than guess. The sidecar needs read
    /// access to the queue subdirectories; granting it (group, modes) is up to the deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postfix_queue_dir: Option<PathBuf>,
    /// The tenant's MX host suffixes per provider, checked before the built-in table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider_suffixes: Vec<ProviderSuffix>,
    /// Every address of the tenant's pool, this pod's among them. A complaint report names the address the
    /// complained-about mail came from, and reaches whichever pod the submission Service picks, so each pod needs
    /// the whole list to attribute it. Absent in files from older operators: then only `source` is known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool_addresses: Vec<IpAddr>,
    /// How connections reach the Internet from `source.address`. Absent in files from older operators: directly.
    #[serde(default, skip_serializing_if = "Egress::is_direct")]
    pub egress: Egress,
}

/// The way out for this pod's connections to MX hosts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(tag = "mode", rename_all = "camelCase", deny_unknown_fields)]
pub enum Egress {
    /// `source.address` is assigned to an interface of the pod; every connection binds it.
    #[default]
    Direct,
    /// Through the SOCKS5 proxy at `proxy`, which must open every connection from `source.address` (it reports the
    /// address it used in each CONNECT reply, and a connection from any other address is closed unused).
    #[serde(rename_all = "camelCase")]
    Socks5Proxy { proxy: SocketAddr },
}

impl Egress {
    fn is_direct(&self) -> bool {
        *self == Self::Direct
    }
}

/// DNS resolution for MX, TLSA, MTA-STS and DNSBL lookups.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsSettings {
    /// Recursive resolvers to ask; empty means those in /etc/resolv.conf. The sidecar validates DNSSEC itself,
    /// so a resolver that does not validate (such as a cluster's CoreDNS) is fine, as long as it passes DNSSEC
    /// records through.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<SocketAddr>,
    /// DNSSEC trust anchors (DNSKEY or DS records in zone-file format); absent means the IANA root anchors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_anchor_file: Option<PathBuf>,
}

impl DnsSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A pool address and its forward-confirmed hostname.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceAddress {
    pub address: IpAddr,
    pub hostname: String,
}

/// Listening sockets of the sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Unix socket for LMTP from Postfix, in a directory shared only with the Postfix container.
    pub lmtp: PathBuf,
    /// `/livez`, `/readyz`, `/metrics`, `/status`.
    pub admin: SocketAddr,
}

/// The keys one domain signs with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningDomain {
    pub domain: String,
    /// One key per algorithm in use; several mean dual signing.
    pub keys: Vec<SigningKey>,
}

/// One DKIM private key, mounted from its Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningKey {
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PKCS#8 PEM file.
    pub private_key_file: PathBuf,
}

/// Warmup limits for today.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmupCaps {
    /// Schedule day (1-based); absent once the address is warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day: Option<u32>,
    /// Messages this address may send today; absent once warm (no warmup limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<u32>,
    /// Split of the daily limit per mailbox provider, in percent.
    pub provider_shares: ProviderShares,
}

/// Where evidence goes and how long it is kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvidenceSettings {
    pub dir: PathBuf,
    pub retention_days: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SidecarConfig {
        SidecarConfig {
            tenant: "tenant-a/clinic".into(),
            source: SourceAddress {
                address: "192.0.2.10".parse().expect("address"),
                hostname: "mta1.example.org".into(),
            },
            listen: Listen {
                lmtp: "/run/securemail/lmtp.sock".into(),
                admin: "0.0.0.0:9090".parse().expect("socket"),
            },
            signing: vec![SigningDomain {
                domain: "example.org".into(),
                keys: vec![SigningKey {
                    selector: "sm-rsa-1".into(),
                    algorithm: DkimAlgorithm::RsaSha256,
                    private_key_file: "/etc/securemail/dkim/key.pem".into(),
                }],
            }],
            tls_policy: TlsPolicySpec::default(),
            warmup: WarmupCaps {
                day: Some(1),
                daily_limit: Some(100),
                provider_shares: ProviderShares::default(),
            },
            evidence: EvidenceSettings {
                dir: "/var/lib/securemail/evidence".into(),
                retention_days: 2190,
            },
            state_dir: "/var/lib/securemail/state".into(),
            max_message_bytes: 25 * 1024 * 1024,
            dns: DnsSettings::default(),
            postfix_queue_dir: Some("/var/spool/postfix".into()),
            provider_suffixes: Vec::new(),
            pool_addresses: vec![
                "192.0.2.10".parse().expect("address"),
                "192.0.2.11".parse().expect("address"),
            ],
            egress: Egress::Direct,
        }
    }

    #[test]
    fn round_trips_through_yaml() {
        let yaml = serde_yaml::to_string(&sample()).expect("serializes");
        let parsed: SidecarConfig = serde_yaml::from_str(&yaml).expect("parses");
        assert_eq!(parsed, sample());
    }

    #[test]
    fn a_file_without_the_queue_directory_still_parses() {
        let mut config = sample();
        config.postfix_queue_dir = None;
        let yaml = serde_yaml::to_string(&config).expect("serializes");
        assert!(!yaml.contains("postfixQueueDir"), "{yaml}");
        assert_eq!(serde_yaml::from_str::<SidecarConfig>(&yaml).expect("parses"), config);
    }

    #[test]
    fn a_file_without_the_pool_address_list_still_parses() {
        let mut config = sample();
        config.pool_addresses = Vec::new();
        let yaml = serde_yaml::to_string(&config).expect("serializes");
        assert!(!yaml.contains("poolAddresses"), "{yaml}");
        assert_eq!(serde_yaml::from_str::<SidecarConfig>(&yaml).expect("parses"), config);
    }

    #[test]
    fn egress_is_direct_unless_a_proxy_is_named() {
        let yaml = serde_yaml::to_string(&sample()).expect("serializes");
        assert!(!yaml.contains("egress"), "{yaml}");
        let mut config = sample();
        config.egress = Egress::Socks5Proxy {
            proxy: "192.0.2.10:1080".parse().expect("socket"),
        };
        let yaml = serde_yaml::to_string(&config).expect("serializes");
        assert!(
            yaml.contains("egress:\n  mode: socks5Proxy\n  proxy: 192.0.2.10:1080\n"),
            "{yaml}"
        );
        assert_eq!(serde_yaml::from_str::<SidecarConfig>(&yaml).expect("parses"), config);
        let typo = yaml.replace("  proxy:", "  proxi:");
        let err = serde_yaml::from_str::<SidecarConfig>(&typo).expect_err("unknown field refused");
        assert!(err.to_string().contains("proxi"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let mut yaml = serde_yaml::to_string(&sample()).expect("serializes");
        yaml.push_str("allowCleartext: true\n");
        let err = serde_yaml::from_str::<SidecarConfig>(&yaml).expect_err("unknown field refused");
        assert!(err.to_string().contains("allowCleartext"), "{err}");
    }
}
