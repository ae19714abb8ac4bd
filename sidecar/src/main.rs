//! The securemail-sidecar binary.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use securemail_api::provider::Provider;
use securemail_api::sidecar_config::{DnsSettings, SidecarConfig};
use securemail_api::tenant::TlsPolicySpec;
use securemail_sidecar::admin::{
    AdminServer, AdminState, Readiness, ReadyFlag, pod_status, queue_metrics, with_egress, with_evidence,
    with_reputation,
};
use securemail_sidecar::config::{ConfigWatcher, DEFAULT_POLL_INTERVAL, WatchEvent};
use securemail_sidecar::deliver::{Engine, EngineConfig, SystemClock, WallClock};
use securemail_sidecar::dkim::KeyStore;
use securemail_sidecar::egress::{self, EgressHealth};
use securemail_sidecar::evidence::{self, EvidenceStore, EvidenceWriter, PruneRequest};
use securemail_sidecar::lmtp::{Backend, Envelope, Limits, LmtpListener, RcptDecision, Recipient, Reply};
use securemail_sidecar::metrics::Metrics;
use securemail_sidecar::policy::dns::HickoryDns;
use securemail_sidecar::policy::mta_sts::cache::StsCache;
use securemail_sidecar::policy::mta_sts::fetch::HttpsFetcher;
use securemail_sidecar::policy::{PolicyResolver, check_domain, clock};
use securemail_sidecar::reputation::{self, BreakerSettings, Breakers};
use securemail_sidecar::smtp::client::{SessionSettings, Timeouts};
use securemail_sidecar::socketmap::{Limits as SocketmapLimits, MAP_NAME, SocketmapServer};
use securemail_sidecar::tls::TlsConfigs;
use securemail_sidecar::warmup::WarmupLimiter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "The never-cleartext delivery agent beside Postfix in every SecureMail MTA pod"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Deliver for one pool address: LMTP from Postfix, the admin server, reload when sidecar.yaml or a key
    /// changes.
    Run {
        /// The sidecar.yaml the operator rendered for this pod.
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the TLS policy the sidecar would apply to DOMAIN, with the DNS and MTA-STS facts behind it.
    CheckDomain {
        domain: String,
        /// Use this sidecar.yaml's tenant policy and DNS settings; without it, the default policy and the
        /// resolvers in /etc/resolv.conf.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Answer Postfix's TLS policy lookups (smtp_tls_policy_maps = socketmap:inet:ADDRESS:postfix) with the
    /// sidecar's policy (DANE > MTA-STS > tenant policy), for Postfix doing the delivery itself.
    PolicySocketmap {
        /// Loopback address and port to listen on, e.g. 127.0.0.1:8461.
        #[arg(long)]
        listen: SocketAddr,
        /// Take the tenant policy (tlsPolicy) and DNS settings (dns) from this sidecar.yaml; its other fields
        /// must parse but are not used. Without it: the default policy and the resolvers in /etc/resolv.conf.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Delivery evidence logs.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
}

#[derive(Subcommand, Debug)]
enum EvidenceCommand {
    /// Check that every record of FILE parses and the hash chain is intact; print the record count and the
    /// last hash (record it elsewhere to detect later changes to the end of the log). Given a directory, check
    /// every evidence-*.jsonl in it, and with --heads compare each file with the chain heads the sidecar published.
    Verify {
        /// The `evidence` object of the sidecar's /status (`curl …/status | jq .evidence`): reports files deleted
        /// without a prune record, cut short or with a rewritten last line. Needs a directory.
        #[arg(long, value_name = "HEADS.json")]
        heads: Option<PathBuf>,
        /// An evidence file, or the evidence directory.
        #[arg(value_name = "FILE|DIR")]
        file: PathBuf,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    // One thread runs every task: per message the work is a few socket reads and writes and one signature, far
    // below a core at Postfix's delivery rates, and a multi-threaded scheduler spent more CPU waking idle workers
    // (futex calls, cross-core wake-ups) than it saved. Blocking file I/O still goes to the blocking pool, and
    // the evidence and warmup writers have threads of their own.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run_command(Cli::parse().command))
}

async fn run_command(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(&config).await?,
        Command::CheckDomain { domain, config } => check(&domain, config.as_deref()).await?,
        Command::PolicySocketmap { listen, config } => policy_socketmap(listen, config.as_deref()).await?,
        Command::Evidence {
            command: EvidenceCommand::Verify { heads, file },
        } => return verify_evidence(&file, heads.as_deref()),
    }
    Ok(ExitCode::SUCCESS)
}

/// A broken chain is the command's answer, not a failure of the tool: no "Error:" prefix or backtrace.
fn verify_evidence(path: &Path, heads: Option<&Path>) -> anyhow::Result<ExitCode> {
    if path.is_dir() {
        let heads = match heads {
            Some(heads_path) => {
                let json =
                    std::fs::read(heads_path).with_context(|| format!("cannot read heads {}", heads_path.display()))?;
                evidence::parse_heads(&json).with_context(|| format!("heads {}", heads_path.display()))?
            }
            None => evidence::Heads::default(),
        };
        let report = evidence::verify_dir(path, &heads)
            .with_context(|| format!("cannot list evidence directory {}", path.display()))?;
        for line in &report.ok {
            println!("{line}");
        }
        for line in &report.problems {
            eprintln!("{line}");
        }
        if !report.problems.is_empty() {
            return Ok(ExitCode::FAILURE);
        }
        println!("ok: {} files", report.ok.len());
        return Ok(ExitCode::SUCCESS);
    }
    if heads.is_some() {
        anyhow::bail!(
            "--heads compares a whole evidence directory; {} is not a directory",
            path.display()
        );
    }
    let reader = File::open(path)
        .map(BufReader::new)
        .with_context(|| format!("cannot open evidence log {}", path.display()))?;
    match evidence::verify(reader) {
        Ok(summary) => println!("ok: {summary}"),
        Err(err) => {
            eprintln!("{}: {err}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(domain: &str, config: Option<&Path>) -> anyhow::Result<()> {
    let report = match config {
        Some(path) => {
            let config = securemail_sidecar::config::load(path)?;
            // Never the pod's cache file: this command may run beside the sidecar that writes it.
            let sts_cache = Arc::new(StsCache::in_memory(Arc::new(clock::SystemClock)));
            check_domain(&PolicyResolver::from_config(&config, sts_cache)?, domain).await
        }
        None => {
            let dns = HickoryDns::from_settings(&DnsSettings::default())?;
            let fetcher = HttpsFetcher::from_system(dns.clone())?;
            let resolver = PolicyResolver::new(TlsPolicySpec::default(), dns, fetcher, Arc::new(clock::SystemClock));
            check_domain(&resolver, domain).await
        }
    };
    print!("{report}");
    Ok(())
}

fn init_logging() {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_current_span(false)
        .init();
}

/// Only the policy and DNS parts of the file are used, so the files and directories it names for delivery
/// (keys, evidence, state) need not exist here and are not created.
async fn policy_socketmap(listen: SocketAddr, config: Option<&Path>) -> anyhow::Result<()> {
    init_logging();
    let (spec, dns) = match config {
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            let config = securemail_sidecar::config::parse(path, &bytes)?;
            (config.tls_policy, config.dns)
        }
        None => (TlsPolicySpec::default(), DnsSettings::default()),
    };
    let on_failure = spec.on_failure;
    let dns = HickoryDns::from_settings(&dns)?;
    let fetcher = HttpsFetcher::from_system(dns.clone())?;
    let resolver = PolicyResolver::new(spec, dns, fetcher, Arc::new(clock::SystemClock));
    let server = SocketmapServer::bind(listen).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tracing::info!(listen = %server.local_addr()?, map = MAP_NAME, "TLS policy socketmap ready");
    server
        .serve(Arc::new(resolver), on_failure, SocketmapLimits::default(), shutdown)
        .await;
    tracing::info!("TLS policy socketmap stopped");
    Ok(())
}

async fn run(config_path: &Path) -> anyhow::Result<()> {
    init_logging();
    let (watcher, config) = ConfigWatcher::load(config_path)?;
    let initial = Arc::clone(&config.borrow());
    let keys = Arc::new(KeyStore::load(&initial.signing)?);
    let watcher = watcher.with_key_store(Arc::clone(&keys));
    let clock: Arc<dyn WallClock> = Arc::new(SystemClock);
    let mut registry = Registry::default();
    let metrics = Metrics::register(
        &mut registry,
        &initial.tenant,
        initial.source.address,
        Arc::clone(&clock),
    );
    let breakers = Arc::new(Breakers::new(
        BreakerSettings::default(),
        Arc::new(clock::SystemClock),
        Arc::clone(&clock),
        metrics.clone(),
    ));
    let readiness = Readiness::default();
    readiness.config_loaded.set(true);
    let now = jiff::Timestamp::now();
    let recorded = if initial.warmup.daily_limit.is_some() {
        recorded_warmup_counts(&initial.evidence.dir, now)
    } else {
        // A warm address has no allowance to recount, and its day of records can be long.
        BTreeMap::new()
    };
    let parts = EngineParts {
        sts_cache: Arc::new(StsCache::persistent(&initial.state_dir, Arc::new(clock::SystemClock))),
        keys,
        tls: Arc::new(TlsConfigs::with_native_roots()?),
        evidence: EvidenceWriter::spawn(EvidenceStore::open(&initial.evidence.dir, clock.now())?)?,
        metrics: metrics.clone(),
        clock,
        breakers: Arc::clone(&breakers),
        warmup: Arc::new(WarmupLimiter::load(
            &initial.state_dir,
            initial.warmup.clone(),
            now,
            &recorded,
        )?),
        evidence_writable: readiness.evidence_writable.clone(),
        egress: readiness.egress.clone(),
    };
    readiness.evidence_writable.set(true);
    let evidence = parts.evidence.clone();
    prune_evidence(&evidence, &initial, parts.clock.now()).await;
    let backend = Arc::new(LiveEngine {
        current: RwLock::new(Arc::new(parts.build(&initial)?)),
    });

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let reload_metrics = metrics.clone();
    tokio::spawn(watcher.run(DEFAULT_POLL_INTERVAL, shutdown.clone(), move |event| {
        if matches!(event, WatchEvent::ConfigRejected(_) | WatchEvent::KeysRejected(_)) {
            reload_metrics.config_rejected();
        }
    }));
    tokio::spawn(egress::run_checks(
        config.clone(),
        readiness.egress.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let day_counts = Arc::clone(&parts.warmup);
    tokio::spawn(prune_evidence_daily(
        evidence.clone(),
        config.clone(),
        Arc::clone(&parts.clock),
        shutdown.clone(),
    ));
    tokio::spawn(swap_engine_on_change(config.clone(), Arc::clone(&backend), parts));

    let admin = AdminServer::bind(initial.listen.admin).await?;
    let state = AdminState {
        readiness: readiness.clone(),
        registry: Arc::new(registry),
        refresh_metrics: queue_metrics(config.clone(), SystemTime::now, metrics.clone()),
        status: with_evidence(
            with_egress(
                with_reputation(
                    pod_status(config, SystemTime::now, move || {
                        day_counts.results(jiff::Timestamp::now())
                    }),
                    move || reputation::status(&metrics, &breakers),
                ),
                readiness.egress.clone(),
            ),
            evidence.heads(),
        ),
    };
    let admin = tokio::spawn(admin.serve(state, shutdown.clone()));

    let listener = LmtpListener::bind(&initial.listen.lmtp)?;
    readiness.lmtp_listening.set(true);
    tracing::info!(
        tenant = %initial.tenant,
        source = %initial.source.address,
        lmtp = %initial.listen.lmtp.display(),
        admin = %initial.listen.admin,
        "sidecar ready"
    );
    let limits = Limits {
        max_message_bytes: initial.max_message_bytes,
        ..Limits::default()
    };
    // Returns after shutdown, once the sessions in progress have had their answers.
    listener.serve(backend, limits, shutdown.clone()).await;
    readiness.lmtp_listening.set(false);
    shutdown.cancel();
    admin.await.context("admin server task")??;
    tracing::info!("sidecar stopped");
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => signal,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM; stop the sidecar with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: no new connections; finishing those in progress");
    shutdown.cancel();
}

/// Today's warmup counts in the evidence records, which the counters file may trail by half a second. A log that
/// cannot be read is reported and leaves the file's counts as they are.
fn recorded_warmup_counts(dir: &Path, now: jiff::Timestamp) -> BTreeMap<Provider, u32> {
    let day_start = now
        .to_zoned(jiff::tz::TimeZone::UTC)
        .start_of_day()
        .map_or(now, |midnight| midnight.timestamp());
    match evidence::warmup_counts(dir, day_start) {
        Ok(recount) => {
            for (path, line) in &recount.skipped {
                tracing::warn!(
                    path = %path.display(),
                    line_from_end = line,
                    "skipped an evidence line that is not a record while recounting today's warmup counts"
                );
            }
            recount.counts
        }
        Err(err) => {
            tracing::error!(
                %err,
                "cannot recount today's warmup counts from the evidence log; the counters file may miss the last \
                 half second of counts"
            );
            BTreeMap::new()
        }
    }
}

/// Deletes the evidence files past the configured retention, each after its prune record (see
/// `EvidenceStore::prune`). A failure is logged; nothing is deleted that was not recorded.
async fn prune_evidence(evidence: &EvidenceWriter, config: &SidecarConfig, now: jiff::Timestamp) {
    let tenant = match config.tenant.parse() {
        Ok(tenant) => tenant,
        Err(err) => {
            tracing::error!(%err, "cannot prune evidence: the tenant name cannot be recorded");
            return;
        }
    };
    let request = PruneRequest {
        now,
        retention_days: config.evidence.retention_days,
        tenant,
    };
    match evidence.prune(request).await {
        Ok(pruned) if pruned.is_empty() => {}
        Ok(pruned) => tracing::info!(files = pruned.len(), "pruned evidence files past their retention"),
        Err(err) => tracing::error!(%err, "cannot prune evidence files; every file not pruned yet is kept"),
    }
}

/// About once a day, with the retention of the configuration in use then.
async fn prune_evidence_daily(
    evidence: EvidenceWriter,
    config: watch::Receiver<Arc<SidecarConfig>>,
    clock: Arc<dyn WallClock>,
    shutdown: CancellationToken,
) {
    const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);
    loop {
        tokio::select! {
            () = tokio::time::sleep(DAY) => {}
            () = shutdown.cancelled() => return,
        }
        let current = Arc::clone(&config.borrow());
        prune_evidence(&evidence, &current, clock.now()).await;
    }
}

/// What every engine shares, whichever configuration built it: one evidence writer, one key store, one set of
/// metrics, one set of circuit breakers, one set of warmup counters, one MTA-STS policy cache.
struct EngineParts {
    /// MTA-STS policies, kept on the state volume.
    sts_cache: Arc<StsCache>,
    keys: Arc<KeyStore>,
    tls: Arc<TlsConfigs>,
    evidence: EvidenceWriter,
    metrics: Metrics,
    clock: Arc<dyn WallClock>,
    breakers: Arc<Breakers>,
    warmup: Arc<WarmupLimiter>,
    evidence_writable: ReadyFlag,
    egress: EgressHealth,
}

impl EngineParts {
    fn build(&self, config: &SidecarConfig) -> anyhow::Result<Engine<PolicyResolver>> {
        let session = SessionSettings {
            helo_name: config.source.hostname.clone(),
            source: config.source.address,
            egress: config.egress.clone(),
            port: 25,
            timeouts: Timeouts::default(),
        };
        // A sidecar.yaml from an older operator lists no pool: this pod's own address is the one known.
        let mut pool_addresses = config.pool_addresses.clone();
        if !pool_addresses.contains(&config.source.address) {
            pool_addresses.push(config.source.address);
        }
        let engine_config = EngineConfig {
            provider_suffixes: config.provider_suffixes.clone(),
            pool_addresses,
            ..EngineConfig::new(config.tenant.parse()?, session, config.tls_policy.on_failure)
        };
        Ok(Engine::new(
            engine_config,
            PolicyResolver::from_config(config, Arc::clone(&self.sts_cache))?,
            Arc::clone(&self.keys),
            Arc::clone(&self.tls),
            self.evidence.clone(),
            self.metrics.clone(),
            Arc::clone(&self.clock),
        )
        .with_breakers(Arc::clone(&self.breakers))
        .with_warmup(Arc::clone(&self.warmup))
        .with_evidence_writable(self.evidence_writable.clone())
        .with_egress(self.egress.clone()))
    }
}

/// Builds a new engine for every configuration the watcher accepts. Sockets stay where they were bound: a new
/// LMTP path or admin address takes a restart, which the operator's config checksum triggers anyway.
async fn swap_engine_on_change(
    mut config: watch::Receiver<Arc<SidecarConfig>>,
    backend: Arc<LiveEngine>,
    parts: EngineParts,
) {
    while config.changed().await.is_ok() {
        let latest = Arc::clone(&config.borrow_and_update());
        match parts.build(&latest) {
            Ok(engine) => {
                parts.warmup.set_caps(latest.warmup.clone());
                *backend.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(engine);
                tracing::info!("delivery engine rebuilt from the new configuration");
            }
            Err(err) => tracing::error!(%err, "cannot apply the new configuration; keeping the running engine"),
        }
    }
}

/// The backend Postfix talks to. A transaction keeps the engine it started with, so a reload never changes the
/// rules for mail already in flight.
struct LiveEngine {
    current: RwLock<Arc<Engine<PolicyResolver>>>,
}

impl LiveEngine {
    fn current(&self) -> Arc<Engine<PolicyResolver>> {
        Arc::clone(&self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

impl Backend for LiveEngine {
    async fn check_recipient(&self, envelope: &Envelope, recipient: &Recipient) -> RcptDecision {
        self.current().check_recipient(envelope, recipient).await
    }

    async fn deliver(&self, envelope: Envelope, message: Bytes) -> Vec<Reply> {
        self.current().deliver(envelope, message).await
    }
}
