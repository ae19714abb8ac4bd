//! The `SecureMailTenant` custom resource (`securemail.io/v1alpha1`).
//!
//! Field documentation here becomes the schema description that `kubectl explain smt.spec...` prints, so it is
//! written for a platform engineer reading it cold. Validation that the apiserver can do (ranges, patterns, CEL
//! rules) lives in the schema so a bad spec is refused at `kubectl apply` time with a message naming the fix.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::{Message, Rule};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::provider::ProviderSuffix;

/// A DNS name such as `mail.example.org`: labels of letters, digits and hyphens, no trailing dot, and a top-level
/// label that starts with a letter (no top-level domain is numeric, RFC 3696 section 2, and Postfix refuses a
/// numeric one in `myhostname`).
pub(crate) const DNS_NAME_PATTERN: &str = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$";
// CEL rules that refuse the usual near-misses of a DNS name naming the fix, beside `DNS_NAME_PATTERN`'s generic
// refusal. Names are compared byte for byte (DKIM signing domains, Postfix's sender table, ownership between
// tenants), so `Example.ORG`, `example.org.` and `bücher.example` would each be another name that never matches.
fn no_trailing_dot(field: &str) -> Rule {
    Rule::new("!self.endsWith('.')").message(Message::Message(format!(
        "{field} must not end with a dot: write notify.example.org, not notify.example.org."
    )))
}
fn lower_case(field: &str) -> Rule {
    Rule::new("self == self.lowerAscii()").message(Message::Message(format!(
        "{field} must be lower case: write notify.example.org, not Notify.Example.ORG"
    )))
}
fn a_label(field: &str) -> Rule {
    Rule::new("self.matches('^[ -~]*$')").message(Message::Message(format!(
        "{field} must be ASCII: write an internationalized (Unicode) name as its A-label (punycode), e.g. \
         xn--bcher-kva.example for bücher.example (idn2 bücher.example prints it)"
    )))
}

/// A pool address must be one receivers can see mail come from. Go's (and so CEL's) global unicast excludes exactly
/// the never-public kinds: loopback, unspecified, link-local, multicast and the IPv4 broadcast address; private and
/// documentation ranges stay allowed (NAT, test clusters, the examples).
fn public_source_rule() -> Rule {
    Rule::new("!isIP(self) || ip(self).isGlobalUnicast()").message(Message::Expression(
        "'ipPool address ' + self + ' is ' + (ip(self).isLoopback() ? 'a loopback' : ip(self).isUnspecified() ? \
         'the unspecified' : ip(self).isLinkLocalUnicast() ? 'a link-local' : ip(self).isLinkLocalMulticast() ? \
         'a link-local multicast' : 'a multicast or broadcast') + ' address and can never be a public source; use \
         the address receivers see the mail come from'"
            .to_owned(),
    ))
}

