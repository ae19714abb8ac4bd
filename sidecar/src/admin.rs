//! The admin HTTP server on `listen.admin`: `/livez`, `/readyz`, `/metrics` (OpenMetrics; Postfix's queue is
//! counted at each scrape) and `/status` (the [`SidecarStatus`](securemail_api::sidecar_status::SidecarStatus)
//! JSON the operator reads to warm up and drain).

mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::egress::EgressHealth;
use crate::error::{Error, Result};

pub use status::{
    MetricsRefresh, StatusError, StatusSource, pod_status, queue_metrics, with_egress, with_evidence, with_reputation,
};

/// Content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One readiness condition, set by whoever owns it; clones share the value.
#[derive(Clone, Debug, Default)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What `/readyz` requires; all start unset (not ready).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    /// A valid configuration is in use.
    pub config_loaded: ReadyFlag,
    /// The LMTP socket is bound and accepting.
    pub lmtp_listening: ReadyFlag,
    /// The evidence log accepts appends; cleared when an append fails, since delivering without evidence is not
    /// allowed.
    pub evidence_writable: ReadyFlag,
    /// The pod can send from its pool address (the egress self-check).
    pub egress: EgressHealth,
}

impl Readiness {
    /// Why the sidecar is not ready; empty when it is.
    pub fn unmet(&self) -> Vec<String> {
        let mut unmet: Vec<String> = [
            (&self.config_loaded, "configuration not loaded"),
            (&self.lmtp_listening, "LMTP socket not listening"),
            (&self.evidence_writable, "evidence log not writable"),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.get())
        .map(|(_, reason)| reason.to_owned())
        .collect();
        if let Some(problem) = self.egress.problem() {
            unmet.push(format!("cannot send from the pool address: {problem}"));
        }
        unmet
    }
}

/// What the endpoints answer from.
#[derive(Clone)]
pub struct AdminState {
    pub readiness: Readiness,
    /// Complete before the server starts: registering needs `&mut`.
    pub registry: Arc<Registry>,
    /// Run before each `/metrics` encoding, for gauges read from outside the process (Postfix's queue).
    pub refresh_metrics: MetricsRefresh,
    pub status: StatusSource,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

/// A bound admin socket, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl AdminServer {
    /// Binds `addr` (port 0 picks a free port; see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let socket_error = |action, source| Error::AdminSocket { addr, action, source };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| socket_error("bind", source))?;
        let addr = listener
            .local_addr()
            .map_err(|source| socket_error("read the bound address of", source))?;
        Ok(Self { listener, addr })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown` is cancelled, then finishes the requests in progress and returns.
    pub async fn serve(self, state: AdminState, shutdown: CancellationToken) -> Result<()> {
        let addr = self.addr;
        axum::serve(self.listener, router(state))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .map_err(|source| Error::AdminSocket {
                addr,
                action: "serve",
                source,
            })
    }
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

/// Answering at all proves the event loop runs.
async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let unmet = state.readiness.unmet();
    if unmet.is_empty() {
        "ok\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", unmet.join("; ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    // The refresh walks Postfix's queue directory: blocking I/O that must not hold an executor thread.
    let encoded = tokio::task::spawn_blocking(move || {
        (state.refresh_metrics)();
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &state.registry).map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Ok(Err(err)) => {
            tracing::error!(%err, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response()
        }
        Err(err) => {
            tracing::error!(%err, "metrics refresh did not finish");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot refresh metrics\n").into_response()
        }
    }
}

/// Never a guess: the operator deletes a volume whose queue is reported empty, so any doubt answers 503.
async fn status(State(state): State<AdminState>) -> Response {
    let source = Arc::clone(&state.status);
    let unavailable = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("status unavailable: {reason}\n"),
        )
    };
    match tokio::task::spawn_blocking(move || source()).await {
        Ok(Ok(status)) => match serde_json::to_vec(&status) {
            Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
            Err(err) => unavailable(err.to_string()).into_response(),
        },
        Ok(Err(err)) => {
            tracing::warn!(%err, "cannot report /status");
            unavailable(err.to_string()).into_response()
        }
        Err(err) => unavailable(err.to_string()).into_response(),
    }
}
