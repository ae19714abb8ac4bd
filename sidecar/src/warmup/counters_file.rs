//! The counters' file: two fixed slots written in turn, in place, each one line `<sequence> <SHA-256 of the JSON>
//! <JSON>` padded with spaces. Storing is one positioned write and one `fdatasync` of a file whose size never
//! changes: no rename, no directory flush, no new blocks (so it keeps working on a full volume). A write cut short
//! by a crash leaves the other slot whole, and the checksum tells which slot that is.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::WarmupError;
use crate::evidence::Sha256Hex;

const FILE_NAME: &str = "warmup-counters";
/// Read once when [`FILE_NAME`] does not exist yet: the whole-file JSON earlier sidecars replaced on every change.
const EARLIER_FILE_NAME: &str = "warmup-counters.json";
const SLOT_BYTES: usize = 4096;
const SLOTS: usize = 2;

/// The open file and the sequence number of the last slot written.
#[derive(Debug)]
pub struct CountersFile {
    path: PathBuf,
    file: File,
    sequence: u64,
}

impl CountersFile {
    /// Opens the file in `state_dir`, creating it (from an earlier sidecar's file when there is one), and returns
    /// the last value stored. Unreadable or corrupt contents are an error: the caller must not start from zero.
    pub fn open<T: DeserializeOwned + Serialize>(state_dir: &Path) -> Result<(Self, Option<T>), WarmupError> {
        let path = state_dir.join(FILE_NAME);
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WarmupError::Io { path, source }
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error(&path))?;
        let mut bytes = vec![0; SLOT_BYTES * SLOTS];
        let len = file.metadata().map_err(io_error(&path))?.len();
        if len == 0 {
            // Zeros written, not a sparse `set_len`: the blocks are allocated now, so later writes need none.
            file.write_all_at(&bytes, 0).map_err(io_error(&path))?;
            file.sync_all().map_err(io_error(&path))?;
            if !existed {
                fs::File::open(state_dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io_error(state_dir))?;
            }
        } else if len == (SLOT_BYTES * SLOTS) as u64 {
            file.read_exact_at(&mut bytes, 0).map_err(io_error(&path))?;
        } else {
            return Err(corrupt(&path, format!("{len} bytes instead of {}", SLOT_BYTES * SLOTS)));
        }
        let latest = bytes
            .chunks(SLOT_BYTES)
            .filter_map(|slot| parse_slot(slot).ok())
            .max_by_key(|(sequence, _)| *sequence);
        let (sequence, value) = match latest {
            Some((sequence, json)) => {
                let value = serde_json::from_str(json).map_err(|err| corrupt(&path, err.to_string()))?;
                (sequence, Some(value))
            }
            None if bytes.iter().all(|&byte| byte == 0) => (0, None),
            None => {
                let reason = bytes
                    .chunks(SLOT_BYTES)
                    .filter_map(|slot| parse_slot(slot).err())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(corrupt(&path, reason));
            }
        };
        let mut counters_file = Self { path, file, sequence };
        if value.is_some() {
            return Ok((counters_file, value));
        }
        let earlier_path = state_dir.join(EARLIER_FILE_NAME);
        let earlier: Option<T> = match fs::read(&earlier_path) {
            Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|err| corrupt(&earlier_path, err.to_string()))?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(WarmupError::Io {
                    path: earlier_path,
                    source,
                });
            }
        };
        if let Some(earlier) = &earlier {
            // Carried over before the earlier file goes, so a crash in between loses nothing.
            counters_file.store(earlier).map_err(io_error(&counters_file.path))?;
            fs::remove_file(&earlier_path).map_err(io_error(&earlier_path))?;
        }
        Ok((counters_file, earlier))
    }

    /// Writes `value` into the slot not holding the latest value and flushes it to disk.
    pub fn store<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        let sequence = self.sequence + 1;
        let json = serde_json::to_string(value).map_err(io::Error::other)?;
        let mut slot = format!("{sequence} {} {json}", Sha256Hex::of(json.as_bytes())).into_bytes();
        if slot.len() >= SLOT_BYTES {
            return Err(io::Error::other(format!(
                "the counters take {} bytes, more than a slot's {SLOT_BYTES}",
                slot.len()
            )));
        }
        slot.resize(SLOT_BYTES - 1, b' ');
        slot.push(b'\n');
        let slot_index = usize::try_from(sequence % SLOTS as u64).unwrap_or(0);
        self.file.write_all_at(&slot, (slot_index * SLOT_BYTES) as u64)?;
        self.file.sync_data()?;
        self.sequence = sequence;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file every write to which fails as on a full volume.
    #[cfg(test)]
    pub fn unwritable() -> Self {
        let path = PathBuf::from("/dev/full");
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        Self {
            path,
            file,
            sequence: 0,
        }
    }
}