/// A single lower-case DNS label such as `sm` or `billing-app`.
const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// A Kubernetes label key (a qualified name): an optional DNS subdomain prefix and `/`, then a name of up to 63
/// letters, digits, `-`, `_` and `.` that starts and ends with a letter or digit, e.g. `node-role.example.org/egress`.
const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// A Kubernetes label value: empty, or up to 63 letters, digits, `-`, `_` and `.` starting and ending with a letter
/// or digit.
const LABEL_VALUE_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$";
/// Most node labels and tolerations an MTA pod may ask for; real placements need a handful. The bound also keeps
/// the estimated cost of the CEL rules over them within the apiserver's budget.
const MAX_PLACEMENT_ENTRIES: u32 = 32;
/// A mail address for DMARC reports (`mailto:` is added when the record is rendered).
const MAILBOX_PATTERN: &str = r"^[^@\s]+@([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// Dedicated outbound mail infrastructure for one tenant: MTA pods with their own source IPs warmed up on a
/// schedule, DKIM keys, a TLS policy that never sends in cleartext, and the DNS records the tenant must publish.
// Repeated `printcolumn(type_ = ..)` keys are separate columns, not duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "securemail.io",
    version = "v1alpha1",
    kind = "SecureMailTenant",
    plural = "securemailtenants",
    singular = "securemailtenant",
    shortname = "smt",
    category = "securemail",
    namespaced,
    status = "SecureMailTenantStatus",
    derive = "PartialEq",
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: it prefixes the names of the tenant's pods, Services and Secrets"),
    doc = "A tenant's dedicated outbound mail infrastructure: MTA pods, source IPs with warmup, DKIM keys and a TLS policy that never sends in cleartext.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the tenant's infrastructure is reconciled and able to send"
    ),
    printcolumn(
        name = "IPs",
        type_ = "string",
        json_path = ".status.ips",
        description = "Pool addresses with an MTA pod / addresses in the pool"
    ),
    printcolumn(
        name = "Warmup-Day",
        type_ = "integer",
        json_path = ".status.warmupDay",
        description = "Lowest warmup day across the pool"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Queue-Encrypted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"QueueStorageEncrypted\")].status",
        description = "Whether the queue volumes' StorageClass is known to encrypt at rest",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SecureMailTenantSpec {
    /// Sending domains of this tenant. Each gets DKIM keys, an SPF and a DMARC record to publish. At least one.
    #[schemars(length(min = 1, max = 50))]
    #[x_kube(validation = Rule::new("self.all(d, self.exists_one(e, e.name == d.name))").message("each domain may appear only once in spec.domains; remove the duplicate entry"))]
    pub domains: Vec<DomainSpec>,

    /// The dedicated source addresses this tenant sends from, one MTA pod per address, and how they are warmed up.
    pub ip_pool: IpPoolSpec,

    /// How outbound mail is protected in transit. TLS is mandatory unless an override explicitly allows cleartext
    /// for one domain.
    #[serde(default)]
    pub tls_policy: TlsPolicySpec,

    /// How the tenant's applications submit mail to the MTA pods (TLS and client certificates are always required).
    pub submission: SubmissionSpec,

    /// The MTA pods: images, resources and queue storage. The number of pods always equals the number of pool
    /// addresses.
    #[serde(default)]
    pub mta: MtaSpec,

    /// Delivery evidence retention.
    #[serde(default)]
    pub audit: AuditSpec,

    /// Publishing of the DNS records listed in status.
    #[serde(default)]
    pub dns: DnsSpec,

    /// Stop reconciling this tenant without deleting anything. Pods keep running with their last configuration.
    #[serde(default)]
    pub paused: bool,

    /// What happens to the MTA pods when this tenant is deleted. Drain (default) stops new submissions and waits
    /// until every queue is empty before removing the pods; their volumes stay as delivery evidence until
    /// audit.retentionDays have passed. Orphan leaves pods and volumes in place.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// One sending domain.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DomainSpec {
    /// The domain in the From: header, e.g. `notify.example-hospital.org`: lower case, no trailing dot, and an
    /// internationalized name as its A-label (`xn--...`). A domain belongs to one tenant at a time: a tenant that
    /// lists a domain another tenant holds gets `DomainConflict` and nothing for that domain.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_NAME_PATTERN))]
    #[x_kube(
        validation = no_trailing_dot("a domain name"),
        validation = lower_case("a domain name"),
        validation = a_label("a domain name")
    )]
    pub name: String,

    /// DKIM signing for this domain.
    #[serde(default)]
    pub dkim: DkimSpec,

    /// SPF record contents beyond the pool's own addresses.
    #[serde(default)]
    pub spf: SpfSpec,

    /// DMARC record for this domain.
    #[serde(default)]
    pub dmarc: DmarcSpec,
}

/// DKIM keys and signing for one domain.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// Signature algorithms. rsa-sha256 is always required because many receivers cannot verify Ed25519 alone;
    /// add ed25519-sha256 to dual-sign every message.
    #[serde(default = "default_dkim_algorithms")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("'rsa-sha256' in self").message("dkim.algorithms must include rsa-sha256; many receivers cannot verify Ed25519 alone, add ed25519-sha256 beside it for dual signing")
    )]
    pub algorithms: Vec<DkimAlgorithm>,

    /// RSA key size in bits: 2048 (default), 3072 or 4096. Larger keys produce TXT records split into several strings.
    #[serde(default = "default_rsa_bits")]
    #[x_kube(validation = Rule::new("self in [2048, 3072, 4096]").message("dkim.rsaBits must be 2048, 3072 or 4096"))]
    pub rsa_bits: u32,

    /// Days after which a new key is generated and the old one retired (after an overlap). At least 7; default 180.
    #[serde(default = "default_rotation_period_days")]
    #[schemars(range(max = 3650))]
    #[x_kube(validation = Rule::new("self >= 7").message("dkim.rotationPeriodDays must be at least 7 so receivers see the new selector before the old one is retired"))]
    pub rotation_period_days: u32,

    /// Prefix of generated selector names (`<prefix>-<algorithm>-<serial>`), a lower-case DNS label.
    #[serde(default = "default_selector_prefix")]
    #[schemars(length(min = 1, max = 40), regex(pattern = DNS_LABEL_PATTERN))]
    pub selector_prefix: String,
}

/// A DKIM signature algorithm (RFC 6376, RFC 8463).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

/// The SPF record published for a domain: the pool's addresses plus these additions.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SpfSpec {
    /// Extra `include:` mechanisms, e.g. a ticketing system that also sends as this domain. SPF allows at most
    /// 10 DNS lookups in total, so keep this short.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(regex(pattern = DNS_NAME_PATTERN)))]
    pub includes: Vec<String>,

    /// The `all` qualifier: softfail (`~all`, default) or fail (`-all`).
    #[serde(default)]
    pub all: SpfAll,
}

/// The qualifier of SPF's terminating `all` mechanism.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpfAll {
    #[default]
    Softfail,
    Fail,
}

