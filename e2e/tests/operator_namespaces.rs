//! The chart's default RBAC: the operator may use Secrets only in the tenant namespaces it was installed for. It runs
//! as such a release's ServiceAccount; a tenant in a listed namespace converges, one elsewhere is told why nothing is
//! made for it, carries no finalizer, and gets no key Secret.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use securemail_api::SecureMailTenant;
use securemail_e2e::operator::{Operator, install_chart};
use securemail_e2e::tenants::{WAIT, condition, create, example, reconciled};
use securemail_e2e::{client, ensure_crd, eventually, unique_namespace};

const RELEASE: &str = "securemail-scoped";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_used_only_in_the_tenant_namespaces() {
    ensure_crd();
    let client = client().await;
    let managed = unique_namespace("scoped-managed");
    let unmanaged = unique_namespace("scoped-unmanaged");
    install_chart(
        RELEASE,
        &[
            "--set",
            &format!("tenantNamespaces={{{managed}}}"),
            "--set",
            "replicaCount=1",
        ],
    );
    let operator = Operator::start_for_namespaces(18_183, RELEASE, &[&managed]);

    let inside = create(&client, &example("minimal.yaml", &managed)).await.name_any();
    let outside = create(&client, &example("minimal.yaml", &unmanaged)).await.name_any();

    let tenant = eventually("the managed tenant's DKIM keys", WAIT, || async {
        let tenant = reconciled(&client, &managed, &inside).await;
        (condition(&tenant, "DkimReady")?.0 == "True").then_some(tenant)
    })
    .await;
    assert_eq!(condition(&tenant, "ConfigValid").map(|c| c.0).as_deref(), Some("True"));

    let tenant = reconciled(&client, &unmanaged, &outside).await;
    let (status, reason, message) = condition(&tenant, "ConfigValid").unwrap_or_default();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NamespaceNotManaged"),
        "{message}"
    );
    assert!(message.contains(&unmanaged), "{message}");
    assert_eq!(
        condition(&tenant, "Ready").map(|c| (c.0, c.1)),
        Some(("False".to_owned(), "NamespaceNotManaged".to_owned()))
    );
    assert!(
        tenant.finalizers().is_empty(),
        "finalizer on an unmanaged tenant: {:?}",
        tenant.finalizers()
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &unmanaged);
    let keys = secrets
        .list(&ListParams::default().labels("app.kubernetes.io/component=dkim-key"))
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(keys.items.is_empty(), "key Secrets in an unmanaged namespace");

    // Without a finalizer the unmanaged tenant goes at once.
    let api: Api<SecureMailTenant> = Api::namespaced(client.clone(), &unmanaged);
    api.delete(&outside, &DeleteParams::default())
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    eventually("the unmanaged tenant deleted", WAIT, || async {
        api.get_opt(&outside).await.ok()?.is_none().then_some(())
    })
    .await;

    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        !log.contains("forbidden"),
        "the scoped release lacks a permission:\n{log}"
    );
}
