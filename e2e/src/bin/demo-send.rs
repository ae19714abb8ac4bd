//! `make demo`'s last step: one message end to end on the demo's node, with the data-plane world as its Internet.
//! A tenant sending through the world's SOCKS5 egress host is onboarded (its submission certificate, client CA and
//! spec), publishes the DNS records its status lists in the world's signed zones, and an application submits one
//! message on 587 with its client certificate; the message reaches the world's DANE receiver over verified TLS, the
//! receiver's copy passes dkimpy, and the MTA pod's volume holds its evidence record. Prints each fact as it is
//! seen; fails naming the step that did not happen.

use std::process::ExitCode;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use securemail_api::SecureMailTenant;
use securemail_e2e::client;
use securemail_e2e::dataplane::World;
use securemail_e2e::node::wait_ready;
use securemail_e2e::node_mail::{
    MailTenant, Mode, NAMESPACE, RECIPIENT, assert_dkim_verifies, evidence_of_delivery, onboard, proxy_addresses,
    publish_dns, received, submit, volume_dir, wait_delivered,
};

#[tokio::main]
async fn main() -> ExitCode {
    let world = World::load();
    let client = client().await;
    // The first of the world's proxied address pairs, one address: one MTA pod.
    let address = proxy_addresses(&world, 0).swap_remove(0);
    let mail = MailTenant::new(Mode::Socks5Proxy, "demo-sender", "demo.tenant.test", "demo", &[address]);
    println!(
        "tenant {NAMESPACE}/{}: domain {}, sending from {:?} through the world's SOCKS5 egress host",
        mail.tenant, mail.domain, mail.pool
    );
    let tls = onboard(&world, &mail);
    let tenants: Api<SecureMailTenant> = Api::namespaced(client.clone(), NAMESPACE);
    let tenant = wait_ready(&tenants, NAMESPACE, mail.tenant).await;
    println!("Ready: its MTA pod runs and sends from its address");
    publish_dns(&world, &mail, &tenant);
    println!("published its DKIM, SPF and DMARC records (status.dnsRecords) in the world's signed zones");

    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let service_ip = services
        .get(&format!("{}-submission", mail.tenant))
        .await
        .ok()
        .and_then(|service| service.spec?.cluster_ip)
        .unwrap_or_else(|| panic!("the submission Service of {} has no address", mail.tenant));
    let id = format!("demo-{}", std::process::id());
    submit(&tls, &mail, &service_ip, &id);
    println!(
        "submitted <{id}@{}> from {} to {RECIPIENT} on {service_ip}:587 (STARTTLS, client certificate)",
        mail.domain,
        mail.sender()
    );
    wait_delivered(&world, &mail, std::slice::from_ref(&id));
    for (source, helo) in received(&world, &mail, &id) {
        println!("received by the world's DANE receiver from {source} (HELO {helo})");
    }
    assert_dkim_verifies(&world, &mail, &tenant, &id);
    println!("its DKIM signature verifies with dkimpy against the published record");
    let volume = volume_dir(&client, &mail, 0).await;
    for record in evidence_of_delivery(&volume, &mail, &id) {
        println!("evidence on the pod's volume: {record}");
    }
    std::fs::remove_dir_all(&tls).ok();
    ExitCode::SUCCESS
}