/// The DMARC record published for a domain.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    /// What receivers should do with mail that fails DMARC: none, quarantine (default) or reject.
    #[serde(default)]
    pub policy: DmarcPolicy,

    /// Addresses that receive aggregate (rua) reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(regex(pattern = MAILBOX_PATTERN)))]
    pub aggregate_reports_to: Vec<String>,

    /// Addresses that receive failure (ruf) reports. These can contain message headers; leave empty unless the
    /// mailbox is cleared for PHI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5), inner(regex(pattern = MAILBOX_PATTERN)))]
    pub failure_reports_to: Vec<String>,

    /// Percentage of failing mail the policy applies to (pct), 1..100, default 100.
    #[serde(default = "default_dmarc_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: u8,
}

impl Default for DmarcSpec {
    fn default() -> Self {
        Self {
            policy: DmarcPolicy::default(),
            aggregate_reports_to: Vec::new(),
            failure_reports_to: Vec::new(),
            percent: default_dmarc_percent(),
        }
    }
}

/// DMARC `p=` policy.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    None,
    #[default]
    Quarantine,
    Reject,
}

/// The pool of dedicated source addresses.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IpPoolSpec {
    /// Source addresses, in order: MTA pod i sends from addresses[i]. Removing an address drains its pod first.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.address == a.address))").message("each address may appear only once in ipPool.addresses; remove the duplicate entry"))]
    pub addresses: Vec<PoolAddress>,

    /// How pods get their pool address onto the wire.
    #[serde(default)]
    pub egress: EgressSpec,

    /// How quickly new addresses ramp up their daily volume.
    #[serde(default)]
    pub warmup: WarmupSpec,

    /// DNS blocklists the pool addresses are checked against.
    #[serde(default)]
    pub dnsbl: DnsblSpec,
}

/// One dedicated source address.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolAddress {
    /// IPv4 or IPv6 address in canonical form, e.g. `192.0.2.10` or `2001:db8::10`.
    #[schemars(length(max = 45))]
    #[x_kube(
        validation = Rule::new("isIP(self) && ip.isCanonical(self)").message("must be an IPv4 or IPv6 address in canonical form, e.g. 192.0.2.10 or 2001:db8::10"),
        validation = public_source_rule()
    )]
    pub address: String,

    /// The PTR (reverse DNS) name of the address and the name used in EHLO, e.g. `mta1.notify.example.org`.
    /// It must resolve back to the address (forward-confirmed reverse DNS); large receivers refuse mail otherwise.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_NAME_PATTERN))]
    #[x_kube(
        validation = no_trailing_dot("an ipPool hostname"),
        validation = lower_case("an ipPool hostname"),
        validation = a_label("an ipPool hostname")
    )]
    pub hostname: String,
}

/// How the MTA pods send from their pool address.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.proxyPort) || self.mode == 'Socks5Proxy'").message("egress.proxyPort applies to mode Socks5Proxy only; remove it or set mode: Socks5Proxy"),
    // HostNetwork and Multus are refused on create and on any change of the egress section; validation ratcheting
    // lets a tenant stored with one keep updating its other fields, and the operator renders it like None.
    validation = Rule::new("self.mode != 'Multus'").message("egress mode Multus is no longer offered: one network attachment on the pod template cannot give pod i address i; use Socks5Proxy (a SOCKS5 proxy on the egress hosts sends from each address) or None (the platform puts each address on its pod, with a secondary network of its own if it likes); see docs/egress.md"),
    validation = Rule::new("!has(self.networkAttachment)").message("egress.networkAttachment belonged to mode Multus, which is no longer offered; remove it; see docs/egress.md"),
    validation = Rule::new("self.mode != 'HostNetwork'").message("egress mode HostNetwork is no longer offered: host-network pods break the MTA namespace's Pod Security level and cannot be pinned to the node owning each address; use Socks5Proxy (a SOCKS5 proxy on the egress hosts sends from each address) or None (the platform puts each address on its pod); see docs/egress.md")
)]
pub struct EgressSpec {
    /// None: the platform puts each address on its pod (outside SecureMail) and the pod binds it. Socks5Proxy:
    /// pod i connects through the SOCKS5 proxy listening on address i (port proxyPort), which sends from that
    /// address. Every pod checks that it can send from its address and reports EgressReady; see docs/egress.md.
    /// HostNetwork and Multus are refused: a tenant stored with one runs its pods as with None.
    #[serde(default)]
    pub mode: EgressMode,

    /// Port of the SOCKS5 proxy on each pool address, when mode is Socks5Proxy. Default 1080.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub proxy_port: Option<u16>,

    /// Refused: belonged to mode Multus. Kept so tenants stored with it still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub network_attachment: Option<String>,
}

/// Egress modes for pool addresses.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EgressMode {
    #[default]
    None,
    // Kept so tenants stored with them still parse; the CRD refuses them for new and changed egress sections.
    HostNetwork,
    Multus,
    Socks5Proxy,
}

impl EgressSpec {
    /// The SOCKS5 proxy port when none is given.
    pub const DEFAULT_PROXY_PORT: u16 = 1080;

    /// The port of the SOCKS5 proxy on each pool address: `proxyPort`, or the default.
    pub fn proxy_port(&self) -> u16 {
        self.proxy_port.unwrap_or(Self::DEFAULT_PROXY_PORT)
    }
}

