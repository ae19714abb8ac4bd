//! Services, ServiceAccount, PodDisruptionBudget and NetworkPolicy of a tenant's MTA pods.

use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use securemail_api::SecureMailTenant;
use securemail_api::tenant::EgressMode;

use super::config::SIDECAR_ADMIN_PORT;
use super::statefulset::SUBMISSION_CONTAINER_PORT;
use super::{Observed, Settings, child_meta};
use crate::Result;
use crate::names::{SUBMISSION_LABEL, TenantNames};

pub(super) fn service_account(tenant: &SecureMailTenant, names: &TenantNames) -> Result<ServiceAccount> {
    Ok(ServiceAccount {
        metadata: child_meta(tenant, names, names.mta(), "mta")?,
        // The MTA pods never call the Kubernetes API.
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    })
}

/// Headless Service of the StatefulSet; it also lists not-ready pods so the operator can read a draining pod's
/// `/status`.
pub(super) fn headless_service(tenant: &SecureMailTenant, names: &TenantNames) -> Result<Service> {
    Ok(Service {
        metadata: child_meta(tenant, names, names.mta(), "mta")?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(names.pod_selector()),
            ports: Some(vec![
                port("submission", SUBMISSION_CONTAINER_PORT, SUBMISSION_CONTAINER_PORT),
                port("admin", i32::from(SIDECAR_ADMIN_PORT), i32::from(SIDECAR_ADMIN_PORT)),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The address applications submit to. Draining pods lose the submission label and drop out of it.
pub(super) fn submission_service(tenant: &SecureMailTenant, names: &TenantNames) -> Result<Service> {
    let mut selector = names.pod_selector();
    selector.insert(SUBMISSION_LABEL.to_owned(), "enabled".to_owned());
    Ok(Service {
        metadata: child_meta(tenant, names, names.submission_service(), "submission")?,
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![port(
                "submission",
                i32::from(tenant.spec.submission.port),
                SUBMISSION_CONTAINER_PORT,
            )]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// One pod at a time may be evicted: each holds its own queue and address.
pub(super) fn disruption_budget(tenant: &SecureMailTenant, names: &TenantNames) -> Result<PodDisruptionBudget> {
    Ok(PodDisruptionBudget {
        metadata: child_meta(tenant, names, names.mta(), "mta")?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names.pod_selector()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

/// Ingress: submission only from the tenant's own and its allowed namespaces; the admin port only from the
/// monitoring and operator namespaces. Egress: SMTP, DNS and HTTPS (MTA-STS policies) only, plus the SOCKS5 proxy
/// port on the pool addresses when the proxies send the mail, and on the addresses that left the pool while their
/// draining pods still send from them.
pub(super) fn network_policy(
    tenant: &SecureMailTenant,
    observed: &Observed,
    settings: &Settings,
    names: &TenantNames,
) -> Result<NetworkPolicy> {
    let own_namespace = tenant.metadata.namespace.clone().unwrap_or_default();
    let submitters = std::iter::once(own_namespace)
        .chain(tenant.spec.submission.allowed_namespaces.iter().cloned())
        .map(|namespace| namespace_peer(&namespace))
        .collect();
    let scrapers = [&settings.monitoring_namespace, &settings.operator_namespace]
        .into_iter()
        .map(|namespace| namespace_peer(namespace))
        .collect();
    Ok(NetworkPolicy {
        metadata: child_meta(tenant, names, names.mta(), "mta")?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(names.pod_selector()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned(), "Egress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(submitters),
                    ports: Some(vec![policy_port("TCP", SUBMISSION_CONTAINER_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: Some(scrapers),
                    ports: Some(vec![policy_port("TCP", i32::from(SIDECAR_ADMIN_PORT))]),
                },
            ]),
            egress: Some(egress_rules(tenant, observed)),
        }),
    })
}

fn egress_rules(tenant: &SecureMailTenant, observed: &Observed) -> Vec<NetworkPolicyEgressRule> {
    let mut rules = vec![NetworkPolicyEgressRule {
        to: None,
        ports: Some(vec![
            policy_port("TCP", 25),
            policy_port("UDP", 53),
            policy_port("TCP", 53),
            policy_port("TCP", 443),
        ]),
    }];
    let egress = &tenant.spec.ip_pool.egress;
    if egress.mode == EgressMode::Socks5Proxy {
        let addresses: std::collections::BTreeSet<&str> = tenant
            .spec
            .ip_pool
            .addresses
            .iter()
            .chain(observed.pods.iter().map(|pod| &pod.address))
            .map(|pool| pool.address.as_str())
            .collect();
        let proxies = addresses
            .into_iter()
            .map(|address| {
                let host_prefix = if address.contains(':') { 128 } else { 32 };
                NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: format!("{address}/{host_prefix}"),
                        except: None,
                    }),
                    ..NetworkPolicyPeer::default()
                }
            })
            .collect();
        rules.push(NetworkPolicyEgressRule {
            to: Some(proxies),
            ports: Some(vec![policy_port("TCP", i32::from(egress.proxy_port()))]),
        });
    }
    rules
}

fn port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

fn namespace_peer(namespace: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(
                [("kubernetes.io/metadata.name".to_owned(), namespace.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    }
}

fn policy_port(protocol: &str, port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some(protocol.to_owned()),
        port: Some(IntOrString::Int(port)),
        end_port: None,
    }
}
