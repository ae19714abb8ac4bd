//! Publishing `status.dnsRecords` through external-dns: one `DNSEndpoint` per tenant when `spec.dns.externalDns`
//! is set and the external-dns CRD is installed. Without the CRD, a condition says so instead of failing.

use kube::api::{DynamicObject, GroupVersionKind};
use kube::core::ApiResource;
use kube::{Api, Client, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_api::dns;
use securemail_api::tenant::{DnsRecord, DnsRecordType};
use serde_json::json;

use crate::build::child_meta;
use crate::names::TenantNames;
use crate::status::{self, ConditionUpdate};
use crate::{Result, apply};

/// TTL of published records: short enough that a rotated DKIM key or a changed pool shows up within the hour.
const RECORD_TTL_SECONDS: u32 = 3600;

/// The external-dns DNSEndpoint kind.
pub fn gvk() -> GroupVersionKind {
    GroupVersionKind::gvk("externaldns.k8s.io", "v1alpha1", "DNSEndpoint")
}

/// The DNSEndpoint carrying a tenant's records (pure).
pub fn dns_endpoint(
    tenant: &SecureMailTenant,
    names: &TenantNames,
    resource: &ApiResource,
    records: &[DnsRecord],
) -> Result<DynamicObject> {
    let endpoints: Vec<serde_json::Value> = records
        .iter()
        .map(|record| {
            let (record_type, target) = match record.record_type {
                // external-dns takes the TXT text itself and quotes or splits it for the provider.
                DnsRecordType::Txt => (
                    "TXT",
                    dns::parse_txt(&record.value).unwrap_or_else(|_| record.value.clone()),
                ),
                DnsRecordType::Ptr => ("PTR", record.value.trim_end_matches('.').to_owned()),
            };
            json!({
                "dnsName": record.name,
                "recordType": record_type,
                "recordTTL": RECORD_TTL_SECONDS,
                "targets": [target],
            })
        })
        .collect();
    let mut object = DynamicObject::new(&names.mta(), resource).data(json!({"spec": {"endpoints": endpoints}}));
    object.metadata = child_meta(tenant, names, names.mta(), "dns")?;
    Ok(object)
}

/// Publishes or withdraws the tenant's DNSEndpoint and says how DNS is published.
pub async fn reconcile(
    client: &Client,
    tenant: &SecureMailTenant,
    names: &TenantNames,
    records: &[DnsRecord],
) -> Result<ConditionUpdate> {
    let namespace = tenant.namespace().unwrap_or_default();
    let installed = apply::discover(client, &gvk(), tenant.spec.dns.external_dns).await;
    let Some(resource) = installed else {
        return Ok(if tenant.spec.dns.external_dns {
            ConditionUpdate::new(
                status::DNS_PUBLISHED,
                false,
                "CrdMissing",
                "spec.dns.externalDns is set but the external-dns DNSEndpoint CRD (externaldns.k8s.io/v1alpha1) is \
                 not installed; publish status.dnsRecords yourself or install external-dns with its CRD source",
            )
        } else {
            manual()
        });
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
    if !tenant.spec.dns.external_dns {
        apply::sweep_dynamic(&api, &names.children_selector()).await?;
        return Ok(manual());
    }
    apply::apply_dynamic(&api, dns_endpoint(tenant, names, &resource, records)?).await?;
    let message = format!(
        "DNSEndpoint {} carries {} record(s) for external-dns",
        names.mta(),
        records.len()
    );
    Ok(ConditionUpdate::new(
        status::DNS_PUBLISHED,
        true,
        "DnsEndpoint",
        message,
    ))
}

fn manual() -> ConditionUpdate {
    ConditionUpdate::new(
        status::DNS_PUBLISHED,
        false,
        "Manual",
        "publish status.dnsRecords in the tenant's DNS (or set spec.dns.externalDns)",
    )
}