/// Warmup schedule and the thresholds that pause it.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.preset) && has(self.schedule))").message("set either warmup.preset or warmup.schedule, not both"))]
pub struct WarmupSpec {
    /// A built-in schedule: conservative (about 30 days), transactional (about 3 weeks) or aggressive (about
    /// 2 weeks). Used when no custom schedule is given; transactional if neither is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<WarmupPreset>,

    /// A custom schedule: steps of (day, daily limit per address). Day 1 must be present; a step's limit holds
    /// until the next step; limits may not decrease. After the last step the address is warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 90))]
    #[x_kube(
        validation = Rule::new("self.exists(s, s.day == 1)").message("a custom warmup schedule must start with a step for day 1"),
        validation = Rule::new("self.all(s, self.exists_one(t, t.day == s.day))").message("each day may appear only once in warmup.schedule"),
        validation = Rule::new("self.all(a, self.all(b, a.day >= b.day || a.dailyLimit <= b.dailyLimit))").message("warmup.schedule daily limits must not decrease from one day to a later day")
    )]
    pub schedule: Option<Vec<WarmupStep>>,

    /// First day of the schedule (`YYYY-MM-DD`, UTC). Defaults to the day the tenant is first reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date"))]
    pub start_date: Option<String>,

    /// Share of each day's limit per mailbox provider, in percent; the five values must add up to 100.
    #[serde(default)]
    pub provider_shares: ProviderShares,

    /// Rates above which the schedule does not advance.
    #[serde(default)]
    pub thresholds: WarmupThresholds,

    /// Days to step back when a severe signal (a blocklist listing or a provider block) is seen. Default 3.
    #[serde(default = "default_rollback_days")]
    #[schemars(range(min = 1, max = 30))]
    pub rollback_days: u32,

    /// An address that sent nothing for this many days warms up again from day 1. Default 30.
    #[serde(default = "default_idle_rewarm_days")]
    #[schemars(range(min = 1, max = 365))]
    pub idle_rewarm_days: u32,

    /// MX host suffixes classed as a provider before the built-in table (Google, Microsoft, Yahoo and Apple MX
    /// domains), for caps, counts and circuit breakers; e.g. a provider's MX domain the table lacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub provider_suffixes: Vec<ProviderSuffix>,
}

impl Default for WarmupSpec {
    fn default() -> Self {
        Self {
            preset: None,
            schedule: None,
            start_date: None,
            provider_shares: ProviderShares::default(),
            thresholds: WarmupThresholds::default(),
            rollback_days: default_rollback_days(),
            idle_rewarm_days: default_idle_rewarm_days(),
            provider_suffixes: Vec::new(),
        }
    }
}

/// Built-in warmup schedules.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WarmupPreset {
    Conservative,
    Transactional,
    Aggressive,
}

/// One step of a custom warmup schedule.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WarmupStep {
    /// Day of the schedule this limit starts on (1 = first day).
    #[schemars(range(min = 1, max = 365))]
    pub day: u32,
    /// Messages per address per day from this day on. Must be positive.
    #[x_kube(validation = Rule::new("self > 0").message("warmup.schedule dailyLimit must be positive"))]
    #[schemars(range(max = 10_000_000))]
    pub daily_limit: u32,
}

/// Share of the daily limit per mailbox provider class, in percent.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.gmail + self.microsoft + self.yahoo + self.apple + self.other == 100").message("warmup.providerShares must add up to 100 (percent); defaults are gmail 40, microsoft 25, yahoo 15, apple 10, other 10"))]
pub struct ProviderShares {
    /// Google (gmail.com and Google Workspace MX hosts). Default 40.
    #[serde(default = "default_share_gmail")]
    #[schemars(range(max = 100))]
    pub gmail: u32,
    /// Microsoft (outlook.com, Microsoft 365). Default 25.
    #[serde(default = "default_share_microsoft")]
    #[schemars(range(max = 100))]
    pub microsoft: u32,
    /// Yahoo and AOL. Default 15.
    #[serde(default = "default_share_yahoo")]
    #[schemars(range(max = 100))]
    pub yahoo: u32,
    /// Apple (icloud.com). Default 10.
    #[serde(default = "default_share_apple")]
    #[schemars(range(max = 100))]
    pub apple: u32,
    /// Every other receiver. Default 10.
    #[serde(default = "default_share_other")]
    #[schemars(range(max = 100))]
    pub other: u32,
}

impl Default for ProviderShares {
    fn default() -> Self {
        Self {
            gmail: default_share_gmail(),
            microsoft: default_share_microsoft(),
            yahoo: default_share_yahoo(),
            apple: default_share_apple(),
            other: default_share_other(),
        }
    }
}

/// Rates (percent of yesterday's attempts) above which an address's warmup holds instead of advancing.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WarmupThresholds {
    /// Hard bounces, in percent. Default 2.
    #[serde(default = "default_bounce_rate")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub bounce_rate_percent: f64,
    /// Deferrals (4xx), in percent. Default 10.
    #[serde(default = "default_deferral_rate")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub deferral_rate_percent: f64,
    /// Spam complaints, in percent. Default 0.1 (Gmail's bulk-sender guideline; 0.3 is its hard limit).
    #[serde(default = "default_complaint_rate")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub complaint_rate_percent: f64,
}

