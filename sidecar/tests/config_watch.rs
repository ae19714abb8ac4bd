//! Live reload of sidecar.yaml and the DKIM keys, with files replaced the way Kubernetes replaces mounted
//! ConfigMaps and Secrets: a new timestamped directory, then an atomic rename of the `..data` symlink.
#![allow(clippy::unwrap_used, reason = "test set-up: a panic is the failure report")]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::encoding::{AsDer as _, Pkcs8V1Der};
use aws_lc_rs::signature::Ed25519KeyPair;
use securemail_api::sidecar_config::{
    DnsSettings, Egress, EvidenceSettings, Listen, SidecarConfig, SigningDomain, SigningKey, SourceAddress, WarmupCaps,
};
use securemail_api::tenant::{DkimAlgorithm, ProviderShares, TlsPolicySpec};
use securemail_sidecar::config::{ConfigError, ConfigWatcher, WatchEvent};
use securemail_sidecar::dkim::KeyStore;
use tokio_util::sync::CancellationToken;

const MESSAGE: &[u8] = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n";

fn ed25519_pem() -> Vec<u8> {
    let der: Pkcs8V1Der = Ed25519KeyPair::generate().unwrap().as_der().unwrap();
    securemail_api::pkcs8_pem::encode(der.as_ref()).as_bytes().to_vec()
}

fn sample(data_dir: &Path, key_file: PathBuf) -> SidecarConfig {
    SidecarConfig {
        tenant: "tenant-a/clinic".into(),
        source: SourceAddress {
            address: "192.0.2.10".parse().unwrap(),
            hostname: "mta1.example.org".into(),
        },
        listen: Listen {
            lmtp: data_dir.join("lmtp.sock"),
            admin: "127.0.0.1:9090".parse().unwrap(),
        },
        signing: vec![SigningDomain {
            domain: "example.org".into(),
            keys: vec![SigningKey {
                selector: "sm-ed".into(),
                algorithm: DkimAlgorithm::Ed25519Sha256,
                private_key_file: key_file,
            }],
        }],
        tls_policy: TlsPolicySpec::default(),
        warmup: WarmupCaps {
            day: Some(1),
            daily_limit: Some(100),
            provider_shares: ProviderShares::default(),
        },
        evidence: EvidenceSettings {
            dir: data_dir.join("evidence"),
            retention_days: 2190,
        },
        state_dir: data_dir.join("state"),
        max_message_bytes: 1024,
        dns: DnsSettings::default(),
        postfix_queue_dir: None,
        provider_suffixes: Vec::new(),
        pool_addresses: Vec::new(),
        egress: Egress::Direct,
    }
}

fn yaml(config: &SidecarConfig) -> Vec<u8> {
    serde_yaml::to_string(config).unwrap().into_bytes()
}

/// A directory updated like kubelet's atomic writer: `name -> ..data/name`, `..data -> ..<generation>`.
struct KubeMount {
    dir: PathBuf,
    generation: u32,
}

impl KubeMount {
    fn new(dir: PathBuf, files: &[(&str, &[u8])]) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let mut mount = Self { dir, generation: 0 };
        mount.update(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(Path::new("..data").join(name), mount.dir.join(name)).unwrap();
        }
        mount
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn update(&mut self, files: &[(&str, &[u8])]) {
        let old = format!("..gen{}", self.generation);
        self.generation += 1;
        let new = format!("..gen{}", self.generation);
        std::fs::create_dir(self.dir.join(&new)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.join(&new).join(name), content).unwrap();
        }
        std::os::unix::fs::symlink(&new, self.dir.join("..data_tmp")).unwrap();
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.join(old));
    }
}

/// Replaces `path` by a rename, as editors and config management do.
fn replace(path: &Path, content: &[u8]) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, content).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn names(events: &[WatchEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|event| match event {
            WatchEvent::ConfigReloaded => "config reloaded",
            WatchEvent::ConfigRejected(_) => "config rejected",
            WatchEvent::KeysReloaded => "keys reloaded",
            WatchEvent::KeysRejected(_) => "keys rejected",
        })
        .collect()
}

#[test]
fn a_changed_valid_file_is_published_and_an_unchanged_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, ed25519_pem()).unwrap();
    let path = dir.path().join("sidecar.yaml");
    let mut config = sample(dir.path(), key.clone());
    std::fs::write(&path, yaml(&config)).unwrap();
    let (mut watcher, mut receiver) = ConfigWatcher::load(&path).unwrap();
    assert_eq!(*receiver.borrow_and_update().as_ref(), config);

    assert!(watcher.poll().is_empty());
    assert!(!receiver.has_changed().unwrap());

    config.warmup.daily_limit = Some(200);
    replace(&path, &yaml(&config));
    assert_eq!(names(&watcher.poll()), ["config reloaded"]);
    assert!(receiver.has_changed().unwrap());
    assert_eq!(receiver.borrow_and_update().warmup.daily_limit, Some(200));

    // New bytes with the same meaning (a comment) publish nothing: consumers see no spurious change.
    let mut commented = b"# rendered by the operator\n".to_vec();
    commented.extend(yaml(&config));
    replace(&path, &commented);
    assert!(watcher.poll().is_empty());
    assert!(!receiver.has_changed().unwrap());
}

