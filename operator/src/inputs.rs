//! What a tenant references but does not own: the submission server certificate Secret and the client CA Secret.
//! The pods cannot start without them, so a missing or malformed one makes `ConfigValid` False naming it (the
//! children are still applied, so the pods start as soon as it appears). The presence of the keys the pods mount is
//! checked, and the submission certificate's expiry is read from its public `tls.crt`; private keys stay with
//! Kubernetes and Postfix. An expired or unreadable certificate is a problem too. What a Secret looks like is remembered for
//! [`SHAPE_TTL`], so tenants sharing a Secret, and repeated reconciles, do not each read it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use securemail_api::SecureMailTenant;

use crate::Result;
use crate::build::submission_tls_secret;
use crate::context::Context;
use crate::names::TenantNames;

/// How long a Secret's shape is reused: a Secret created, fixed or deleted shows up within this.
const SHAPE_TTL: Duration = Duration::from_secs(15);

/// What the check needs of a Secret: its type, the keys with a non-empty value, and when the certificate in
/// `tls.crt` expires (or why it cannot be read). Never a private key.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    type_: Option<String>,
    keys: BTreeSet<String>,
    certificate_expires: Option<Result<Timestamp, String>>,
}

impl Shape {
    fn of(secret: &Secret) -> Self {
        let data = secret.data.iter().flatten().filter(|(_, value)| !value.0.is_empty());
        let string_data = secret
            .string_data
            .iter()
            .flatten()
            .filter(|(_, value)| !value.is_empty());
        let certificate = secret
            .data
            .as_ref()
            .and_then(|data| data.get(CERTIFICATE_KEY))
            .map(|value| value.0.as_slice())
            .or_else(|| {
                let string_data = secret.string_data.as_ref()?;
                string_data.get(CERTIFICATE_KEY).map(String::as_bytes)
            })
            .filter(|pem| !pem.is_empty());
        Self {
            type_: secret.type_.clone(),
            keys: data
                .map(|(key, _)| key.clone())
                .chain(string_data.map(|(key, _)| key.clone()))
                .collect(),
            certificate_expires: certificate.map(not_after),
        }
    }
}

/// Where a `kubernetes.io/tls` Secret keeps its certificate chain, leaf first.
const CERTIFICATE_KEY: &str = "tls.crt";

/// The expiry of the first certificate in `pem`.
fn not_after(pem: &[u8]) -> Result<Timestamp, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|_| "no PEM certificate".to_owned())?;
    let certificate = block
        .parse_x509()
        .map_err(|err| format!("not an X.509 certificate: {err}"))?;
    Timestamp::from_second(certificate.validity().not_after.timestamp())
        .map_err(|err| format!("expiry out of range: {err}"))
}

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Problems with the referenced Secrets, one sentence each; empty when all are usable.
    pub problems: Vec<String>,
    /// When the submission certificate expires, when it could be read.
    pub certificate_expires: Option<Timestamp>,
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

/// Checks the Secrets `tenant` references at `now`.
pub async fn check(
    ctx: &Context,
    tenant: &SecureMailTenant,
    namespace: &str,
    names: &TenantNames,
    now: Timestamp,
) -> Result<Inputs> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut inputs = Inputs::default();
    for reference in references(tenant, names) {
        let shape = shape(&secrets, namespace, &reference.name).await?;
        inputs.problems.extend(problem(&reference, shape.as_ref(), now));
        if reference.tls_type {
            inputs.certificate_expires = shape.and_then(|shape| shape.certificate_expires?.ok());
        }
    }
    Ok(inputs)
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

