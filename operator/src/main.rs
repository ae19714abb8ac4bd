//! The securemail-operator binary: `run` the controller, `render` a tenant offline, or print the `crd`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use jiff::civil::Date;
use securemail_api::SecureMailTenant;
use securemail_operator::admin::{self, Health};
use securemail_operator::build::{DEFAULT_DRAIN_CONFIRMATION, DEFAULT_EVIDENCE_SWEEP_INTERVAL, Settings, SidecarDns};
use securemail_operator::context::{Metrics, SystemClock};
use securemail_operator::controller::{self, LeaderElection};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Reconciles SecureMailTenant resources into dedicated outbound mail infrastructure"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster in KUBECONFIG or the in-cluster service account.
    Run(RunArgs),
    /// Print every child object, the DNS records and today's warmup caps of a tenant, offline.
    Render {
        /// SecureMailTenant manifest.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Render as of this UTC date (YYYY-MM-DD); default today.
        #[arg(long)]
        date: Option<Date>,
        /// Directory with `<domain>.<rsa|ed>.pem` private keys to show real DKIM records.
        #[arg(long)]
        keys_dir: Option<PathBuf>,
        #[command(flatten)]
        children: ChildArgs,
    },
    /// Print the SecureMailTenant CRD (apply it with `kubectl apply --server-side -f -`).
    Crd,
}

/// Operator-wide choices that shape every tenant's children.
#[derive(clap::Args, Debug)]
struct ChildArgs {
    /// Postfix image for tenants that do not name one.
    #[arg(long, env = "SECUREMAIL_MTA_IMAGE")]
    mta_image: Option<String>,
    /// Sidecar image for tenants that do not name one.
    #[arg(long, env = "SECUREMAIL_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    /// Recursive resolvers (address:port, comma-separated) every sidecar asks for MX, TLSA and MTA-STS records; they
    /// must pass DNSSEC records through (the sidecar validates them itself). Default: the pod's /etc/resolv.conf.
    #[arg(long, env = "SECUREMAIL_SIDECAR_NAMESERVERS", value_delimiter = ',')]
    sidecar_nameservers: Vec<SocketAddr>,
    /// DNSSEC trust anchors (zone-file format) the sidecars validate with, for a network with its own signed root;
    /// default: the IANA root's.
    #[arg(long, env = "SECUREMAIL_SIDECAR_TRUST_ANCHORS_FILE")]
    sidecar_trust_anchors_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of /livez, /readyz and /metrics.
    #[arg(long, env = "SECUREMAIL_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    admin_address: SocketAddr,
    /// Take a Lease before reconciling (needed whenever more than one replica runs).
    #[arg(long, env = "SECUREMAIL_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,
    /// Namespace of the operator (its Lease lives here; it reads MTA pods' status from here).
    #[arg(long, env = "POD_NAMESPACE", default_value = "securemail-system")]
    namespace: String,
    /// Identity in the Lease, also named in the User-Agent of every API request (audit logs attribute writes to it).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Namespace whose pods may scrape the MTA pods' metrics.
    #[arg(long, env = "SECUREMAIL_MONITORING_NAMESPACE", default_value = "monitoring")]
    monitoring_namespace: String,
    /// A draining pod's queue must read empty twice, this many seconds apart, before the pod and its volume go.
    #[arg(long, env = "SECUREMAIL_DRAIN_CONFIRMATION_SECONDS", default_value_t = DEFAULT_DRAIN_CONFIRMATION.as_secs())]
    drain_confirmation_seconds: u64,
    /// How often volumes kept as delivery evidence are checked; one whose retention ended and that no pod uses is
    /// deleted.
    #[arg(long, env = "SECUREMAIL_EVIDENCE_SWEEP_SECONDS", default_value_t = DEFAULT_EVIDENCE_SWEEP_INTERVAL.as_secs())]
    evidence_sweep_seconds: u64,
    /// Resolver (address:port) for the DNSBL checks of pool addresses; default: /etc/resolv.conf's. Blocklists
    /// refuse queries from large public resolvers: point this at a recursive resolver of your own.
    #[arg(long, env = "SECUREMAIL_DNSBL_NAMESERVER")]
    dnsbl_nameserver: Option<SocketAddr>,
    /// Manage only tenants in these namespaces (comma-separated), where the operator may use Secrets; their key
    /// Secrets are watched per namespace. Unset: every namespace, which needs cluster-wide Secret access.
    #[arg(long, env = "SECUREMAIL_TENANT_NAMESPACES", value_delimiter = ',')]
    tenant_namespaces: Option<Vec<String>>,
    #[command(flatten)]
    children: ChildArgs,
}

impl ChildArgs {
    fn settings(self, defaults: Settings) -> anyhow::Result<Settings> {
        let trust_anchors = self
            .sidecar_trust_anchors_file
            .map(|file| {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read the sidecar trust anchors {}", file.display()))
            })
            .transpose()?;
        Ok(Settings {
            mta_image: self.mta_image.unwrap_or(defaults.mta_image),
            sidecar_image: self.sidecar_image.unwrap_or(defaults.sidecar_image),
            sidecar_dns: SidecarDns {
                nameservers: self.sidecar_nameservers,
                trust_anchors,
            },
            ..defaults
        })
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => print!("{}", securemail_operator::crd::crd_yaml()?),
        Command::Render {
            file,
            date,
            keys_dir,
            children,
        } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let tenant: SecureMailTenant = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not a valid SecureMailTenant", file.display()))?;
            let today = date.unwrap_or_else(|| jiff::Zoned::now().with_time_zone(jiff::tz::TimeZone::UTC).date());
            let settings = children.settings(Settings::default())?;
            print!(
                "{}",
                securemail_operator::render::render(&tenant, today, keys_dir.as_deref(), &settings)?
            );
        }
        Command::Run(args) => run(args).await?,
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_current_span(false)
        .init();
    let identity = args
        .identity
        .unwrap_or_else(|| format!("securemail-operator-{}", std::process::id()));
    let mut config = kube::Config::infer()
        .await
        .context("cannot find a Kubernetes configuration")?;
    // The apiserver's audit log records the user agent: with every replica under one ServiceAccount, this is what
    // tells an SRE which replica made a write.
    let user_agent = format!("securemail-operator/{} ({identity})", env!("CARGO_PKG_VERSION"));
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_str(&user_agent)
            .with_context(|| format!("POD_NAME {identity:?} cannot be sent in a User-Agent header"))?,
    ));
    let client = kube::Client::try_from(config).context("cannot build a Kubernetes client")?;
    let settings = args.children.settings(Settings {
        monitoring_namespace: args.monitoring_namespace,
        operator_namespace: args.namespace.clone(),
        drain_confirmation: Duration::from_secs(args.drain_confirmation_seconds),
        evidence_sweep_interval: Duration::from_secs(args.evidence_sweep_seconds.max(1)),
        dnsbl_nameserver: args.dnsbl_nameserver,
        tenant_namespaces: args.tenant_namespaces.map(|namespaces| {
            namespaces
                .into_iter()
                .filter(|namespace| !namespace.is_empty())
                .collect()
        }),
        ..Settings::default()
    })?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let admin = tokio::spawn(admin::serve(args.admin_address, metrics.clone(), health.clone()));
    let leader_election = args.leader_election.then_some(LeaderElection {
        namespace: args.namespace,
        identity,
    });
    let result = controller::run(
        client,
        settings,
        metrics,
        Arc::new(SystemClock),
        health,
        leader_election,
    )
    .await;
    admin.abort();
    result
}
