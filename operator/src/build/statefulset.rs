//! The MTA StatefulSet: pod i sends from pool address i. Each pod runs Postfix (queue on the pod's volume) and the
//! sidecar (the only process talking to the Internet).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
    SeccompProfile, SecretProjection, SecretVolumeSource, SecurityContext, TopologySpreadConstraint, Volume,
    VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use securemail_api::SecureMailTenant;

use super::config::{
    DKIM_KEY_DIR, SIDECAR_ADMIN_PORT, SIDECAR_CONFIG_DIR, SIDECAR_DATA_DIR, SIDECAR_POSTFIX_QUEUE_DIR, is_sidecar_file,
    key_file,
};
use super::{Observed, Settings, child_meta};
use crate::names::{MTA_COMPONENT, SUBMISSION_LABEL, TenantNames, sha256_hex};
use crate::postfix;
use crate::{Error, Result};

/// Annotation with the SHA-256 of the ConfigMap's data: a config change rolls the pods.
pub const CONFIG_CHECKSUM_ANNOTATION: &str = "securemail.io/config-checksum";
/// Submission port inside the pod (the Service may expose another).
pub const SUBMISSION_CONTAINER_PORT: i32 = postfix::SUBMISSION_CONTAINER_PORT as i32;
/// Unprivileged user of the sidecar. The MTA image gives Postfix's mail_owner (`postfix`) this uid too, so the
/// sidecar can count the queue's 0700 subdirectories through its read-only mount without any other privilege.
const SIDECAR_UID: i64 = 65532;
/// Time for in-flight deliveries and Postfix's queue manager to finish before a pod is killed.
const TERMINATION_GRACE_SECONDS: i64 = 120;
/// The MTA image's readiness and liveness check (images/mta/ready), part of the image contract.
const MTA_READY_COMMAND: &str = "/usr/local/sbin/securemail-mta-ready";
/// Postfix needs root plus these capabilities (and nothing else): changing queue file ownership and permissions
/// (CHOWN, DAC_OVERRIDE, FOWNER), dropping to its unprivileged users (SETUID, SETGID), binding port 587
/// (NET_BIND_SERVICE) and signalling its own daemons (KILL). See docs/security.md.
const POSTFIX_CAPABILITIES: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "NET_BIND_SERVICE",
    "KILL",
];

pub(super) fn stateful_set(
    tenant: &SecureMailTenant,
    observed: &Observed,
    settings: &Settings,
    names: &TenantNames,
    config_map: &ConfigMap,
) -> Result<StatefulSet> {
    let spec = &tenant.spec;
    let replicas = i32::try_from(observed.pods.len()).map_err(|_| Error::InvalidSpec("pool too large".to_owned()))?;
    let mut pod_labels = names.pod_selector();
    pod_labels.extend(names.labels(MTA_COMPONENT));
    pod_labels.insert(SUBMISSION_LABEL.to_owned(), "enabled".to_owned());
    let pod_annotations = BTreeMap::from([(CONFIG_CHECKSUM_ANNOTATION.to_owned(), config_checksum(config_map))]);

    // Every egress mode runs on the pod network. HostNetwork and Multus, refused by the CRD but possibly still
    // stored, render like None: host-network pods would break the namespace's Pod Security level and could not be
    // pinned to the node owning each address, and one network attachment on the template cannot give pod i address i.
    let pod_spec = PodSpec {
        service_account_name: Some(names.mta()),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            fs_group: Some(SIDECAR_UID),
            fs_group_change_policy: Some("OnRootMismatch".to_owned()),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..PodSecurityContext::default()
        }),
        // The platform's placement (e.g. the egress nodes and their taints) beside the operator's spread below.
        node_selector: (!spec.mta.node_selector.is_empty()).then(|| spec.mta.node_selector.clone()),
        tolerations: (!spec.mta.tolerations.is_empty()).then(|| spec.mta.tolerations.clone()),
        affinity: spec.mta.affinity.clone(),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".to_owned(),
            when_unsatisfiable: "ScheduleAnyway".to_owned(),
            label_selector: Some(LabelSelector {
                match_labels: Some(names.pod_selector()),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        }]),
        containers: vec![postfix_container(tenant, settings), sidecar_container(tenant, settings)],
        volumes: Some(volumes(tenant, observed, names)),
        ..PodSpec::default()
    };

    Ok(StatefulSet {
        metadata: child_meta(tenant, names, names.mta(), "mta")?,
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.mta()),
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(names.pod_selector()),
                ..LabelSelector::default()
            },
            // Volumes may hold queued mail: Kubernetes never deletes them; the operator does after a drain.
            persistent_volume_claim_retention_policy: Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
                when_deleted: Some("Retain".to_owned()),
                when_scaled: Some("Retain".to_owned()),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_VOLUME.to_owned()),
                    labels: Some(names.labels("mta-data")),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    storage_class_name: spec.mta.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([("storage".to_owned(), spec.mta.storage.size.clone())])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