impl Default for WarmupThresholds {
    fn default() -> Self {
        Self {
            bounce_rate_percent: default_bounce_rate(),
            deferral_rate_percent: default_deferral_rate(),
            complaint_rate_percent: default_complaint_rate(),
        }
    }
}

/// DNS blocklist checks of the pool addresses.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsblSpec {
    /// Blocklist zones queried for each address, e.g. `zen.spamhaus.org`. Empty disables the check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(regex(pattern = DNS_NAME_PATTERN)))]
    pub zones: Vec<String>,
    /// Minutes between checks. Default 60.
    #[serde(default = "default_dnsbl_interval")]
    #[schemars(range(min = 5, max = 1440))]
    pub interval_minutes: u32,
}

impl Default for DnsblSpec {
    fn default() -> Self {
        Self {
            zones: Vec::new(),
            interval_minutes: default_dnsbl_interval(),
        }
    }
}

/// Transport security for outbound mail. The order is DANE, then MTA-STS, then this policy's mode.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode == 'encrypted' || !has(self.overrides) || self.overrides.all(o, !has(o.mode) || o.mode != 'encrypted' || has(o.exception))").message("an override with mode encrypted loosens the tenant's verified policy; add exception (approvedBy, reason) to that override"),
    validation = Rule::new("self.minVersion == '1.2' || !has(self.overrides) || self.overrides.all(o, !has(o.minVersion) || o.minVersion == '1.3' || has(o.exception))").message("an override with minVersion 1.2 loosens the tenant's 1.3 minimum; add exception (approvedBy, reason) to that override")
)]
pub struct TlsPolicySpec {
    /// verified (default): the certificate must be valid for the MX host (WebPKI). encrypted: any certificate,
    /// TLS still mandatory. DANE and MTA-STS, when the recipient domain publishes them, take precedence.
    #[serde(default)]
    pub mode: TlsMode,

    /// Lowest TLS version used: 1.2 (default) or 1.3. Older versions are never offered.
    #[serde(default)]
    pub min_version: TlsVersion,

    /// Use DANE (RFC 7672) when the recipient MX publishes DNSSEC-signed TLSA records. Default true.
    #[serde(default = "default_true")]
    pub dane: bool,

    /// Use MTA-STS (RFC 8461) when the recipient domain publishes a policy. Default true.
    #[serde(default = "default_true")]
    pub mta_sts: bool,

    /// What happens to a message when no secure path exists: defer (default; 4.7.x, it stays queued and is
    /// retried) or bounce (5.7.x, the sender gets a delivery status notification).
    #[serde(default)]
    pub on_failure: OnFailure,

    /// Per recipient domain policies. They may only tighten the tenant's policy unless they carry an exception.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.all(o, self.exists_one(p, p.domain == o.domain))").message("each domain may appear only once in tlsPolicy.overrides"))]
    pub overrides: Vec<TlsOverride>,
}

impl Default for TlsPolicySpec {
    fn default() -> Self {
        Self {
            mode: TlsMode::default(),
            min_version: TlsVersion::default(),
            dane: true,
            mta_sts: true,
            on_failure: OnFailure::default(),
            overrides: Vec::new(),
        }
    }
}

/// How a TLS peer is authenticated.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Verified,
    Encrypted,
}

/// Minimum TLS protocol version.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// What to do with a message that has no secure path.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Defer,
    Bounce,
}

/// The policy for one recipient domain.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.allowCleartext) && self.allowCleartext) || has(self.exception)").message("allowCleartext sends mail for this domain unencrypted when it offers no TLS; it needs exception (approvedBy, reason)"))]
pub struct TlsOverride {
    /// Recipient domain this override applies to, e.g. `partner-clinic.example`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_NAME_PATTERN))]
    #[x_kube(
        validation = no_trailing_dot("a tlsPolicy override domain"),
        validation = lower_case("a tlsPolicy override domain"),
        validation = a_label("a tlsPolicy override domain")
    )]
    pub domain: String,

    /// dane: DANE is required (no DANE ⇒ no delivery). verified / encrypted: as the tenant mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<OverrideTlsMode>,

    /// Lowest TLS version for this domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<TlsVersion>,

    /// Deliver in cleartext when this domain's MX offers no STARTTLS. Off unless explicitly set, and only with an
    /// exception. Even then TLS is used whenever it is offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_cleartext: Option<bool>,

    /// Who approved a policy weaker than the tenant's, and why. Required to loosen anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exception: Option<PolicyException>,
}

/// TLS modes available to a per-domain override.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OverrideTlsMode {
    Dane,
    Verified,
    Encrypted,
}

/// A recorded approval for a weaker-than-tenant policy.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyException {
    /// Person or ticket that approved the exception, e.g. `security-office/CHG-1042`.
    #[schemars(length(min = 1, max = 200))]
    pub approved_by: String,
    /// Why the exception is needed.
    #[schemars(length(min = 1, max = 1000))]
    pub reason: String,
}

