//! Live reload of `sidecar.yaml` and the DKIM key files. Kubernetes updates ConfigMap and Secret mounts by
//! swapping a `..data` symlink, which inotify on the file path does not report reliably, so the watcher polls and
//! compares content digests. Consumers read the current configuration per transaction from the `watch` channel,
//! so a reload never touches a session in flight.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use securemail_api::sidecar_config::SidecarConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ConfigError, ContentDigest, read};
use crate::dkim::{KeyError, KeyStore, Refresh};

/// Kubernetes takes up to a minute to propagate a ConfigMap change; polling faster than that gains little.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// What one poll changed or refused. Refusals are reported once per distinct file content (or read error), not on
/// every poll.
#[derive(Debug)]
pub enum WatchEvent {
    /// A new valid configuration was published.
    ConfigReloaded,
    /// The file changed but was refused; the previous configuration stays in use.
    ConfigRejected(ConfigError),
    /// The DKIM keys were reloaded (key files or the signing section changed).
    KeysReloaded,
    /// New DKIM keys failed to load; the running signer stays in use.
    KeysRejected(KeyError),
}

/// What the last poll saw of the file, valid or not.
#[derive(PartialEq, Eq)]
enum Seen {
    Content(ContentDigest),
    Unreadable(io::ErrorKind),
}

/// Polls `sidecar.yaml` (and the key files it names) and publishes each valid change.
pub struct ConfigWatcher {
    path: PathBuf,
    seen: Seen,
    /// Whether the content in `seen` was accepted; a refused one is tried again.
    accepted: bool,
    sender: watch::Sender<Arc<SidecarConfig>>,
    keys: Option<Arc<KeyStore>>,
}

impl ConfigWatcher {
    /// Loads `path` (an error here is fatal: there is no configuration to keep) and returns the watcher with the
    /// receiver every consumer clones. Blocking file I/O; call at start-up.
    pub fn load(path: &Path) -> Result<(Self, watch::Receiver<Arc<SidecarConfig>>), ConfigError> {
        let (config, digest) = read(path)?;
        let (sender, receiver) = watch::channel(Arc::new(config));
        let watcher = Self {
            path: path.to_owned(),
            seen: Seen::Content(digest),
            accepted: true,
            sender,
            keys: None,
        };
        Ok((watcher, receiver))
    }

    /// Also reloads `keys` whenever a key file or the signing section changes (Secret rotation needs no restart).
    pub fn with_key_store(mut self, keys: Arc<KeyStore>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// A receiver of the current configuration, for consumers started later.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SidecarConfig>> {
        self.sender.subscribe()
    }

    /// One poll: re-reads the file and the key files and publishes a valid change. Every event is also logged.
    /// Blocking file I/O: [`run`](Self::run) calls it off the async executor.
    pub fn poll(&mut self) -> Vec<WatchEvent> {
        let mut events = Vec::new();
        if let Some(event) = self.poll_config() {
            events.push(event);
        }
        if let Some(keys) = &self.keys {
            let signing = self.sender.borrow().signing.clone();
            match keys.refresh(&signing) {
                Ok(Refresh::Unchanged) => {}
                Ok(Refresh::Reloaded) => {
                    tracing::info!("DKIM keys reloaded");
                    events.push(WatchEvent::KeysReloaded);
                }
                Err(err) => {
                    tracing::error!(%err, "new DKIM keys refused; signing with the previous keys");
                    events.push(WatchEvent::KeysRejected(err));
                }
            }
        }
        events
    }

    fn poll_config(&mut self) -> Option<WatchEvent> {
        let seen = match std::fs::read(&self.path) {
            Ok(bytes) => Seen::Content(ContentDigest::of(&bytes)),
            Err(err) => Seen::Unreadable(err.kind()),
        };
        let unchanged = seen == self.seen;
        if unchanged && self.accepted {
            return None;
        }
        self.seen = seen;
        // Read again through `read`, so the digest kept is the one of the bytes actually parsed; a swap between
        // the two reads is picked up by the next poll.
        let result = read(&self.path);
        self.accepted = result.is_ok();
        match result {
            Ok((config, digest)) => {
                self.seen = Seen::Content(digest);
                let changed = self.sender.send_if_modified(|current| {
                    let changed = **current != config;
                    if changed {
                        *current = Arc::new(config);
                    }
                    changed
                });
                changed.then(|| {
                    tracing::info!(path = %self.path.display(), "sidecar config reloaded");
                    WatchEvent::ConfigReloaded
                })
            }
            // A refused file is retried on every poll without being reported again: it may name a key file whose
            // Secret mount has not caught up yet.
            Err(_) if unchanged => None,
            Err(err) => {
                tracing::error!(%err, "new sidecar config refused; keeping the running one");
                Some(WatchEvent::ConfigRejected(err))
            }
        }
    }

    /// Polls every `interval` until `shutdown`, handing each event to `on_event` (e.g. a metrics counter).
    pub async fn run(
        mut self,
        interval: Duration,
        shutdown: CancellationToken,
        mut on_event: impl FnMut(&WatchEvent) + Send + 'static,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the file was just loaded.
        ticker.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let polled = tokio::task::spawn_blocking(move || {
                let events = self.poll();
                (self, events)
            })
            .await;
            match polled {
                Ok((watcher, events)) => {
                    self = watcher;
                    events.iter().for_each(&mut on_event);
                }
                Err(err) => {
                    tracing::error!(%err, "sidecar config watcher stopped; configuration changes need a restart");
                    return;
                }
            }
        }
    }
}

impl std::fmt::Debug for ConfigWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigWatcher")
            .field("path", &self.path)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}
