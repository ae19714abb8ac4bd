//! `sidecar.yaml`: read once at start (a failure is fatal there) and then watched by [`ConfigWatcher`], which keeps
//! the running configuration whenever a new file is refused. serde refuses unknown fields and wrong types (its
//! messages carry the field path and line); [`validate`] adds the checks serde cannot make.

mod watch;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use aws_lc_rs::digest;
use securemail_api::sidecar_config::SidecarConfig;

pub use watch::{ConfigWatcher, DEFAULT_POLL_INTERVAL, WatchEvent};

/// Why a `sidecar.yaml` was refused. Every message names the file; parse errors add the field path and line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("sidecar config {}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },

    /// `message` is serde_yaml's, `field.path: problem`, with its location moved to `line` and `column`.
    #[error("sidecar config {}{}: {message}", path.display(), At(*line, *column))]
    Parse {
        path: PathBuf,
        message: String,
        /// 1-based line and column of the problem; `None` when unknown or when `message` names several places
        /// itself (YAML syntax errors).
        line: Option<usize>,
        column: Option<usize>,
    },

    #[error("sidecar config {}: {}", path.display(), Problems(problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

/// A value that parsed but cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path of the field as written in the file, e.g. `signing[0].keys[1].privateKeyFile`.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// `, line L column C` when known.
struct At(Option<usize>, Option<usize>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            At(Some(line), Some(column)) => write!(f, ", line {line} column {column}"),
            At(Some(line), None) => write!(f, ", line {line}"),
            _ => Ok(()),
        }
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

/// Reads, parses and validates `path`. Blocking file I/O.
pub fn load(path: &Path) -> Result<SidecarConfig, ConfigError> {
    read(path).map(|(config, _)| config)
}

/// The configuration and the SHA-256 of the exact bytes it came from, so a watcher compares what was parsed.
fn read(path: &Path) -> Result<(SidecarConfig, ContentDigest), ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let digest = ContentDigest::of(&bytes);
    let config = parse(path, &bytes)?;
    validate(path, &config)?;
    Ok((config, digest))
}

/// Parses `bytes` as the content of `path` (named in errors).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<SidecarConfig, ConfigError> {
    serde_yaml::from_slice(bytes).map_err(|err| {
        let message = err.to_string();
        let Some(location) = err.location() else {
            return ConfigError::Parse {
                path: path.to_owned(),
                message,
                line: None,
                column: None,
            };
        };
        let (line, column) = (location.line(), location.column());
        // serde_yaml appends the location to most messages but leaves it out at line 1 column 1; it is shown in
        // one place for all. Syntax errors carry their own locations and are kept as they are.
        let (message, line, column) = match message.strip_suffix(&format!(" at line {line} column {column}")) {
            Some(stripped) => (stripped.to_owned(), Some(line), Some(column)),
            None if message.contains(" at line ") => (message, None, None),
            None => (message, Some(line), Some(column)),
        };
        ConfigError::Parse {
            path: path.to_owned(),
            message,
            line,
            column,
        }
    })
}

/// The checks serde cannot make. Creates the evidence and state directories when missing (the sidecar needs them
/// anyway, and creating is the only reliable test that it can). Reports every problem, not just the first.
pub fn validate(path: &Path, config: &SidecarConfig) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let mut problem = |field: String, reason: String| problems.push(Problem { field, reason });

    if let Err(reason) = check_tenant(&config.tenant) {
        problem("tenant".into(), format!("{:?} {reason}", config.tenant));
    }
    if !config.listen.lmtp.is_absolute() {
        problem(
            "listen.lmtp".into(),
            format!("{} is not an absolute path", config.listen.lmtp.display()),
        );
    }
    for (d, domain) in config.signing.iter().enumerate() {
        for (k, key) in domain.keys.iter().enumerate() {
            if let Err(reason) = check_readable_file(&key.private_key_file) {
                problem(format!("signing[{d}].keys[{k}].privateKeyFile"), reason);
            }
        }
    }
    for (field, dir) in [("evidence.dir", &config.evidence.dir), ("stateDir", &config.state_dir)] {
        if let Err(reason) = check_creatable_dir(dir) {
            problem(field.into(), reason);
        }
    }
    if config.max_message_bytes == 0 {
        problem("maxMessageBytes".into(), "must be greater than 0".into());
    }
    if let Some(queue_dir) = &config.postfix_queue_dir
        && !queue_dir.is_absolute()
    {
        problem(
            "postfixQueueDir".into(),
            format!("{} is not an absolute path", queue_dir.display()),
        );
    }

    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

/// `namespace/name`: a DNS label (RFC 1123) and a DNS subdomain, as Kubernetes requires of a namespaced object.
fn check_tenant(tenant: &str) -> Result<(), &'static str> {
    let Some((namespace, name)) = tenant.split_once('/') else {
        return Err("is not namespace/name");
    };
    if namespace.len() > 63 || !is_dns_label(namespace) {
        return Err("has a namespace that is not a DNS label");
    }
    if name.len() > 253 || !name.split('.').all(is_dns_label) {
        return Err("has a name that is not a DNS subdomain");
    }
    Ok(())
}

fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// Opens the file for reading (and closes it unread: key bytes stay out of this module).
fn check_readable_file(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown} is not an absolute path"));
    }
    let file = File::open(path).map_err(|err| format!("cannot open {shown}: {err}"))?;
    let metadata = file
        .metadata()
        .map_err(|err| format!("cannot inspect {shown}: {err}"))?;
    if !metadata.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    Ok(())
}

fn check_creatable_dir(path: &Path) -> Result<(), String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!("{shown} is not an absolute path"));
    }
    std::fs::create_dir_all(path).map_err(|err| format!("cannot create {shown}: {err}"))
}

/// SHA-256 of a file's content.
#[derive(Clone, PartialEq, Eq)]
struct ContentDigest(Vec<u8>);

impl ContentDigest {
    fn of(bytes: &[u8]) -> Self {
        Self(digest::digest(&digest::SHA256, bytes).as_ref().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_must_be_a_kubernetes_namespace_and_name() {
        for good in ["tenant-a/clinic", "a/b.c-d", "x1/y"] {
            assert_eq!(check_tenant(good), Ok(()), "{good}");
        }
        for bad in [
            "clinic",
            "/clinic",
            "tenant-a/",
            "Tenant/clinic",
            "a/b/c",
            "-a/b",
            "a/b..c",
            "a/b_c",
        ] {
            assert!(check_tenant(bad).is_err(), "{bad} accepted");
        }
        assert!(check_tenant(&format!("{}/b", "a".repeat(64))).is_err());
    }
}
