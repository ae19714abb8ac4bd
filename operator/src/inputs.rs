//! What a tenant references but does not own: the submission server certificate Secret and the client CA Secret.
//! The pods cannot start without them, so a missing or malformed one makes `ConfigValid` False naming it (the
//! children are still applied, so the pods start as soon as it appears). Only the presence of the keys the pods
//! mount is checked; their content stays with Kubernetes and Postfix. What a Secret looks like is remembered for
//! [`SHAPE_TTL`], so tenants sharing a Secret, and repeated reconciles, do not each read it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use securemail_api::SecureMailTenant;

use crate::Result;
use crate::build::submission_tls_secret;
use crate::context::Context;
use crate::names::TenantNames;

/// How long a Secret's shape is reused: a Secret created, fixed or deleted shows up within this.
const SHAPE_TTL: Duration = Duration::from_secs(15);

/// What the check needs of a Secret: its type and the keys with a non-empty value. Never its data.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    type_: Option<String>,
    keys: BTreeSet<String>,
}

impl Shape {
    fn of(secret: &Secret) -> Self {
        let data = secret.data.iter().flatten().filter(|(_, value)| !value.0.is_empty());
        let string_data = secret
            .string_data
            .iter()
            .flatten()
            .filter(|(_, value)| !value.is_empty());
        Self {
            type_: secret.type_.clone(),
            keys: data
                .map(|(key, _)| key.clone())
                .chain(string_data.map(|(key, _)| key.clone()))
                .collect(),
        }
    }
}

/// One referenced Secret and the keys the pods mount from it.
struct Reference {
    name: String,
    /// Where the spec names it, for the message.
    field: &'static str,
    /// `kubernetes.io/tls` required.
    tls_type: bool,
    keys: &'static [&'static str],
}

/// Problems with the Secrets `tenant` references, one sentence each; empty when all are usable.
pub async fn check(
    ctx: &Context,
    tenant: &SecureMailTenant,
    namespace: &str,
    names: &TenantNames,
) -> Result<Vec<String>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut problems = Vec::new();
    for reference in references(tenant, names) {
        let shape = shape(&secrets, namespace, &reference.name).await?;
        problems.extend(problem(&reference, shape.as_ref()));
    }
    Ok(problems)
}

/// The Secret's shape, `None` when it does not exist; from the cache while it is fresh.
async fn shape(secrets: &Api<Secret>, namespace: &str, name: &str) -> Result<Option<Shape>> {
    type Cache = HashMap<(String, String), (Instant, Option<Shape>)>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let key = (namespace.to_owned(), name.to_owned());
    let cached = CACHE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|cache| cache.get(&key).cloned());
    if let Some((at, shape)) = cached
        && at.elapsed() < SHAPE_TTL
    {
        return Ok(shape);
    }
    let shape = secrets.get_opt(name).await?.as_ref().map(Shape::of);
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let cache = cache.get_or_insert_with(HashMap::new);
    // Bounded by the Secrets tenants name: entries of Secrets no longer named go once stale.
    cache.retain(|_, (at, _)| at.elapsed() < SHAPE_TTL);
    cache.insert(key, (Instant::now(), shape.clone()));
    Ok(shape)
}

fn references(tenant: &SecureMailTenant, names: &TenantNames) -> [Reference; 2] {
    let submission = &tenant.spec.submission;
    let tls_field = if submission.tls.secret_name.is_some() {
        "spec.submission.tls.secretName"
    } else {
        "spec.submission.tls.issuerRef (the Secret cert-manager issues)"
    };
    [
        Reference {
            name: submission_tls_secret(tenant, names),
            field: tls_field,
            tls_type: true,
            keys: &["tls.crt", "tls.key"],
        },
        Reference {
            name: submission.client_certificates.ca_secret_name.clone(),
            field: "spec.submission.clientCertificates.caSecretName",
            tls_type: false,
            keys: &["ca.crt"],
        },
    ]
}

fn problem(reference: &Reference, secret: Option<&Shape>) -> Option<String> {
    let Reference { name, field, .. } = reference;
    let Some(secret) = secret else {
        return Some(format!("Secret {name} ({field}) does not exist"));
    };
    if reference.tls_type && secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Some(format!(
            "Secret {name} ({field}) must be of type kubernetes.io/tls, not {}",
            secret.type_.as_deref().unwrap_or("Opaque")
        ));
    }
    let missing: Vec<&str> = reference
        .keys
        .iter()
        .copied()
        .filter(|key| !secret.keys.contains(*key))
        .collect();
    (!missing.is_empty()).then(|| format!("Secret {name} ({field}) has no {}", missing.join(" or ")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(type_: &str, keys: &[&str]) -> Shape {
        let data: BTreeMap<String, ByteString> = keys
            .iter()
            .map(|key| ((*key).to_owned(), ByteString(b"pem".to_vec())))
            .collect();
        Shape::of(&Secret {
            type_: Some(type_.to_owned()),
            data: Some(data),
            ..Secret::default()
        })
    }

    #[test]
    fn each_problem_names_the_secret_and_the_spec_field() {
        let tls = Reference {
            name: "lakeside-submission-tls".into(),
            field: "spec.submission.tls.secretName",
            tls_type: true,
            keys: &["tls.crt", "tls.key"],
        };
        assert_eq!(
            problem(&tls, None).as_deref(),
            Some("Secret lakeside-submission-tls (spec.submission.tls.secretName) does not exist")
        );
        assert!(
            problem(&tls, Some(&secret("Opaque", &["tls.crt", "tls.key"])))
                .is_some_and(|p| p.contains("must be of type kubernetes.io/tls, not Opaque"))
        );
        assert!(
            problem(&tls, Some(&secret("kubernetes.io/tls", &["tls.crt"])))
                .is_some_and(|p| p.ends_with("has no tls.key"))
        );
        assert_eq!(
            problem(&tls, Some(&secret("kubernetes.io/tls", &["tls.crt", "tls.key"]))),
            None
        );
        // An empty value counts as missing.
        let empty_key = Shape::of(&Secret {
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".into(), ByteString(b"pem".to_vec())),
                ("tls.key".into(), ByteString(Vec::new())),
            ])),
            ..Secret::default()
        });
        assert!(problem(&tls, Some(&empty_key)).is_some_and(|p| p.ends_with("has no tls.key")));
        let ca = Reference {
            name: "apps-ca".into(),
            field: "spec.submission.clientCertificates.caSecretName",
            tls_type: false,
            keys: &["ca.crt"],
        };
        assert_eq!(problem(&ca, Some(&secret("Opaque", &["ca.crt"]))), None);
        assert!(problem(&ca, Some(&secret("Opaque", &[]))).is_some_and(|p| p.ends_with("has no ca.crt")));
    }
}