const DATA_VOLUME: &str = "data";
const CONFIG_VOLUME: &str = "config";
const DKIM_VOLUME: &str = "dkim-keys";
const SUBMISSION_TLS_VOLUME: &str = "submission-tls";
const CLIENT_CA_VOLUME: &str = "client-ca";
const POSTFIX_RUNTIME_VOLUME: &str = "postfix-runtime";
const SIDECAR_RUN_VOLUME: &str = "sidecar-run";
/// Name of the sidecar's container in every MTA pod.
pub const SIDECAR_CONTAINER: &str = "sidecar";

fn postfix_container(tenant: &SecureMailTenant, settings: &Settings) -> Container {
    Container {
        name: "postfix".to_owned(),
        image: Some(
            tenant
                .spec
                .mta
                .image
                .clone()
                .unwrap_or_else(|| settings.mta_image.clone()),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("submission".to_owned()),
            container_port: SUBMISSION_CONTAINER_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        resources: tenant.spec.mta.resources.clone(),
        startup_probe: Some(startup(mta_probe(1))),
        readiness_probe: Some(mta_probe(5)),
        liveness_probe: Some(mta_probe(30)),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: Some(POSTFIX_CAPABILITIES.iter().map(|cap| (*cap).to_owned()).collect()),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(DATA_VOLUME, postfix::QUEUE_DIRECTORY, Some("postfix")),
            mount(POSTFIX_RUNTIME_VOLUME, postfix::DATA_DIRECTORY, None),
            mount(SIDECAR_RUN_VOLUME, postfix::SIDECAR_RUN_DIR, None),
            config_file_mount("/etc/postfix/main.cf", "main.cf"),
            config_file_mount("/etc/postfix/master.cf", "master.cf"),
            mount(SUBMISSION_TLS_VOLUME, postfix::SUBMISSION_TLS_DIR, None),
            mount(CLIENT_CA_VOLUME, postfix::CLIENT_CA_DIR, None),
        ]),
        ..Container::default()
    }
}