#[test]
fn an_invalid_edit_keeps_the_running_config_and_is_reported_once_with_the_same_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, ed25519_pem()).unwrap();
    let path = dir.path().join("sidecar.yaml");
    let config = sample(dir.path(), key);
    std::fs::write(&path, yaml(&config)).unwrap();
    let (mut watcher, receiver) = ConfigWatcher::load(&path).unwrap();

    let broken = String::from_utf8(yaml(&config))
        .unwrap()
        .replace("maxMessageBytes: 1024", "maxMessageBytes: -1");
    replace(&path, broken.as_bytes());
    let events = watcher.poll();
    let [WatchEvent::ConfigRejected(err)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    for expected in [path.to_str().unwrap(), "maxMessageBytes", "line "] {
        assert!(err.to_string().contains(expected), "{expected:?} missing from {err}");
    }
    assert_eq!(*receiver.borrow().as_ref(), config);
    assert!(watcher.poll().is_empty(), "reported again");

    std::fs::remove_file(&path).unwrap();
    assert_eq!(names(&watcher.poll()), ["config rejected"]);
    assert_eq!(*receiver.borrow().as_ref(), config);

    let mut fixed = config.clone();
    fixed.max_message_bytes = 2048;
    replace(&path, &yaml(&fixed));
    assert_eq!(names(&watcher.poll()), ["config reloaded"]);
    assert_eq!(*receiver.borrow().as_ref(), fixed);
}

#[test]
fn kubernetes_symlink_swaps_of_the_configmap_and_the_key_secret_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut keys = KubeMount::new(dir.path().join("dkim"), &[("sm-ed.pem", &ed25519_pem())]);
    let mut config = sample(&dir.path().join("data"), keys.path("sm-ed.pem"));
    let mut configs = KubeMount::new(dir.path().join("config"), &[("sidecar-0.yaml", &yaml(&config))]);
    let path = configs.path("sidecar-0.yaml");
    let (watcher, receiver) = ConfigWatcher::load(&path).unwrap();
    let store = Arc::new(KeyStore::load(&receiver.borrow().signing).unwrap());
    let mut watcher = watcher.with_key_store(Arc::clone(&store));
    let first_signer = store.signer();
    let first_signature = first_signer.sign(MESSAGE, jiff::Timestamp::UNIX_EPOCH).unwrap();
    assert!(watcher.poll().is_empty());

    config.warmup.day = Some(2);
    configs.update(&[("sidecar-0.yaml", &yaml(&config))]);
    assert_eq!(names(&watcher.poll()), ["config reloaded"]);
    assert_eq!(receiver.borrow().warmup.day, Some(2));

    // Secret rotation: same path, new key behind the swapped symlink.
    keys.update(&[("sm-ed.pem", &ed25519_pem())]);
    assert_eq!(names(&watcher.poll()), ["keys reloaded"]);
    let rotated = store.signer().sign(MESSAGE, jiff::Timestamp::UNIX_EPOCH).unwrap();
    assert_ne!(
        rotated, first_signature,
        "Ed25519 is deterministic: only a new key signs differently"
    );
    // A holder of the old signer (a session in flight) still signs with it.
    assert_eq!(
        first_signer.sign(MESSAGE, jiff::Timestamp::UNIX_EPOCH).unwrap(),
        first_signature
    );

    // A broken key is refused once; the rotated key keeps signing.
    keys.update(&[("sm-ed.pem", b"not a key")]);
    let events = watcher.poll();
    let [WatchEvent::KeysRejected(err)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(err.to_string().contains("sm-ed.pem"), "{err}");
    assert!(!err.to_string().contains("not a key"), "{err}");
    assert_eq!(
        store.signer().sign(MESSAGE, jiff::Timestamp::UNIX_EPOCH).unwrap(),
        rotated
    );
    assert!(watcher.poll().is_empty());
}

#[test]
fn a_file_naming_a_key_not_yet_mounted_is_taken_once_the_key_appears_without_a_second_report() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, ed25519_pem()).unwrap();
    let path = dir.path().join("sidecar.yaml");
    let mut config = sample(dir.path(), key);
    std::fs::write(&path, yaml(&config)).unwrap();
    let (mut watcher, receiver) = ConfigWatcher::load(&path).unwrap();

    let new_key = dir.path().join("new-key.pem");
    config.signing[0].keys[0].private_key_file = new_key.clone();
    replace(&path, &yaml(&config));
    let events = watcher.poll();
    let [WatchEvent::ConfigRejected(err)] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(err.to_string().contains("new-key.pem"), "{err}");
    assert!(watcher.poll().is_empty());

    std::fs::write(&new_key, ed25519_pem()).unwrap();
    assert_eq!(names(&watcher.poll()), ["config reloaded"]);
    assert_eq!(receiver.borrow().signing[0].keys[0].private_key_file, new_key);
}

#[tokio::test]
async fn run_publishes_changes_and_hands_every_event_to_the_hook_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, ed25519_pem()).unwrap();
    let path = dir.path().join("sidecar.yaml");
    let mut config = sample(dir.path(), key);
    std::fs::write(&path, yaml(&config)).unwrap();
    let (watcher, mut receiver) = ConfigWatcher::load(&path).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = {
        let seen = Arc::clone(&seen);
        move |event: &WatchEvent| seen.lock().unwrap().push(names(std::slice::from_ref(event))[0])
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(watcher.run(Duration::from_millis(20), shutdown.clone(), hook));

    replace(&path, b"tenant: [");
    let reported = async {
        while seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reported).await.unwrap();
    config.warmup.daily_limit = Some(7);
    replace(&path, &yaml(&config));
    tokio::time::timeout(Duration::from_secs(10), receiver.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(receiver.borrow().warmup.daily_limit, Some(7));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), ["config rejected", "config reloaded"]);
}