/// How applications submit mail.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SubmissionSpec {
    /// Submission port of the Service (STARTTLS required). Default 587.
    #[serde(default = "default_submission_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// The server certificate presented to submitting applications.
    pub tls: SubmissionTls,

    /// Which client certificates may submit. Every submission must present one.
    pub client_certificates: ClientCertificates,

    /// Namespaces (besides the tenant's own) whose pods may connect to the submission port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 63), regex(pattern = DNS_LABEL_PATTERN)))]
    pub allowed_namespaces: Vec<String>,
}

/// Source of the submission server certificate: an existing Secret or a cert-manager issuer.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretName) != has(self.issuerRef)").message("submission.tls needs exactly one of secretName (an existing kubernetes.io/tls Secret) or issuerRef (a cert-manager issuer)"))]
pub struct SubmissionTls {
    /// A `kubernetes.io/tls` Secret in the tenant's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,

    /// A cert-manager issuer; the operator requests a Certificate for the submission Service name and mounts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// Reference to a cert-manager Issuer or ClusterIssuer.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Issuer name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Issuer (namespaced, default) or ClusterIssuer.
    #[serde(default)]
    pub kind: IssuerKind,
}

/// cert-manager issuer kinds.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IssuerKind {
    #[default]
    Issuer,
    ClusterIssuer,
}

/// Client certificate authentication for submission.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificates {
    /// Secret in the tenant's namespace holding `ca.crt`: the CA that signs the applications' client certificates.
    #[schemars(length(min = 1, max = 253))]
    pub ca_secret_name: String,

    /// Identities allowed to submit, by public-key SHA-256 fingerprint. Empty allows every certificate the CA
    /// signed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.all(i, self.exists_one(j, j.name == i.name))").message("each client identity name may appear only once"))]
    pub allowed: Vec<ClientIdentity>,
}

/// One application allowed to submit.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientIdentity {
    /// A name for this application, shown in evidence and logs, e.g. `patient-portal`.
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, as 64 hex digits (colons allowed).
    #[x_kube(validation = Rule::new("self.replace(':', '').matches('^[0-9A-Fa-f]{64}$')").message("publicKeySha256 must be 64 hex digits (colons allowed), e.g. from: openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum"))]
    #[schemars(length(max = 95))]
    pub public_key_sha256: String,
}

/// The MTA pods.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MtaSpec {
    /// Postfix container image. Defaults to the image matching this operator's version. A custom image must give
    /// Postfix's `postfix` user uid 65532, the sidecar's, which counts the queue through a read-only mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Sidecar container image. Defaults to the image matching this operator's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub sidecar_image: Option<String>,

    /// Resources of the Postfix container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Resources of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_resources: Option<ResourceRequirements>,

    /// The per-pod volume holding the Postfix queue and the sidecar's counters and evidence.
    #[serde(default)]
    pub storage: QueueStorage,

    /// Node labels the MTA pods' nodes must carry (the pods' nodeSelector), e.g. the label of the egress nodes that
    /// own the pool addresses. At most 32.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = MAX_PLACEMENT_ENTRIES,
        "additionalProperties" = {"type": "string", "maxLength": 63, "pattern": LABEL_VALUE_PATTERN}
    ))]
    #[x_kube(validation = Rule::new(format!("self.all(k, k.matches('{LABEL_KEY_PATTERN}'))")).message("mta.nodeSelector keys must be label keys: an optional DNS prefix and '/', then up to 63 letters, digits, '-', '_' or '.', e.g. node-role.example.org/mail-egress"))]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the MTA pods tolerate, e.g. the NoSchedule taint that keeps other workloads off the egress nodes.
    /// At most 32.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "tolerations_schema")]
    pub tolerations: Vec<Toleration>,

    /// Node affinity and pod (anti-)affinity of the MTA pods. The operator always adds a topology spread over
    /// nodes (kubernetes.io/hostname, best effort) so a node failure takes as few pool addresses offline as it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

