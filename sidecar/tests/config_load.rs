//! Loading sidecar.yaml: every refusal names the file, the field and, for parse errors, the line.
#![allow(clippy::unwrap_used, reason = "test set-up: a panic is the failure report")]

use std::path::Path;

use securemail_api::sidecar_config::{
    DnsSettings, Egress, EvidenceSettings, Listen, SidecarConfig, SigningDomain, SigningKey, SourceAddress, WarmupCaps,
};
use securemail_api::tenant::{DkimAlgorithm, ProviderShares, TlsPolicySpec};
use securemail_sidecar::config::{self, ConfigError};

/// A valid configuration whose files live under `dir`; the key file exists (its content is not checked here).
fn sample(dir: &Path) -> SidecarConfig {
    let key = dir.join("dkim/sm-ed.pem");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    std::fs::write(&key, "placeholder").unwrap();
    SidecarConfig {
        tenant: "tenant-a/clinic".into(),
        source: SourceAddress {
            address: "192.0.2.10".parse().unwrap(),
            hostname: "mta1.example.org".into(),
        },
        listen: Listen {
            lmtp: dir.join("run/lmtp.sock"),
            admin: "127.0.0.1:9090".parse().unwrap(),
        },
        signing: vec![SigningDomain {
            domain: "example.org".into(),
            keys: vec![SigningKey {
                selector: "sm-ed".into(),
                algorithm: DkimAlgorithm::Ed25519Sha256,
                private_key_file: key,
            }],
        }],
        tls_policy: TlsPolicySpec::default(),
        warmup: WarmupCaps {
            day: Some(1),
            daily_limit: Some(100),
            provider_shares: ProviderShares::default(),
        },
        evidence: EvidenceSettings {
            dir: dir.join("data/evidence"),
            retention_days: 2190,
        },
        state_dir: dir.join("data/state"),
        max_message_bytes: 25 * 1024 * 1024,
        dns: DnsSettings::default(),
        postfix_queue_dir: Some(dir.join("spool")),
        provider_suffixes: Vec::new(),
        pool_addresses: Vec::new(),
        egress: Egress::Direct,
    }
}

fn write(path: &Path, yaml: &str) {
    std::fs::write(path, yaml).unwrap();
}

/// The 1-based number of the first line of `yaml` starting with `prefix`.
fn line_of(yaml: &str, prefix: &str) -> usize {
    yaml.lines().position(|line| line.starts_with(prefix)).unwrap() + 1
}

fn assert_mentions(err: &ConfigError, expected: &[&str]) {
    let message = err.to_string();
    for part in expected {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
}

#[test]
fn a_valid_file_loads_and_its_evidence_and_state_directories_are_created() {
    let dir = tempfile::tempdir().unwrap();
    let expected = sample(dir.path());
    let path = dir.path().join("sidecar.yaml");
    write(&path, &serde_yaml::to_string(&expected).unwrap());

    assert_eq!(config::load(&path).unwrap(), expected);
    assert!(expected.evidence.dir.is_dir());
    assert!(expected.state_dir.is_dir());
}

#[test]
fn an_unknown_field_is_refused_naming_file_field_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar-0.yaml");
    let yaml = serde_yaml::to_string(&sample(dir.path())).unwrap();
    let yaml = yaml.replacen("listen:\n", "listen:\n  smtp: 0.0.0.0:25\n", 1);
    write(&path, &yaml);

    let err = config::load(&path).unwrap_err();
    let line = line_of(&yaml, "  smtp:");
    assert!(
        matches!(&err, ConfigError::Parse { line: Some(found), .. } if *found == line),
        "{err:?}"
    );
    assert_mentions(
        &err,
        &[path.to_str().unwrap(), "listen", "smtp", &format!("line {line}")],
    );
}

#[test]
fn a_wrong_type_is_refused_naming_file_field_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar-0.yaml");
    let yaml = serde_yaml::to_string(&sample(dir.path())).unwrap();
    let yaml = yaml.replacen("maxMessageBytes: 26214400", "maxMessageBytes: lots", 1);
    write(&path, &yaml);

    let err = config::load(&path).unwrap_err();
    let line = line_of(&yaml, "maxMessageBytes:");
    assert_mentions(
        &err,
        &[path.to_str().unwrap(), "maxMessageBytes", &format!("line {line}")],
    );

    let yaml =
        serde_yaml::to_string(&sample(dir.path()))
            .unwrap()
            .replacen("address: 192.0.2.10", "address: 192.0.2.300", 1);
    write(&path, &yaml);
    let err = config::load(&path).unwrap_err();
    assert_mentions(&err, &[path.to_str().unwrap(), "source.address"]);
}

#[test]
fn a_missing_key_file_is_refused_naming_the_field_and_the_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    let config = sample(dir.path());
    let key = &config.signing[0].keys[0].private_key_file;
    std::fs::remove_file(key).unwrap();
    write(&path, &serde_yaml::to_string(&config).unwrap());

    let err = config::load(&path).unwrap_err();
    match &err {
        ConfigError::Invalid { problems, .. } => {
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].field, "signing[0].keys[0].privateKeyFile");
        }
        other => panic!("{other:?}"),
    }
    assert_mentions(&err, &[path.to_str().unwrap(), key.to_str().unwrap(), "No such file"]);

    // A directory where the key should be is no key file either.
    std::fs::create_dir(key).unwrap();
    assert_mentions(&config::load(&path).unwrap_err(), &["is not a regular file"]);
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.yaml");
    let mut config = sample(dir.path());
    config.tenant = "clinic".into();
    config.listen.lmtp = "run/lmtp.sock".into();
    config.max_message_bytes = 0;
    // A regular file where a parent directory must be: the state directory cannot be created.
    std::fs::write(dir.path().join("blocker"), "").unwrap();
    config.state_dir = dir.path().join("blocker/state");
    config.evidence.dir = "evidence".into();
    config.postfix_queue_dir = Some("spool/postfix".into());
    write(&path, &serde_yaml::to_string(&config).unwrap());

    let err = config::load(&path).unwrap_err();
    let ConfigError::Invalid { problems, .. } = &err else {
        panic!("{err:?}")
    };
    let fields: Vec<&str> = problems.iter().map(|problem| problem.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "tenant",
            "listen.lmtp",
            "evidence.dir",
            "stateDir",
            "maxMessageBytes",
            "postfixQueueDir"
        ]
    );
    assert_mentions(
        &err,
        &[
            path.to_str().unwrap(),
            "\"clinic\" is not namespace/name",
            "run/lmtp.sock is not an absolute path",
            "blocker/state",
            "must be greater than 0",
        ],
    );
}

#[test]
fn an_unreadable_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.yaml");
    let err = config::load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert_mentions(&err, &[path.to_str().unwrap(), "cannot read"]);
}