fn problem(reference: &Reference, secret: Option<&Shape>, now: Timestamp) -> Option<String> {
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
    if !missing.is_empty() {
        return Some(format!("Secret {name} ({field}) has no {}", missing.join(" or ")));
    }
    match &secret.certificate_expires {
        Some(Err(why)) if reference.tls_type => Some(format!("Secret {name} ({field}): {CERTIFICATE_KEY} holds {why}")),
        Some(Ok(expires)) if reference.tls_type && *expires <= now => {
            Some(format!("Secret {name} ({field}): its certificate expired at {expires}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    const NOW: Timestamp = Timestamp::constant(1_790_000_000, 0);

    /// A self-signed certificate valid until `not_after`, PEM.
    fn certificate(not_after: Timestamp) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["submission.example".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::Duration::from_secs(not_after.as_second().try_into().unwrap());
        params.self_signed(&key).unwrap().pem().into_bytes()
    }

    /// A Secret of `type_` with `keys`; `tls.crt` holds a certificate valid for a year from [`NOW`].
    fn secret(type_: &str, keys: &[&str]) -> Shape {
        let valid = certificate(NOW + jiff::SignedDuration::from_hours(24 * 365));
        secret_with_certificate(type_, keys, &valid)
    }

    fn secret_with_certificate(type_: &str, keys: &[&str], certificate: &[u8]) -> Shape {
        let data: BTreeMap<String, ByteString> = keys
            .iter()
            .map(|key| {
                let value = if *key == CERTIFICATE_KEY {
                    certificate.to_vec()
                } else {
                    b"pem".to_vec()
                };
                ((*key).to_owned(), ByteString(value))
            })
            .collect();
        Shape::of(&Secret {
            type_: Some(type_.to_owned()),
            data: Some(data),
            ..Secret::default()
        })
    }

    fn tls_reference() -> Reference {
        Reference {
            name: "lakeside-submission-tls".into(),
            field: "spec.submission.tls.secretName",
            tls_type: true,
            keys: &["tls.crt", "tls.key"],
        }
    }

    #[test]
    fn each_problem_names_the_secret_and_the_spec_field() {
        let tls = tls_reference();
        assert_eq!(
            problem(&tls, None, NOW).as_deref(),
            Some("Secret lakeside-submission-tls (spec.submission.tls.secretName) does not exist")
        );
        assert!(
            problem(&tls, Some(&secret("Opaque", &["tls.crt", "tls.key"])), NOW)
                .is_some_and(|p| p.contains("must be of type kubernetes.io/tls, not Opaque"))
        );
        assert!(
            problem(&tls, Some(&secret("kubernetes.io/tls", &["tls.crt"])), NOW)
                .is_some_and(|p| p.ends_with("has no tls.key"))
        );
        assert_eq!(
            problem(&tls, Some(&secret("kubernetes.io/tls", &["tls.crt", "tls.key"])), NOW),
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
        assert!(problem(&tls, Some(&empty_key), NOW).is_some_and(|p| p.ends_with("has no tls.key")));
        let ca = Reference {
            name: "apps-ca".into(),
            field: "spec.submission.clientCertificates.caSecretName",
            tls_type: false,
            keys: &["ca.crt"],
        };
        assert_eq!(problem(&ca, Some(&secret("Opaque", &["ca.crt"])), NOW), None);
        assert!(problem(&ca, Some(&secret("Opaque", &[])), NOW).is_some_and(|p| p.ends_with("has no ca.crt")));
    }

    #[test]
    fn the_submission_certificate_expiry_is_read_and_an_expired_or_unreadable_one_is_a_problem() {
        let tls = tls_reference();
        let expires = NOW + jiff::SignedDuration::from_hours(24 * 10);
        let shape = secret_with_certificate("kubernetes.io/tls", &["tls.crt", "tls.key"], &certificate(expires));
        assert_eq!(shape.certificate_expires, Some(Ok(expires)));
        assert_eq!(problem(&tls, Some(&shape), NOW), None);
        assert_eq!(
            problem(&tls, Some(&shape), expires).as_deref(),
            Some(
                "Secret lakeside-submission-tls (spec.submission.tls.secretName): its certificate expired at \
                 2026-10-01T14:13:20Z"
            )
        );
        let garbage = secret_with_certificate("kubernetes.io/tls", &["tls.crt", "tls.key"], b"not a certificate");
        assert_eq!(
            problem(&tls, Some(&garbage), NOW).as_deref(),
            Some("Secret lakeside-submission-tls (spec.submission.tls.secretName): tls.crt holds no PEM certificate")
        );
    }
}
