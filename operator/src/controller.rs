//! Wires the controller: watches on tenants and the labelled children, leader election, and the reconcile loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::{Controller, controller, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use securemail_api::SecureMailTenant;
use tracing::{debug, info, warn};

use crate::admin::Health;
use crate::build::Settings;
use crate::context::{Clock, Context, Metrics};
use crate::names::{MANAGED_SELECTOR, MANAGER};
use crate::reconcile::{error_policy, reconcile};

/// How long triggers for one tenant are collected before it is reconciled.
const DEBOUNCE: Duration = Duration::from_millis(500);

/// Leader election settings; `None` runs without a lease (a single replica).
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub identity: String,
}

/// Runs the controller until a shutdown signal, or until leadership is lost (the caller exits and the pod
/// restarts as a standby, so two replicas never reconcile at once).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    health: Arc<Health>,
    leader_election: Option<LeaderElection>,
) -> anyhow::Result<()> {
    let mut leadership = match &leader_election {
        Some(election) => {
            let manager = LeaseManagerBuilder::new(client.clone(), MANAGER)
                .with_namespace(&election.namespace)
                .with_identity(&election.identity)
                .with_duration(15)
                .with_grace(5)
                .build()
                .await?;
            let (mut channel, task) = manager.watch().await;
            health.ready.store(true, Ordering::Relaxed);
            info!(identity = %election.identity, "waiting for the leader lease");
            while !*channel.borrow_and_update() {
                channel.changed().await?;
            }
            info!(identity = %election.identity, "acquired the leader lease");
            Some((channel, task))
        }
        None => None,
    };

    let tenants: Api<SecureMailTenant> = Api::all(client.clone());
    let managed = watcher::Config::default().labels(MANAGED_SELECTOR);
    let controller = Controller::new(tenants, watcher::Config::default().any_semantic());
    let context = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics,
        clock,
        controller.store(),
        leader_election.as_ref().map(|election| election.identity.clone()),
    ));
    let reconciling = controller
        .owns(Api::<StatefulSet>::all(client.clone()), managed.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), managed.clone())
        .owns(Api::<Service>::all(client.clone()), managed.clone())
        .owns(Api::<Secret>::all(client.clone()), managed.clone())
        .owns(Api::<ServiceAccount>::all(client.clone()), managed.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), managed.clone())
        .owns(Api::<NetworkPolicy>::all(client.clone()), managed)
        // A reconcile's own writes come back as watch events for the tenant and its children; coalescing them
        // turns a burst of triggers into one more pass instead of one per event.
        .with_config(controller::Config::default().debounce(DEBOUNCE))
        .shutdown_on_signal()
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => {
                    debug!(tenant = %object.name, namespace = ?object.namespace, "reconciled")
                }
                Err(error) => debug!(%error, "reconcile attempt failed"),
            }
        });
    health.ready.store(true, Ordering::Relaxed);

    match leadership.as_mut() {
        Some((channel, _)) => {
            let lost = async {
                while channel.changed().await.is_ok() {
                    if !*channel.borrow() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = reconciling => info!("controller stopped"),
                () = lost => {
                    warn!("lost the leader lease; stopping so a standby can take over");
                    anyhow::bail!("leader lease lost");
                }
            }
        }
        None => reconciling.await,
    }
    Ok(())
}
