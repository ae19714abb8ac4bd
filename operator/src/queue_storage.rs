//! Whether the MTA pods' queue volumes are encrypted at rest. Deferred mail (message content, PHI) sits on them for
//! as long as delivery is retried, so the StorageClass they come from matters: the operator resolves it (the spec's
//! `storageClassName`, or the cluster default the apiserver would give the claims), decides from a small table of
//! provisioners and their settings, or from a platform team's attestation, whether it encrypts, and reports that in
//! the `QueueStorageEncrypted` condition. With `spec.mta.storage.requireEncryptionAtRest` the answer also gates new
//! volumes. Pure: the reconcile loop passes the cached StorageClasses in.

use std::sync::Arc;

use k8s_openapi::api::storage::v1::StorageClass;
use securemail_api::tenant::QueueStorage;

use crate::drain::claim_name;
use crate::names::TenantNames;
use crate::status::{ConditionUpdate, QUEUE_STORAGE_ENCRYPTED};

/// The platform team's statement that volumes of a StorageClass are encrypted at rest by means SecureMail cannot see
/// (LUKS-backed local disks, self-encrypting drives, an array encrypting everything, account-wide EBS encryption by
/// default). Only the exact value `"true"` counts. It is an attestation, not a check: whoever may annotate
/// StorageClasses (cluster-scoped, normally only cluster administrators) vouches for it.
pub const ATTESTATION_ANNOTATION: &str = "securemail.io/encrypted-at-rest";
/// The annotation that marks the cluster's default StorageClass, and its beta spelling, which the apiserver's
/// DefaultStorageClass admission still honours.
pub const DEFAULT_CLASS_ANNOTATIONS: [&str; 2] = [
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
];

/// What makes a provisioner's volumes encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encrypts {
    /// Every volume, whatever the parameters (the cloud encrypts every disk).
    Always,
    /// Only with this StorageClass parameter set to this value.
    WithParameter(&'static str, &'static str),
}

/// A provisioner known to encrypt, with the vendor documentation that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownProvisioner {
    pub provisioner: &'static str,
    pub encrypts: Encrypts,
    pub source: &'static str,
}

/// Provisioners whose encryption at rest their vendors document. Small on purpose: anything else is "not known to
/// encrypt" until the platform team attests it with [`ATTESTATION_ANNOTATION`]. docs/security.md carries this table.
pub const KNOWN_PROVISIONERS: &[KnownProvisioner] = &[
    KnownProvisioner {
        provisioner: "ebs.csi.aws.com",
        encrypts: Encrypts::WithParameter("encrypted", "true"),
        source: "AWS EBS CSI driver StorageClass parameters (encrypted, kmsKeyId)",
    },
    KnownProvisioner {
        provisioner: "pd.csi.storage.gke.io",
        encrypts: Encrypts::Always,
        source: "Google Compute Engine encrypts every persistent disk at rest (Google-managed keys by default, \
                 disk-encryption-kms-key for CMEK)",
    },
    KnownProvisioner {
        provisioner: "disk.csi.azure.com",
        encrypts: Encrypts::Always,
        source: "Azure server-side encryption of managed disks, on by default with platform-managed keys",
    },
    KnownProvisioner {
        provisioner: "rbd.csi.ceph.com",
        encrypts: Encrypts::WithParameter("encrypted", "true"),
        source: "Ceph CSI RBD StorageClass parameter encrypted (LUKS, key from encryptionKMSID)",
    },
    KnownProvisioner {
        provisioner: "driver.longhorn.io",
        encrypts: Encrypts::WithParameter("encrypted", "true"),
        source: "Longhorn volume encryption (dm-crypt; key in the Secret the StorageClass names)",
    },
];

/// Why a StorageClass is or is not taken as encrypting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A known provisioner, with its encryption setting where it needs one.
    Provisioner {
        provisioner: String,
        setting: Option<String>,
    },
    /// The platform team's annotation.
    Attested,
    /// Neither; `hint` says what the class lacks when its provisioner is known.
    NotKnown { provisioner: String, hint: Option<String> },
}

impl Verdict {
    pub fn encrypts(&self) -> bool {
        !matches!(self, Verdict::NotKnown { .. })
    }
}