fn sidecar_container(tenant: &SecureMailTenant, settings: &Settings) -> Container {
    Container {
        name: SIDECAR_CONTAINER.to_owned(),
        image: Some(
            tenant
                .spec
                .mta
                .sidecar_image
                .clone()
                .unwrap_or_else(|| settings.sidecar_image.clone()),
        ),
        args: Some(vec![
            "run".to_owned(),
            "--config".to_owned(),
            // Kubernetes expands $(POD_INDEX) from the environment below: each pod reads its own file.
            format!("{SIDECAR_CONFIG_DIR}/sidecar-$(POD_INDEX).yaml"),
        ]),
        env: Some(vec![EnvVar {
            name: "POD_INDEX".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.labels['apps.kubernetes.io/pod-index']".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("admin".to_owned()),
            container_port: i32::from(SIDECAR_ADMIN_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        resources: tenant.spec.mta.sidecar_resources.clone(),
        startup_probe: Some(startup(http_probe("/livez", 1))),
        readiness_probe: Some(http_probe("/readyz", 5)),
        liveness_probe: Some(http_probe("/livez", 30)),
        // Pod Security "restricted".
        security_context: Some(SecurityContext {
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount(DATA_VOLUME, SIDECAR_DATA_DIR, Some("sidecar")),
            // Postfix's queue, only counted (metrics, `/status`), never changed: read-only. Its subdirectories are
            // 0700 for mail_owner, which has the sidecar's uid in the MTA image.
            VolumeMount {
                read_only: Some(true),
                ..mount(DATA_VOLUME, SIDECAR_POSTFIX_QUEUE_DIR, Some("postfix"))
            },
            mount(SIDECAR_RUN_VOLUME, postfix::SIDECAR_RUN_DIR, None),
            mount(CONFIG_VOLUME, SIDECAR_CONFIG_DIR, None),
            mount(DKIM_VOLUME, DKIM_KEY_DIR, None),
        ]),
        ..Container::default()
    }
}

fn volumes(tenant: &SecureMailTenant, observed: &Observed, names: &TenantNames) -> Vec<Volume> {
    let submission = &tenant.spec.submission;
    let submission_secret = super::submission_tls_secret(tenant, names);
    let key_projections = observed
        .signing_keys
        .iter()
        .map(|key| VolumeProjection {
            secret: Some(SecretProjection {
                name: key.secret_name.clone(),
                items: Some(vec![KeyToPath {
                    key: crate::dkim::PRIVATE_KEY_FIELD.to_owned(),
                    path: key_file(&key.secret_name)
                        .trim_start_matches(DKIM_KEY_DIR)
                        .trim_start_matches('/')
                        .to_owned(),
                    mode: Some(0o440),
                }]),
                optional: Some(false),
            }),
            ..VolumeProjection::default()
        })
        .collect();
    vec![
        Volume {
            name: CONFIG_VOLUME.to_owned(),
            // Every key as a file of its name. Not listed one by one: the list would name each pod's sidecar file,
            // and a pool change would then change the pod template and restart every pod.
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: DKIM_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(key_projections),
                default_mode: Some(0o440),
            }),
            ..Volume::default()
        },
        Volume {
            name: SUBMISSION_TLS_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(submission_secret),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: CLIENT_CA_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(submission.client_certificates.ca_secret_name.clone()),
                items: Some(vec![KeyToPath {
                    key: "ca.crt".to_owned(),
                    path: "ca.crt".to_owned(),
                    mode: None,
                }]),
                default_mode: Some(0o444),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: POSTFIX_RUNTIME_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        Volume {
            name: SIDECAR_RUN_VOLUME.to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".to_owned()),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
    ]
}

/// SHA-256 over the ConfigMap's files a running pod cannot take up, in key order (BTreeMap), hex-encoded: a change
/// to them rolls the pods. The sidecars' own files are left out: each sidecar reloads its file when the kubelet
/// updates the mounted directory, so a pool change or the next warmup day (both in those files) restarts no pod.
fn config_checksum(config_map: &ConfigMap) -> String {
    let mut bytes = Vec::new();
    let needs_restart = config_map
        .data
        .iter()
        .flatten()
        .filter(|(key, _)| !is_sidecar_file(key));
    for (key, value) in needs_restart {
        bytes.extend_from_slice(key.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(value.as_bytes());
        bytes.push(0);
    }
    sha256_hex(&bytes)
}

fn mount(volume: &str, path: &str, sub_path: Option<&str>) -> VolumeMount {
    VolumeMount {
        name: volume.to_owned(),
        mount_path: path.to_owned(),
        sub_path: sub_path.map(str::to_owned),
        read_only: Some(!matches!(
            volume,
            DATA_VOLUME | POSTFIX_RUNTIME_VOLUME | SIDECAR_RUN_VOLUME
        )),
        ..VolumeMount::default()
    }
}

/// A single file from the config volume (subPath mounts do not see ConfigMap updates: the checksum annotation
/// rolls the pods when one of these changes).
fn config_file_mount(path: &str, key: &str) -> VolumeMount {
    VolumeMount {
        name: CONFIG_VOLUME.to_owned(),
        mount_path: path.to_owned(),
        sub_path: Some(key.to_owned()),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}

/// The MTA image's own check (docs/images.md): Postfix's master runs and the submission port listens, read from the
/// process table and /proc/net. A TCP probe would make smtpd log a connection every few seconds.
fn mta_probe(period_seconds: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(vec![
                MTA_READY_COMMAND.to_owned(),
                SUBMISSION_CONTAINER_PORT.to_string(),
            ]),
        }),
        period_seconds: Some(period_seconds),
        // It runs postconf; a busy node must not turn a slow start of a process into an unready pod.
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

/// How long a container may take to start before the kubelet restarts it.
const STARTUP_SECONDS: i32 = 120;

/// A start-up probe asked every second: the pod is Ready a second after its containers are, instead of at the next
/// readiness period, and liveness is not judged before the container has started.
fn startup(probe: Probe) -> Probe {
    let period = probe.period_seconds.unwrap_or(1).max(1);
    Probe {
        failure_threshold: Some(STARTUP_SECONDS / period),
        ..probe
    }
}

fn http_probe(path: &str, period_seconds: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(SIDECAR_ADMIN_PORT)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        ..Probe::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Toleration,
    };
    use securemail_api::tenant::{EgressMode, PoolAddress};

    use super::*;
    use crate::build::config::{TRUST_ANCHORS_FILE, sidecar_file};
    use crate::build::{PodAssignment, children};

    fn minimal() -> SecureMailTenant {
        let mut tenant: SecureMailTenant =
            serde_yaml::from_str(include_str!("../../../examples/minimal.yaml")).expect("the minimal example parses");
        tenant.metadata.uid = Some("0f5c2a5e-uid".to_owned());
        tenant
    }

    /// The minimal example's one pod, on warmup day 1.
    fn one_pod() -> Observed {
        Observed {
            today: jiff::civil::date(2026, 12, 3),
            signing_keys: Vec::new(),
            pods: vec![PodAssignment {
                ordinal: 0,
                address: PoolAddress {
                    address: "192.0.2.10".to_owned(),
                    hostname: "mta1.notify.lakeside-clinic.example".to_owned(),
                },
                warmup_day: Some(1),
                daily_limit: Some(50),
                draining: false,
            }],
        }
    }

    fn built(tenant: &SecureMailTenant) -> StatefulSet {
        children(tenant, &one_pod(), &Settings::default())
            .expect("builds")
            .stateful_set
    }

    fn pod_spec(stateful_set: &StatefulSet) -> &PodSpec {
        stateful_set
            .spec
            .as_ref()
            .and_then(|spec| spec.template.spec.as_ref())
            .expect("a pod template")
    }

    fn egress_nodes() -> SecureMailTenant {
        let mut tenant = minimal();
        let mta = &mut tenant.spec.mta;
        mta.node_selector = BTreeMap::from([("node-role.example.org/mail-egress".to_owned(), "true".to_owned())]);
        mta.tolerations = vec![Toleration {
            key: Some("node-role.example.org/mail-egress".to_owned()),
            operator: Some("Exists".to_owned()),
            effect: Some("NoSchedule".to_owned()),
            ..Toleration::default()
        }];
        mta.affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "topology.kubernetes.io/zone".to_owned(),
                            operator: "In".to_owned(),
                            values: Some(vec!["zone-a".to_owned()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
                ..NodeAffinity::default()
            }),
            ..Affinity::default()
        });
        tenant
    }

    fn checksum(stateful_set: &StatefulSet) -> String {
        stateful_set
            .spec
            .as_ref()
            .and_then(|spec| spec.template.metadata.as_ref())
            .and_then(|meta| meta.annotations.as_ref())
            .and_then(|annotations| annotations.get(CONFIG_CHECKSUM_ANNOTATION))
            .cloned()
            .expect("the config checksum annotation")
    }

    #[test]
    fn only_what_a_running_pod_cannot_reload_changes_the_pod_template() {
        let tenant = minimal();
        let settings = Settings::default();
        let first = children(&tenant, &one_pod(), &settings).expect("builds");
        // The next warmup day and a draining pod change only the sidecars' files, which the sidecars reload.
        let mut next_day = one_pod();
        next_day.pods[0].warmup_day = Some(2);
        next_day.pods[0].daily_limit = Some(100);
        next_day.pods.push(PodAssignment {
            ordinal: 1,
            address: PoolAddress {
                address: "192.0.2.11".to_owned(),
                hostname: "mta2.notify.lakeside-clinic.example".to_owned(),
            },
            warmup_day: None,
            daily_limit: None,
            draining: true,
        });
        let second = children(&tenant, &next_day, &settings).expect("builds");
        assert_ne!(
            first.config_map.data, second.config_map.data,
            "the sidecar files changed"
        );
        let template =
            |children: &crate::build::Children| children.stateful_set.spec.as_ref().map(|spec| spec.template.clone());
        assert_eq!(
            template(&first),
            template(&second),
            "the pod template, so no pod restarts"
        );
        // Postfix reads main.cf once, at start: a change to it rolls the pods.
        let mut renamed = tenant.clone();
        renamed.spec.domains[0].name = "notify.lakeside-health.example".to_owned();
        let third = children(&renamed, &one_pod(), &settings).expect("builds");
        assert_ne!(
            first.config_map.data.as_ref().and_then(|data| data.get("main.cf")),
            third.config_map.data.as_ref().and_then(|data| data.get("main.cf"))
        );
        assert_ne!(checksum(&first.stateful_set), checksum(&third.stateful_set));
    }

    #[test]
    fn placement_reaches_the_pod_template_beside_the_spread_over_nodes() {
        let tenant = egress_nodes();
        let stateful_set = built(&tenant);
        let pod = pod_spec(&stateful_set);
        assert_eq!(pod.node_selector.as_ref(), Some(&tenant.spec.mta.node_selector));
        assert_eq!(pod.tolerations.as_ref(), Some(&tenant.spec.mta.tolerations));
        assert_eq!(pod.affinity, tenant.spec.mta.affinity);
        let spread = pod.topology_spread_constraints.as_deref().unwrap_or_default();
        assert_eq!(
            spread
                .iter()
                .map(|constraint| constraint.topology_key.as_str())
                .collect::<Vec<_>>(),
            ["kubernetes.io/hostname"]
        );

        let unplaced = built(&minimal());
        let unplaced_pod = pod_spec(&unplaced);
        assert_eq!(
            (
                &unplaced_pod.node_selector,
                &unplaced_pod.tolerations,
                &unplaced_pod.affinity
            ),
            (&None, &None, &None),
            "no placement asked, none written (the scheduler's defaults apply)"
        );
        assert_eq!(
            unplaced_pod.topology_spread_constraints,
            pod.topology_spread_constraints
        );
    }

    /// Placement lives in the pod template only: changing it rolls the pods like any template change, and the volume
    /// claims (the queues) stay as they are.
    #[test]
    fn changing_placement_changes_only_the_pod_template() {
        let placed = built(&egress_nodes());
        let unplaced = built(&minimal());
        let (placed, unplaced) = (placed.spec.expect("spec"), unplaced.spec.expect("spec"));
        assert_ne!(placed.template, unplaced.template);
        assert_eq!(
            placed.update_strategy, None,
            "RollingUpdate, the default, rolls the pods on a template change"
        );
        let retention = placed
            .persistent_volume_claim_retention_policy
            .clone()
            .unwrap_or_default();
        assert_eq!(
            (retention.when_deleted.as_deref(), retention.when_scaled.as_deref()),
            (Some("Retain"), Some("Retain"))
        );
        assert_eq!(
            StatefulSetSpec {
                template: PodTemplateSpec::default(),
                ..placed
            },
            StatefulSetSpec {
                template: PodTemplateSpec::default(),
                ..unplaced
            }
        );
    }

    #[test]
    fn a_stored_host_network_tenant_gets_the_pod_network_like_egress_mode_none() {
        let mut host_network = minimal();
        host_network.spec.ip_pool.egress.mode = EgressMode::HostNetwork;
        let stateful_set = built(&host_network);
        let pod = pod_spec(&stateful_set);
        assert_eq!((pod.host_network, pod.dns_policy.as_deref()), (None, None));
        assert_eq!(stateful_set, built(&minimal()));
    }

    #[test]
    fn a_socks5_tenant_sends_through_the_proxy_on_each_address_and_may_reach_it() {
        let mut proxied = minimal();
        proxied.spec.ip_pool.egress.mode = EgressMode::Socks5Proxy;
        proxied.spec.ip_pool.egress.proxy_port = Some(1081);
        let observed = one_pod();
        let settings = Settings {
            sidecar_dns: crate::build::SidecarDns {
                nameservers: vec!["10.0.0.53:53".parse().expect("address")],
                trust_anchors: Some(". 3600 IN DS 1 8 2 00".to_owned()),
            },
            ..Settings::default()
        };
        let built = children(&proxied, &observed, &settings).expect("builds");

        let data = built.config_map.data.clone().unwrap_or_default();
        let sidecar_yaml = &data[&sidecar_file(0)];
        assert!(
            sidecar_yaml.contains("egress:\n  mode: socks5Proxy\n  proxy: 192.0.2.10:1081\n"),
            "{sidecar_yaml}"
        );
        assert!(sidecar_yaml.contains("10.0.0.53:53"), "{sidecar_yaml}");
        assert!(sidecar_yaml.contains(&format!("{SIDECAR_CONFIG_DIR}/{TRUST_ANCHORS_FILE}")));
        assert_eq!(data[TRUST_ANCHORS_FILE], ". 3600 IN DS 1 8 2 00");
        // Every key of the ConfigMap is a file in the sidecar's config directory.
        let pod = pod_spec(&built.stateful_set);
        let whole_map = pod
            .volumes
            .iter()
            .flatten()
            .find(|volume| volume.name == CONFIG_VOLUME)
            .and_then(|volume| volume.config_map.as_ref())
            .is_some_and(|config_map| config_map.items.is_none());
        let sidecar_mount = pod
            .containers
            .iter()
            .flat_map(|container| container.volume_mounts.iter().flatten())
            .any(|mount| mount.name == CONFIG_VOLUME && mount.mount_path == SIDECAR_CONFIG_DIR);
        assert!(whole_map && sidecar_mount, "the trust anchors reach the sidecar");

        let rules = built
            .network_policy
            .spec
            .and_then(|spec| spec.egress)
            .unwrap_or_default();
        let proxy_rule = rules.last().expect("egress rules");
        let peers: Vec<_> = proxy_rule
            .to
            .iter()
            .flatten()
            .filter_map(|peer| peer.ip_block.as_ref().map(|block| block.cidr.clone()))
            .collect();
        assert_eq!(peers, ["192.0.2.10/32"]);
        assert_eq!(
            proxy_rule.ports.as_ref().and_then(|ports| ports[0].port.clone()),
            Some(IntOrString::Int(1081))
        );
        // A draining pod still sends from the address that left the pool, through the proxy there.
        let mut draining = observed.clone();
        draining.pods.push(PodAssignment {
            ordinal: 1,
            address: PoolAddress {
                address: "192.0.2.99".to_owned(),
                hostname: "mta9.notify.lakeside-clinic.example".to_owned(),
            },
            warmup_day: None,
            daily_limit: None,
            draining: true,
        });
        let while_draining = children(&proxied, &draining, &settings).expect("builds");
        let rules = while_draining
            .network_policy
            .spec
            .and_then(|spec| spec.egress)
            .unwrap_or_default();
        let peers: Vec<_> = rules
            .last()
            .and_then(|rule| rule.to.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|peer| peer.ip_block.map(|block| block.cidr))
            .collect();
        assert_eq!(peers, ["192.0.2.10/32", "192.0.2.99/32"]);

        let direct = children(&minimal(), &observed, &Settings::default()).expect("builds");
        let direct_yaml = &direct.config_map.data.unwrap_or_default()[&sidecar_file(0)];
        assert!(!direct_yaml.contains("egress"), "Direct is the default: {direct_yaml}");
        let direct_rules = direct
            .network_policy
            .spec
            .and_then(|spec| spec.egress)
            .unwrap_or_default();
        assert_eq!(direct_rules.len(), 1, "no proxy rule without a proxy");
    }
}
