//! Arbitrary bytes as `sidecar.yaml` through the sidecar's own loading steps: `config::parse`, then
//! `config::validate` (what `config::load` runs after reading the file). Run with `sidecar/fuzz/run-stable.sh
//! sidecar_config`. A panic, a refusal that names neither a line nor a field, or a valid configuration that does
//! not read back the same after the operator's serialization (serde_yaml) is a finding.
#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use securemail_sidecar::config::{ConfigError, parse, validate};

const FILE: &str = "/etc/securemail/sidecar.yaml";

/// `validate` creates the evidence and state directories: every absolute path in the file is moved under this
/// scratch directory so that no input reaches outside it.
static SCRATCH: LazyLock<PathBuf> =
    LazyLock::new(|| std::env::temp_dir().join(format!("securemail-fuzz-sidecar-config-{}", std::process::id())));

/// `/a/../b` becomes `SCRATCH/a/b`: only normal components are kept, so `..` cannot climb out.
fn confine(path: &mut PathBuf) {
    if path.is_absolute() {
        let inside: PathBuf = path
            .components()
            .filter(|component| matches!(component, Component::Normal(_)))
            .collect();
        *path = SCRATCH.join(inside);
    }
}

fn assert_names_a_place(err: &ConfigError) {
    let message = err.to_string();
    assert!(message.starts_with(&format!("sidecar config {FILE}")), "{message}");
    match err {
        ConfigError::Parse {
            line, message: text, ..
        } => assert!(
            // A second document is a fault of the file as a whole; serde_yaml gives no place for it.
            line.is_some() || text.contains(" at line ") || text.contains("more than one document"),
            "a parse error without a location: {message}"
        ),
        ConfigError::Invalid { problems, .. } => {
            assert!(!problems.is_empty(), "{message}");
            for problem in problems {
                assert!(
                    !problem.field.is_empty() && message.contains(&problem.field),
                    "{message}"
                );
            }
        }
        ConfigError::Read { .. } => panic!("parse or validate reported a read error: {message}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new(FILE);
    let mut config = match parse(path, data) {
        Ok(config) => config,
        Err(err) => return assert_names_a_place(&err),
    };

    let rendered = serde_yaml::to_string(&config).expect("a parsed configuration serializes");
    match parse(path, rendered.as_bytes()) {
        Ok(again) => assert_eq!(again, config, "changed on a round trip through\n{rendered}"),
        Err(err) => panic!("the serialization of a parsed configuration is refused: {err}\n{rendered}"),
    }

    confine(&mut config.listen.lmtp);
    confine(&mut config.evidence.dir);
    confine(&mut config.state_dir);
    for key in config.signing.iter_mut().flat_map(|domain| domain.keys.iter_mut()) {
        confine(&mut key.private_key_file);
    }
    if let Some(queue_dir) = &mut config.postfix_queue_dir {
        confine(queue_dir);
    }
    if let Err(err) = validate(path, &config) {
        assert_names_a_place(&err);
    }
    let _ = std::fs::remove_dir_all(&*SCRATCH);
});
