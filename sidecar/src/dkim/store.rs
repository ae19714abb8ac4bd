//! The running [`Signer`] and its reload: the caller polls [`KeyStore::refresh`] on an interval and whenever
//! `sidecar.yaml` changes. Key files are compared by content digest, not mtime: Kubernetes replaces mounted
//! Secrets by swapping a symlink, and a digest cannot miss a change that lands within one timestamp tick.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use aws_lc_rs::digest;
use securemail_api::sidecar_config::SigningDomain;

use super::{KeyError, Signer};

/// Holds the signer in use; sessions take an `Arc` of it, so a reload never disturbs a signature in progress.
pub struct KeyStore {
    current: RwLock<Arc<Signer>>,
    loaded_from: Mutex<Snapshot>,
}

/// What [`KeyStore::refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    Unchanged,
    Reloaded,
}

/// The configuration and key file contents a load was attempted with.
#[derive(PartialEq)]
struct Snapshot {
    signing: Vec<SigningDomain>,
    /// SHA-256 per key file in configuration order; `None` when unreadable (loading then reports why).
    digests: Vec<Option<Vec<u8>>>,
}

impl Snapshot {
    fn take(signing: &[SigningDomain]) -> Self {
        let digests = signing
            .iter()
            .flat_map(|domain| &domain.keys)
            .map(|key| {
                let content = zeroize::Zeroizing::new(std::fs::read(&key.private_key_file).ok()?);
                Some(digest::digest(&digest::SHA256, &content).as_ref().to_vec())
            })
            .collect();
        Self {
            signing: signing.to_vec(),
            digests,
        }
    }
}

impl KeyStore {
    /// Loads every key at start-up; any failure is fatal here, since there is no previous signer to keep.
    pub fn load(signing: &[SigningDomain]) -> Result<Self, KeyError> {
        // Snapshot before loading, so a file replaced during the load is seen as changed by the next refresh.
        let snapshot = Snapshot::take(signing);
        let signer = Signer::load(signing)?;
        Ok(Self {
            current: RwLock::new(Arc::new(signer)),
            loaded_from: Mutex::new(snapshot),
        })
    }

    /// The signer to use for the next message.
    pub fn signer(&self) -> Arc<Signer> {
        // The lock only guards an `Arc` swap, which cannot be left half done; a poisoned lock is still usable.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reloads when `signing` or any key file changed since the last attempt. When the new keys fail to load,
    /// the running signer stays and the error is returned once; the next change is tried again. Blocking file
    /// I/O: run it off the async executor.
    pub fn refresh(&self, signing: &[SigningDomain]) -> Result<Refresh, KeyError> {
        let mut loaded_from = self.loaded_from.lock().unwrap_or_else(PoisonError::into_inner);
        let snapshot = Snapshot::take(signing);
        if *loaded_from == snapshot {
            return Ok(Refresh::Unchanged);
        }
        *loaded_from = snapshot;
        let signer = Signer::load(signing)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(signer);
        Ok(Refresh::Reloaded)
    }
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("signer", &self.signer())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use securemail_api::tenant::DkimAlgorithm;

    use super::super::tests::{MESSAGE, NOW, domain, unfolded, write_key};
    use super::*;

    /// Replaces a key file the way Kubernetes updates a mounted Secret: a new file moved into place.
    fn replace(path: &Path, write: impl FnOnce(&Path)) {
        let staged = path.with_extension("staged");
        write(&staged);
        std::fs::rename(&staged, path).unwrap();
    }

    #[test]
    fn refresh_keeps_the_signer_while_nothing_changed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ed25519.pem");
        write_key(&key, DkimAlgorithm::Ed25519Sha256);
        let config = [domain("example.org", &[("sm", DkimAlgorithm::Ed25519Sha256, &key)])];
        let store = KeyStore::load(&config).unwrap();
        let before = store.signer();

        assert_eq!(store.refresh(&config).unwrap(), Refresh::Unchanged);
        assert!(Arc::ptr_eq(&before, &store.signer()));
    }

    #[test]
    fn refresh_picks_up_a_replaced_key_file_and_in_flight_holders_keep_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ed25519.pem");
        write_key(&key, DkimAlgorithm::Ed25519Sha256);
        let config = [domain("example.org", &[("sm", DkimAlgorithm::Ed25519Sha256, &key)])];
        let store = KeyStore::load(&config).unwrap();
        let old = store.signer();
        let old_signature = old.sign(MESSAGE, NOW).unwrap();

        replace(&key, |path| write_key(path, DkimAlgorithm::Ed25519Sha256));
        assert_eq!(store.refresh(&config).unwrap(), Refresh::Reloaded);

        // Ed25519 is deterministic: the same message and time give another signature only under another key.
        assert_ne!(store.signer().sign(MESSAGE, NOW).unwrap(), old_signature);
        assert_eq!(old.sign(MESSAGE, NOW).unwrap(), old_signature);
    }

    #[test]
    fn a_key_that_fails_to_load_keeps_the_running_signer_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ed25519.pem");
        write_key(&key, DkimAlgorithm::Ed25519Sha256);
        let config = [domain("example.org", &[("sm", DkimAlgorithm::Ed25519Sha256, &key)])];
        let store = KeyStore::load(&config).unwrap();
        let running = store.signer();
        let signature = running.sign(MESSAGE, NOW).unwrap();

        replace(&key, |path| {
            std::fs::write(path, format!("{}\ntruncated", securemail_api::pkcs8_pem::header())).unwrap()
        });
        let err = store.refresh(&config).unwrap_err();
        assert!(err.to_string().contains(key.to_str().unwrap()), "{err}");
        assert!(Arc::ptr_eq(&running, &store.signer()));
        assert_eq!(store.signer().sign(MESSAGE, NOW).unwrap(), signature);
        assert_eq!(store.refresh(&config).unwrap(), Refresh::Unchanged);

        replace(&key, |path| write_key(path, DkimAlgorithm::Ed25519Sha256));
        assert_eq!(store.refresh(&config).unwrap(), Refresh::Reloaded);
        assert_ne!(store.signer().sign(MESSAGE, NOW).unwrap(), signature);
    }

    #[test]
    fn refresh_follows_configuration_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (ed25519, rsa) = (dir.path().join("ed25519.pem"), dir.path().join("rsa.pem"));
        write_key(&ed25519, DkimAlgorithm::Ed25519Sha256);
        write_key(&rsa, DkimAlgorithm::RsaSha256);
        let single = [domain(
            "example.org",
            &[("sm-ed", DkimAlgorithm::Ed25519Sha256, &ed25519)],
        )];
        let dual = [domain(
            "example.org",
            &[
                ("sm-ed", DkimAlgorithm::Ed25519Sha256, &ed25519),
                ("sm-rsa", DkimAlgorithm::RsaSha256, &rsa),
            ],
        )];
        let store = KeyStore::load(&single).unwrap();
        assert_eq!(unfolded(&store.signer().sign(MESSAGE, NOW).unwrap()).len(), 1);

        assert_eq!(store.refresh(&dual).unwrap(), Refresh::Reloaded);
        assert_eq!(unfolded(&store.signer().sign(MESSAGE, NOW).unwrap()).len(), 2);
        assert_eq!(store.refresh(&dual).unwrap(), Refresh::Unchanged);
    }
}