/// Kubernetes' Toleration schema, bounded and checked the way the apiserver checks a pod's tolerations. Without this
/// a mistake would pass `kubectl apply` and be refused only when the operator writes the StatefulSet, where it shows
/// in the operator's log instead of to whoever applied the tenant.
fn tolerations_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut toleration = Toleration::json_schema(generator);
    let bounds = [
        (
            "key",
            json!({"maxLength": 317, "pattern": format!("^$|{LABEL_KEY_PATTERN}")}),
        ),
        ("operator", json!({"enum": ["", "Equal", "Exists"]})),
        ("value", json!({"maxLength": 63, "pattern": LABEL_VALUE_PATTERN})),
        (
            "effect",
            json!({"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]}),
        ),
    ];
    if let Some(properties) = toleration.get_mut("properties").and_then(Value::as_object_mut) {
        for (name, bound) in bounds {
            if let (Some(Value::Object(property)), Value::Object(bound)) = (properties.get_mut(name), bound) {
                property.extend(bound);
            }
        }
    }
    let rules = [
        (
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "a toleration without key tolerates every taint and needs operator Exists",
        ),
        (
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "a toleration with operator Exists matches every value of its key: remove value",
        ),
        (
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "tolerationSeconds (how long a pod stays after the taint appears) needs effect NoExecute",
        ),
    ];
    toleration.insert(
        "x-kubernetes-validations".to_owned(),
        rules
            .iter()
            .map(|(rule, message)| json!({"rule": rule, "message": message}))
            .collect(),
    );
    schemars::json_schema!({
        "type": "array",
        "maxItems": MAX_PLACEMENT_ENTRIES,
        "items": toleration,
    })
}

/// The per-pod persistent volume.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueueStorage {
    /// Size of each pod's volume. Default 10Gi.
    #[serde(default = "default_storage_size")]
    pub size: Quantity,
    /// StorageClass of the volume; the cluster default when unset. The volume holds queued mail (message content,
    /// PHI) while delivery is deferred: the tenant's QueueStorageEncrypted condition says whether this class is known
    /// to encrypt at rest (see docs/security.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Refuse to create queue volumes on a StorageClass not known to encrypt at rest. When true and the class (named
    /// above, or the cluster default) is neither a known encrypting provisioner with its encryption setting nor
    /// annotated `securemail.io/encrypted-at-rest: "true"` by the platform team, no new MTA pod or volume is made:
    /// a new tenant gets no StatefulSet, an existing one is not scaled up, and Ready is False naming the
    /// QueueStorageEncrypted condition. Nothing that already holds mail is deleted or shrunk. Default false, so
    /// existing tenants keep working; the condition reports the class either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_encryption_at_rest: bool,
}

impl Default for QueueStorage {
    fn default() -> Self {
        Self {
            size: default_storage_size(),
            storage_class_name: None,
            require_encryption_at_rest: false,
        }
    }
}

/// Delivery evidence settings.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuditSpec {
    /// Days delivery evidence is kept. Default 2190 (6 years, the HIPAA documentation retention period). The
    /// volume of a pod that left (pool shrink, tenant deleted with Drain) is kept this long after it left.
    #[serde(default = "default_retention_days")]
    #[schemars(range(min = 1, max = 36500))]
    pub retention_days: u32,
}

impl Default for AuditSpec {
    fn default() -> Self {
        Self {
            retention_days: default_retention_days(),
        }
    }
}

/// Publishing of the tenant's DNS records.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// Also create external-dns `DNSEndpoint` objects for the records in status (needs external-dns with the
    /// CRD source). Without it, publish status.dnsRecords yourself.
    #[serde(default)]
    pub external_dns: bool,
}

/// What deleting the tenant does to its MTA pods and volumes.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    #[default]
    Drain,
    Orphan,
}

/// Observed state, written by the operator only.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecureMailTenantStatus {
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Ready summarises the others; typed conditions include DkimReady, IpPoolConflict, DnsPublished, Draining,
    /// QueueStorageEncrypted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Pool addresses with an MTA pod / addresses in the pool, e.g. `3/3` (shown by `kubectl get smt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<String>,

    /// Lowest warmup day across the pool (shown by `kubectl get smt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_day: Option<u32>,

    /// DNS records the tenant must publish for SPF, DKIM, DMARC and reverse DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_records: Vec<DnsRecord>,

    /// Per-address pool state, in pool order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_pool: Vec<PoolAddressStatus>,

    /// DKIM selectors in use and their lifecycle state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim_selectors: Vec<DkimSelectorStatus>,

    /// When the submission server certificate (`tls.crt` of the submission Secret) expires; absent while that
    /// Secret is missing or holds no certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submission_certificate_expires: Option<Time>,
}

/// A DNS record to publish.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecord {
    /// Fully qualified owner name.
    pub name: String,
    /// Record type: TXT or PTR.
    #[serde(rename = "type")]
    pub record_type: DnsRecordType,
    /// Record data; TXT values longer than 255 bytes appear as several quoted strings.
    pub value: String,
    /// What the record is for: spf, dkim, dmarc or ptr.
    pub purpose: String,
}

/// DNS record types SecureMail asks for.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsRecordType {
    #[serde(rename = "TXT")]
    Txt,
    #[serde(rename = "PTR")]
    Ptr,
}

/// Observed state of one pool address.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolAddressStatus {
    /// The pool address.
    pub address: String,
    /// Its PTR / EHLO hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The MTA pod (StatefulSet ordinal) sending from this address; absent while the address cannot be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<u32>,
    /// First day of this address's warmup schedule (`YYYY-MM-DD`, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_start: Option<String>,
    /// Current warmup day (1-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_day: Option<u32>,
    /// Today's daily limit for this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<u32>,
    /// Warming, Held, RolledBack, Warm or Draining.
    pub state: PoolAddressState,
    /// Why the address is in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the warmup loop last evaluated this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_evaluated: Option<Time>,
    /// Last UTC day the address attempted a delivery (`YYYY-MM-DD`); an address idle long enough re-warms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent: Option<String>,
}

/// Lifecycle of a pool address.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolAddressState {
    Warming,
    Held,
    RolledBack,
    Warm,
    Draining,
}

