//! The submission server certificate from cert-manager: with `spec.submission.tls.issuerRef` the operator requests
//! a `Certificate` for the submission Service's names, issued into the Secret the MTA pods mount. Without
//! cert-manager's CRD nothing issues that Secret; while it is missing, `ConfigValid` says why.

use kube::api::{DynamicObject, GroupVersionKind};
use kube::core::ApiResource;
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::tenant::{IssuerKind, IssuerRef};
use serde_json::json;

use crate::build::{child_meta, submission_tls_secret};
use crate::names::TenantNames;
use crate::{Result, apply};

/// cert-manager's Certificate kind.
pub fn gvk() -> GroupVersionKind {
    GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate")
}

/// The Certificate for the tenant's submission Service (pure): its in-cluster names, an ECDSA P-256 key replaced
/// at every renewal, server authentication only.
pub fn certificate(
    tenant: &SecureMailTenant,
    names: &TenantNames,
    resource: &ApiResource,
    issuer: &IssuerRef,
) -> Result<DynamicObject> {
    let service = names.submission_service();
    let namespace = tenant.namespace().unwrap_or_default();
    let kind = match issuer.kind {
        IssuerKind::Issuer => "Issuer",
        IssuerKind::ClusterIssuer => "ClusterIssuer",
    };
    let spec = json!({
        "secretName": submission_tls_secret(tenant, names),
        "dnsNames": [
            service.clone(),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ],
        "issuerRef": {"name": issuer.name, "kind": kind, "group": "cert-manager.io"},
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "usages": ["server auth", "digital signature"],
    });
    let mut object = DynamicObject::new(&service, resource).data(json!({ "spec": spec }));
    object.metadata = child_meta(tenant, names, service, "submission")?;
    Ok(object)
}

/// Requests or withdraws the tenant's Certificate. Returns why nothing will issue the Secret when an issuer is named
/// but cert-manager's CRD is not installed.
pub async fn reconcile(client: &Client, tenant: &SecureMailTenant, names: &TenantNames) -> Result<Option<String>> {
    let issuer = tenant.spec.submission.tls.issuer_ref.as_ref();
    let Some(resource) = apply::discover(client, &gvk(), issuer.is_some()).await else {
        return Ok(issuer.map(|_| {
            "spec.submission.tls.issuerRef needs cert-manager, but its Certificate CRD (cert-manager.io/v1) is not \
             installed; install cert-manager or name a Secret in spec.submission.tls.secretName"
                .to_owned()
        }));
    };
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &tenant.namespace().unwrap_or_default(), &resource);
    match issuer {
        Some(issuer) => {
            apply::apply_dynamic(&api, certificate(tenant, names, &resource, issuer)?).await?;
        }
        // A Certificate requested before the spec switched to a Secret of its own goes.
        None => apply::sweep_dynamic(&api, &names.children_selector()).await?,
    }
    Ok(None)
}