/// Decides from a StorageClass's provisioner, parameters and annotations whether its volumes are encrypted at rest.
pub fn classify(class: &StorageClass) -> Verdict {
    let provisioner = class.provisioner.clone();
    let known = KNOWN_PROVISIONERS.iter().find(|known| known.provisioner == provisioner);
    let parameter = |key: &str| class.parameters.as_ref().and_then(|parameters| parameters.get(key));
    let hint = match known.map(|known| known.encrypts) {
        Some(Encrypts::Always) => {
            return Verdict::Provisioner {
                provisioner,
                setting: None,
            };
        }
        Some(Encrypts::WithParameter(key, value)) if parameter(key).map(String::as_str) == Some(value) => {
            return Verdict::Provisioner {
                provisioner,
                setting: Some(format!("{key}: \"{value}\"")),
            };
        }
        Some(Encrypts::WithParameter(key, value)) => Some(match parameter(key) {
            Some(other) => format!("its parameter {key} is \"{other}\", not \"{value}\""),
            None => format!("it lacks the parameter {key}: \"{value}\""),
        }),
        None => None,
    };
    let attested = class
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(ATTESTATION_ANNOTATION))
        .is_some_and(|value| value == "true");
    if attested {
        return Verdict::Attested;
    }
    Verdict::NotKnown { provisioner, hint }
}

/// The StorageClass the queue volumes come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved {
    /// Named by the spec.
    Named(Arc<StorageClass>),
    /// The cluster default, which the apiserver gives claims that name no class.
    Default(Arc<StorageClass>),
    /// The spec names a class that does not exist.
    NotFound(String),
    /// No class named and none is the default.
    NoDefault,
}

/// The class a new claim of the volume claim template gets: the named one, or the default the apiserver's
/// DefaultStorageClass admission picks (the newest default class, then the first by name).
pub fn resolve(storage: &QueueStorage, classes: &[Arc<StorageClass>]) -> Resolved {
    if let Some(name) = &storage.storage_class_name {
        return classes
            .iter()
            .find(|class| class.metadata.name.as_ref() == Some(name))
            .map_or_else(
                || Resolved::NotFound(name.clone()),
                |class| Resolved::Named(Arc::clone(class)),
            );
    }
    let is_default = |class: &&Arc<StorageClass>| {
        let annotations = class.metadata.annotations.as_ref();
        DEFAULT_CLASS_ANNOTATIONS.iter().any(|key| {
            annotations
                .and_then(|annotations| annotations.get(*key))
                .map(String::as_str)
                == Some("true")
        })
    };
    classes
        .iter()
        .filter(is_default)
        .max_by(|a, b| {
            let created = |class: &StorageClass| class.metadata.creation_timestamp.as_ref().map(|time| time.0);
            // Newest first, then the smaller name: reversed for `max_by`.
            created(a)
                .cmp(&created(b))
                .then_with(|| b.metadata.name.cmp(&a.metadata.name))
        })
        .map_or(Resolved::NoDefault, |class| Resolved::Default(Arc::clone(class)))
}

/// Marks a message whose condition holds back new pods and volumes; the reconcile loop publishes a Warning event
/// when a condition starts to carry it.
pub const HOLD_NOTE: &str = "spec.mta.storage.requireEncryptionAtRest is true";

/// `QueueStorageEncrypted`: True when the class is known (or attested) to encrypt, False naming the class and what
/// to do, Unknown when the class cannot be found. `pods` is the number of MTA pods (claims) the pool asks for.
pub fn condition(resolved: &Resolved, storage: &QueueStorage, names: &TenantNames, pods: u32) -> ConditionUpdate {
    let volumes = volumes(names, pods);
    let (class, how) = match resolved {
        Resolved::Named(class) => (class, "StorageClass"),
        Resolved::Default(class) => (class, "the cluster's default StorageClass"),
        Resolved::NotFound(name) => {
            let message = format!(
                "{volumes} name StorageClass {name} (spec.mta.storage.storageClassName), which does not exist: \
                 the claims cannot be provisioned and whether they would be encrypted at rest is unknown; create \
                 {name} or name an existing StorageClass that encrypts"
            );
            return ConditionUpdate::unknown(QUEUE_STORAGE_ENCRYPTED, "StorageClassNotFound", held(message, storage));
        }
        Resolved::NoDefault => {
            let message = format!(
                "{volumes} name no StorageClass (spec.mta.storage.storageClassName is unset) and the cluster has \
                 no default StorageClass (annotation {}: \"true\"): whether they would be encrypted at rest is \
                 unknown; name a StorageClass that encrypts in spec.mta.storage.storageClassName",
                DEFAULT_CLASS_ANNOTATIONS[0]
            );
            return ConditionUpdate::unknown(QUEUE_STORAGE_ENCRYPTED, "NoDefaultStorageClass", held(message, storage));
        }
    };
    let name = class.metadata.name.as_deref().unwrap_or_default();
    match classify(class) {
        Verdict::Provisioner { provisioner, setting } => {
            let why = match setting {
                Some(setting) => format!("provisioner {provisioner} with {setting}"),
                None => format!("provisioner {provisioner}, which encrypts every volume"),
            };
            ConditionUpdate::new(
                QUEUE_STORAGE_ENCRYPTED,
                true,
                "EncryptingStorageClass",
                format!("{volumes} use {how} {name}, which encrypts at rest: {why}"),
            )
        }
        Verdict::Attested => ConditionUpdate::new(
            QUEUE_STORAGE_ENCRYPTED,
            true,
            "EncryptionAttested",
            format!(
                "{volumes} use {how} {name}, which the platform team attests encrypts at rest (annotation \
                 {ATTESTATION_ANNOTATION}: \"true\")"
            ),
        ),
        Verdict::NotKnown { provisioner, hint } => {
            let lacks = hint.map(|hint| format!(": {hint}")).unwrap_or_default();
            let message = format!(
                "{volumes} use {how} {name} (provisioner {provisioner}), which is not known to encrypt at \
                 rest{lacks}; queued mail on them may be stored unencrypted. Use a StorageClass that encrypts \
                 (docs/security.md lists the known provisioners and settings), or, if {name} does encrypt (e.g. \
                 LUKS-backed disks), have the platform team annotate it {ATTESTATION_ANNOTATION}: \"true\""
            );
            ConditionUpdate::new(
                QUEUE_STORAGE_ENCRYPTED,
                false,
                "StorageClassNotKnownToEncrypt",
                held(message, storage),
            )
        }
    }
}