/// A slot's sequence number and JSON, or why it holds none (never written, or cut short).
fn parse_slot(slot: &[u8]) -> Result<(u64, &str), String> {
    if slot.iter().all(|&byte| byte == 0) {
        return Err("an empty slot".to_owned());
    }
    let text = std::str::from_utf8(slot).map_err(|_| "a slot that is not text".to_owned())?;
    let mut fields = text.trim_end().splitn(3, ' ');
    let (Some(sequence), Some(checksum), Some(json)) = (fields.next(), fields.next(), fields.next()) else {
        return Err("a slot without sequence, checksum and counts".to_owned());
    };
    let sequence = sequence
        .parse()
        .map_err(|_| format!("a slot whose sequence {sequence:?} is not a number"))?;
    if Sha256Hex::of(json.as_bytes()).to_string() != checksum {
        return Err(format!("slot {sequence} does not match its checksum"));
    }
    Ok((sequence, json))
}

fn corrupt(path: &Path, reason: String) -> WarmupError {
    WarmupError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_whole_slot_wins_and_a_torn_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (mut file, stored) = CountersFile::open::<Vec<u32>>(dir.path()).unwrap();
        assert_eq!(stored, None);
        // Allocated, not sparse: a full volume cannot refuse the writes to come.
        let blocks = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(dir.path().join(FILE_NAME)).unwrap());
        assert!(blocks * 512 >= (SLOT_BYTES * SLOTS) as u64, "{blocks} blocks");
        for n in 1..=3 {
            file.store(&vec![n]).unwrap();
        }
        drop(file);
        let (_, stored) = CountersFile::open::<Vec<u32>>(dir.path()).unwrap();
        assert_eq!(stored, Some(vec![3]));

        // A write cut short in the slot of the latest value: the slot before it still holds the one before.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        bytes[SLOT_BYTES + 40] ^= 0x55;
        fs::write(&path, &bytes).unwrap();
        let (_, stored) = CountersFile::open::<Vec<u32>>(dir.path()).unwrap();
        assert_eq!(stored, Some(vec![2]));

        // Both slots damaged: refused, never zero.
        bytes[40] ^= 0x55;
        fs::write(&path, &bytes).unwrap();
        let err = CountersFile::open::<Vec<u32>>(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not match its checksum"), "{err}");
        fs::write(&path, b"short").unwrap();
        let err = CountersFile::open::<Vec<u32>>(dir.path()).unwrap_err();
        assert!(err.to_string().contains("5 bytes instead of 8192"), "{err}");
    }

    #[test]
    fn an_earlier_sidecars_file_is_carried_over_once() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(EARLIER_FILE_NAME), b"[7]").unwrap();
        let (_, stored) = CountersFile::open::<Vec<u32>>(dir.path()).unwrap();
        assert_eq!(stored, Some(vec![7]));
        assert!(!dir.path().join(EARLIER_FILE_NAME).exists());
        let (_, stored) = CountersFile::open::<Vec<u32>>(dir.path()).unwrap();
        assert_eq!(stored, Some(vec![7]));

        fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        fs::write(dir.path().join(EARLIER_FILE_NAME), b"{not json").unwrap();
        assert!(CountersFile::open::<Vec<u32>>(dir.path()).is_err());
    }
}
