//! The ConfigMap holding Postfix's main.cf/master.cf (shared by all pods) and one sidecar.yaml per pod.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::ConfigMap;
use securemail_api::SecureMailTenant;
use securemail_api::sidecar_config::{
    DnsSettings, Egress, EvidenceSettings, Listen, SidecarConfig, SigningDomain, SigningKey, SourceAddress, WarmupCaps,
};
use securemail_api::tenant::{EgressMode, EgressSpec};

use super::{Observed, PodAssignment, Settings, child_meta, tenant_name};
use crate::names::TenantNames;
use crate::postfix;
use crate::{Error, Result};

/// Where the pod mounts the DKIM keys (one file per Secret, see the StatefulSet builder).
pub const DKIM_KEY_DIR: &str = "/etc/securemail/dkim";
/// The sidecar's directory on the pod volume.
pub const SIDECAR_DATA_DIR: &str = "/var/lib/securemail";
/// Where the sidecar reads its configuration files (the ConfigMap's items).
pub const SIDECAR_CONFIG_DIR: &str = "/etc/securemail/sidecar";
/// The sidecar's admin port (`/livez`, `/readyz`, `/metrics`, `/status`).
pub const SIDECAR_ADMIN_PORT: u16 = 9090;
/// Where the sidecar sees Postfix's queue (read-only) to count it for `/status`.
pub const SIDECAR_POSTFIX_QUEUE_DIR: &str = "/var/spool/postfix";

/// File name of pod `ordinal`'s sidecar configuration inside the ConfigMap.
pub fn sidecar_file(ordinal: u32) -> String {
    format!("sidecar-{ordinal}.yaml")
}

/// Whether a ConfigMap key is a pod's sidecar configuration ([`sidecar_file`]), which the sidecar reloads live.
pub fn is_sidecar_file(key: &str) -> bool {
    key.strip_prefix("sidecar-")
        .and_then(|rest| rest.strip_suffix(".yaml"))
        .is_some_and(|ordinal| ordinal.parse::<u32>().is_ok())
}

/// Path of a signing key's PEM file inside the pod.
pub fn key_file(secret_name: &str) -> String {
    format!("{DKIM_KEY_DIR}/{secret_name}.pem")
}

/// File name of the sidecars' DNSSEC trust anchors inside the ConfigMap, present when the operator is given any.
pub const TRUST_ANCHORS_FILE: &str = "dnssec-trust-anchors";

pub(super) fn config_map(
    tenant: &SecureMailTenant,
    observed: &Observed,
    names: &TenantNames,
    settings: &Settings,
) -> Result<ConfigMap> {
    let mut data = BTreeMap::from([
        ("main.cf".to_owned(), postfix::main_cf(&tenant.spec)),
        ("master.cf".to_owned(), postfix::master_cf(&tenant.spec)),
    ]);
    if let Some(anchors) = &settings.sidecar_dns.trust_anchors {
        data.insert(TRUST_ANCHORS_FILE.to_owned(), anchors.clone());
    }
    for pod in &observed.pods {
        let config = sidecar_config(tenant, observed, pod, settings)?;
        let yaml = serde_yaml::to_string(&config)?;
        data.insert(sidecar_file(pod.ordinal), yaml);
    }
    Ok(ConfigMap {
        metadata: child_meta(tenant, names, names.config_map(), "config")?,
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// The addresses this tenant sends from (draining ones included: complaints about their mail still arrive), for
/// attributing complaint reports that any pod may receive.
fn pool_addresses(observed: &Observed) -> Result<Vec<std::net::IpAddr>> {
    observed
        .pods
        .iter()
        .map(|pod| {
            pod.address
                .address
                .parse()
                .map_err(|_| Error::InvalidSpec(format!("pool address {:?} is not an IP address", pod.address.address)))
        })
        .collect()
}

/// The sidecar.yaml of one pod.
pub fn sidecar_config(
    tenant: &SecureMailTenant,
    observed: &Observed,
    pod: &PodAssignment,
    settings: &Settings,
) -> Result<SidecarConfig> {
    let namespace = tenant
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let address = pod
        .address
        .address
        .parse()
        .map_err(|_| Error::InvalidSpec(format!("pool address {:?} is not an IP address", pod.address.address)))?;
    let signing = tenant
        .spec
        .domains
        .iter()
        .map(|domain| SigningDomain {
            domain: domain.name.clone(),
            keys: observed
                .signing_keys
                .iter()
                .filter(|key| key.domain == domain.name)
                .map(|key| SigningKey {
                    selector: key.selector.clone(),
                    algorithm: key.algorithm,
                    private_key_file: key_file(&key.secret_name).into(),
                })
                .collect(),
        })
        .collect();
    Ok(SidecarConfig {
        tenant: format!("{namespace}/{}", tenant_name(tenant)?),
        source: SourceAddress {
            address,
            hostname: pod.address.hostname.clone(),
        },
        listen: Listen {
            lmtp: postfix::SIDECAR_LMTP_SOCKET.into(),
            admin: std::net::SocketAddr::from(([0, 0, 0, 0], SIDECAR_ADMIN_PORT)),
        },
        signing,
        tls_policy: tenant.spec.tls_policy.clone(),
        warmup: WarmupCaps {
            day: pod.warmup_day,
            daily_limit: pod.daily_limit,
            provider_shares: tenant.spec.ip_pool.warmup.provider_shares.clone(),
        },
        evidence: EvidenceSettings {
            dir: format!("{SIDECAR_DATA_DIR}/evidence").into(),
            retention_days: tenant.spec.audit.retention_days,
        },
        state_dir: format!("{SIDECAR_DATA_DIR}/state").into(),
        max_message_bytes: postfix::MESSAGE_SIZE_LIMIT_BYTES,
        dns: DnsSettings {
            nameservers: settings.sidecar_dns.nameservers.clone(),
            trust_anchor_file: settings
                .sidecar_dns
                .trust_anchors
                .as_ref()
                .map(|_| format!("{SIDECAR_CONFIG_DIR}/{TRUST_ANCHORS_FILE}").into()),
        },
        postfix_queue_dir: Some(SIDECAR_POSTFIX_QUEUE_DIR.into()),
        provider_suffixes: tenant.spec.ip_pool.warmup.provider_suffixes.clone(),
        pool_addresses: pool_addresses(observed)?,
        egress: egress(&tenant.spec.ip_pool.egress, address),
    })
}

/// Pod i's way out: through the proxy on its own address, or bound to the address on the pod (None, and the refused
/// HostNetwork and Multus, whose pods run on the pod network and say so through the self-check).
fn egress(spec: &EgressSpec, address: IpAddr) -> Egress {
    match spec.mode {
        EgressMode::Socks5Proxy => Egress::Socks5Proxy {
            proxy: SocketAddr::new(address, spec.proxy_port()),
        },
        EgressMode::None | EgressMode::Multus | EgressMode::HostNetwork => Egress::Direct,
    }
}