impl PoolAddressState {
    pub const ALL: [PoolAddressState; 5] = [
        PoolAddressState::Warming,
        PoolAddressState::Held,
        PoolAddressState::RolledBack,
        PoolAddressState::Warm,
        PoolAddressState::Draining,
    ];

    /// The name status and metrics use (the serialized form).
    pub fn as_str(self) -> &'static str {
        match self {
            PoolAddressState::Warming => "Warming",
            PoolAddressState::Held => "Held",
            PoolAddressState::RolledBack => "RolledBack",
            PoolAddressState::Warm => "Warm",
            PoolAddressState::Draining => "Draining",
        }
    }
}

/// A DKIM selector and where it is in rotation.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimSelectorStatus {
    /// Signing domain.
    pub domain: String,
    /// Selector name.
    pub selector: String,
    /// Signature algorithm.
    pub algorithm: DkimAlgorithm,
    /// Published (record out, not signing yet), Active (signing) or Retiring (record kept, no longer signing).
    pub state: DkimSelectorState,
    /// When the key was generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
    /// When the selector entered its current state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The selector this one replaced because its key Secret was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

/// Rotation state of a DKIM selector.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DkimSelectorState {
    Published,
    Active,
    Retiring,
}

fn default_dkim_algorithms() -> Vec<DkimAlgorithm> {
    vec![DkimAlgorithm::RsaSha256]
}
fn default_rsa_bits() -> u32 {
    2048
}
fn default_rotation_period_days() -> u32 {
    180
}
fn default_selector_prefix() -> String {
    "sm".to_owned()
}
fn default_dmarc_percent() -> u8 {
    100
}
fn default_rollback_days() -> u32 {
    3
}
fn default_idle_rewarm_days() -> u32 {
    30
}
fn default_share_gmail() -> u32 {
    40
}
fn default_share_microsoft() -> u32 {
    25
}
fn default_share_yahoo() -> u32 {
    15
}
fn default_share_apple() -> u32 {
    10
}
fn default_share_other() -> u32 {
    10
}
fn default_bounce_rate() -> f64 {
    2.0
}
fn default_deferral_rate() -> f64 {
    10.0
}
fn default_complaint_rate() -> f64 {
    0.1
}
fn default_dnsbl_interval() -> u32 {
    60
}
fn default_true() -> bool {
    true
}
fn default_submission_port() -> u16 {
    587
}
fn default_storage_size() -> Quantity {
    Quantity("10Gi".to_owned())
}
fn default_retention_days() -> u32 {
    2190
}

impl Default for DkimSpec {
    fn default() -> Self {
        Self {
            algorithms: default_dkim_algorithms(),
            rsa_bits: default_rsa_bits(),
            rotation_period_days: default_rotation_period_days(),
            selector_prefix: default_selector_prefix(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_address_state_names_are_their_serialized_form() {
        for state in PoolAddressState::ALL {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }

    fn examples() -> Vec<(std::path::PathBuf, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("examples directory")
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .map(|path| {
                let text = std::fs::read_to_string(&path).expect("readable example");
                (path, text)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn every_example_parses_and_round_trips() {
        let examples = examples();
        assert!(examples.len() >= 3);
        for (path, text) in examples {
            let tenant: SecureMailTenant =
                serde_yaml::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            let again: SecureMailTenant =
                serde_yaml::from_str(&serde_yaml::to_string(&tenant).expect("serializes")).expect("parses back");
            assert_eq!(tenant, again, "{}", path.display());
        }
    }

    #[test]
    fn omitted_sections_take_the_documented_defaults() {
        let spec: SecureMailTenantSpec = serde_yaml::from_str(
            "domains: [{name: notify.example.org}]\n\
             ipPool: {addresses: [{address: 192.0.2.10, hostname: mta1.example.org}]}\n\
             submission: {tls: {secretName: s}, clientCertificates: {caSecretName: ca}}",
        )
        .expect("minimal spec parses");
        let tls = &spec.tls_policy;
        assert_eq!(
            (tls.mode, tls.min_version, tls.on_failure),
            (TlsMode::Verified, TlsVersion::Tls12, OnFailure::Defer)
        );
        assert!(tls.dane && tls.mta_sts && tls.overrides.is_empty());
        let dkim = &spec.domains[0].dkim;
        assert_eq!(dkim.algorithms, [DkimAlgorithm::RsaSha256]);
        assert_eq!((dkim.rsa_bits, dkim.rotation_period_days), (2048, 180));
        let shares = &spec.ip_pool.warmup.provider_shares;
        assert_eq!(
            shares.gmail + shares.microsoft + shares.yahoo + shares.apple + shares.other,
            100
        );
        assert_eq!(spec.audit.retention_days, 2190);
        assert_eq!(spec.deletion_policy, DeletionPolicy::Drain);
        assert_eq!(spec.submission.port, 587);
        assert!(!spec.paused);
    }

    #[test]
    fn tls_versions_below_1_2_do_not_parse() {
        for version in ["1.0", "1.1", "SSLv3"] {
            let parsed: Result<TlsVersion, _> = serde_yaml::from_str(&format!("'{version}'"));
            assert!(parsed.is_err(), "{version} accepted");
        }
    }
}
