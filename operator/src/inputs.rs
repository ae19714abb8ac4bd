//! What a tenant references but does not own: the submission server certificate Secret and the client CA Secret.
//! The pods cannot start without them, so a missing or malformed one makes `ConfigValid` False naming it (the
//! children are still applied, so the pods start as soon as it appears). Only the presence of the keys the pods
//! mount is checked; their content stays with Kubernetes and Postfix.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use securemail_api::SecureMailTenant;

use crate::Result;
use crate::build::submission_tls_secret;
use crate::context::Context;
use crate::names::TenantNames;

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
        let secret = secrets.get_opt(&reference.name).await?;
        problems.extend(problem(&reference, secret.as_ref()));
    }
    Ok(problems)
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

fn problem(reference: &Reference, secret: Option<&Secret>) -> Option<String> {
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
    let has = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|data| data.get(key))
            .is_some_and(|value| !value.0.is_empty())
            || secret
                .string_data
                .as_ref()
                .and_then(|data| data.get(key))
                .is_some_and(|value| !value.is_empty())
    };
    let missing: Vec<&str> = reference.keys.iter().copied().filter(|key| !has(key)).collect();
    (!missing.is_empty()).then(|| format!("Secret {name} ({field}) has no {}", missing.join(" or ")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    fn secret(type_: &str, keys: &[&str]) -> Secret {
        Secret {
            type_: Some(type_.to_owned()),
            data: Some(
                keys.iter()
                    .map(|key| ((*key).to_owned(), ByteString(b"pem".to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        }
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