/// Whether the condition holds back new MTA pods and volumes: encryption is required and not established.
pub fn holds(update: &ConditionUpdate, storage: &QueueStorage) -> bool {
    storage.require_encryption_at_rest && update.status != Some(true)
}

fn held(message: String, storage: &QueueStorage) -> String {
    if storage.require_encryption_at_rest {
        format!("{message}. {HOLD_NOTE}: no new MTA pod or queue volume is created until then; existing ones are kept")
    } else {
        message
    }
}

/// "queue volumes (volume claim template data: claims data-t-mta-0 to data-t-mta-2)".
fn volumes(names: &TenantNames, pods: u32) -> String {
    let claims = match pods {
        0 => "no claims yet".to_owned(),
        1 => format!("claim {}", claim_name(names, 0)),
        n => format!("claims {} to {}", claim_name(names, 0), claim_name(names, n - 1)),
    };
    format!(
        "queue volumes (volume claim template data of StatefulSet {}: {claims})",
        names.mta()
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    fn class(name: &str, provisioner: &str, parameters: &[(&str, &str)], annotations: &[(&str, &str)]) -> StorageClass {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>()
            })
        };
        StorageClass {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                annotations: map(annotations),
                ..ObjectMeta::default()
            },
            provisioner: provisioner.to_owned(),
            parameters: map(parameters),
            ..StorageClass::default()
        }
    }

    fn storage(name: Option<&str>, required: bool) -> QueueStorage {
        QueueStorage {
            storage_class_name: name.map(str::to_owned),
            require_encryption_at_rest: required,
            ..QueueStorage::default()
        }
    }

    #[test]
    fn each_known_provisioner_encrypts_only_with_its_setting() {
        for known in KNOWN_PROVISIONERS {
            let bare = classify(&class("c", known.provisioner, &[], &[]));
            match known.encrypts {
                Encrypts::Always => assert!(bare.encrypts(), "{}", known.provisioner),
                Encrypts::WithParameter(key, value) => {
                    assert!(!bare.encrypts(), "{} without {key}", known.provisioner);
                    let set = classify(&class("c", known.provisioner, &[(key, value)], &[]));
                    assert_eq!(
                        set,
                        Verdict::Provisioner {
                            provisioner: known.provisioner.to_owned(),
                            setting: Some(format!("{key}: \"{value}\"")),
                        }
                    );
                    let off = classify(&class("c", known.provisioner, &[(key, "false")], &[]));
                    assert!(!off.encrypts(), "{} with {key}: false", known.provisioner);
                }
            }
        }
    }

    #[test]
    fn the_table_names_each_provisioner_once_with_a_source() {
        let mut names: Vec<&str> = KNOWN_PROVISIONERS.iter().map(|known| known.provisioner).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KNOWN_PROVISIONERS.len());
        assert!(KNOWN_PROVISIONERS.iter().all(|known| !known.source.is_empty()));
    }

    #[test]
    fn an_unknown_provisioner_encrypts_only_when_attested_with_exactly_true() {
        let local = class("local", "rancher.io/local-path", &[("encrypted", "true")], &[]);
        assert_eq!(
            classify(&local),
            Verdict::NotKnown {
                provisioner: "rancher.io/local-path".to_owned(),
                hint: None
            },
            "a parameter means nothing to a provisioner not in the table"
        );
        let attested = class(
            "luks",
            "rancher.io/local-path",
            &[],
            &[(ATTESTATION_ANNOTATION, "true")],
        );
        assert_eq!(classify(&attested), Verdict::Attested);
        for value in ["yes", "True", "false", ""] {
            let vague = class("luks", "rancher.io/local-path", &[], &[(ATTESTATION_ANNOTATION, value)]);
            assert!(!classify(&vague).encrypts(), "{value:?}");
        }
        // The attestation also covers a known provisioner encrypting by other means (EBS encryption by default).
        let by_default = class("gp3", "ebs.csi.aws.com", &[], &[(ATTESTATION_ANNOTATION, "true")]);
        assert_eq!(classify(&by_default), Verdict::Attested);
    }

    #[test]
    fn the_default_class_is_the_newest_default_then_the_first_by_name() {
        let at = |second| Some(Time(jiff::Timestamp::from_second(second).expect("time")));
        let default = |name: &str, second| {
            let mut class = class(name, "x", &[], &[(DEFAULT_CLASS_ANNOTATIONS[0], "true")]);
            class.metadata.creation_timestamp = at(second);
            Arc::new(class)
        };
        let mut beta = class("beta", "x", &[], &[(DEFAULT_CLASS_ANNOTATIONS[1], "true")]);
        beta.metadata.creation_timestamp = at(50);
        let not_default = Arc::new(class("newest", "x", &[], &[(DEFAULT_CLASS_ANNOTATIONS[0], "false")]));
        let classes = vec![default("old", 10), Arc::new(beta), not_default];
        let name = |resolved: Resolved| match resolved {
            Resolved::Default(class) | Resolved::Named(class) => class.metadata.name.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(name(resolve(&storage(None, false), &classes)).as_deref(), Some("beta"));
        let tied = vec![default("zeta", 10), default("alpha", 10)];
        assert_eq!(name(resolve(&storage(None, false), &tied)).as_deref(), Some("alpha"));
        assert_eq!(resolve(&storage(None, false), &classes[2..]), Resolved::NoDefault);
        assert_eq!(
            name(resolve(&storage(Some("newest"), false), &classes)).as_deref(),
            Some("newest")
        );
        assert_eq!(
            resolve(&storage(Some("gone"), false), &classes),
            Resolved::NotFound("gone".to_owned())
        );
    }

    #[test]
    fn the_condition_names_the_claims_the_class_and_what_to_do() {
        let names = TenantNames::new("lakeside");
        let plain = Arc::new(class("standard", "rancher.io/local-path", &[], &[]));
        let informational = condition(
            &Resolved::Named(Arc::clone(&plain)),
            &storage(Some("standard"), false),
            &names,
            2,
        );
        assert_eq!(informational.status, Some(false));
        assert_eq!(informational.reason, "StorageClassNotKnownToEncrypt");
        for part in [
            "volume claim template data of StatefulSet lakeside-mta",
            "claims data-lakeside-mta-0 to data-lakeside-mta-1",
            "StorageClass standard (provisioner rancher.io/local-path)",
            "securemail.io/encrypted-at-rest: \"true\"",
        ] {
            assert!(
                informational.message.contains(part),
                "{part} in {}",
                informational.message
            );
        }
        assert!(!informational.message.contains(HOLD_NOTE));
        assert!(!holds(&informational, &storage(Some("standard"), false)));

        let required = storage(Some("standard"), true);
        let gate = condition(&Resolved::Named(plain), &required, &names, 1);
        assert!(
            gate.message
                .contains("claim data-lakeside-mta-0) use StorageClass standard"),
            "{}",
            gate.message
        );
        assert!(gate.message.contains(HOLD_NOTE));
        assert!(holds(&gate, &required));

        let ebs = Arc::new(class("gp2", "ebs.csi.aws.com", &[("encrypted", "false")], &[]));
        let off = condition(&Resolved::Default(ebs), &storage(None, false), &names, 0);
        assert!(
            off.message.contains("the cluster's default StorageClass gp2")
                && off
                    .message
                    .contains("its parameter encrypted is \"false\", not \"true\"")
                && off.message.contains("no claims yet"),
            "{}",
            off.message
        );

        let encrypted = Arc::new(class("gp3", "ebs.csi.aws.com", &[("encrypted", "true")], &[]));
        let good = condition(&Resolved::Default(encrypted), &storage(None, true), &names, 1);
        assert_eq!(
            (good.status, good.reason.as_str()),
            (Some(true), "EncryptingStorageClass")
        );
        assert!(
            good.message
                .ends_with("provisioner ebs.csi.aws.com with encrypted: \"true\""),
            "{}",
            good.message
        );
        assert!(!holds(&good, &storage(None, true)));

        let missing = condition(&Resolved::NotFound("fast".into()), &required, &names, 1);
        assert_eq!(
            (missing.status, missing.reason.as_str()),
            (None, "StorageClassNotFound")
        );
        assert!(holds(&missing, &required), "unknown is not encrypted");
        let none = condition(&Resolved::NoDefault, &storage(None, false), &names, 1);
        assert_eq!((none.status, none.reason.as_str()), (None, "NoDefaultStorageClass"));
    }
}
