//! Test helpers: Debian's Postfix tools run on rendered files. Shared by the unit tests in postfix.rs and the
//! property test in tests/postfix_accepts_any_spec.rs (included there by path), so self-contained: std only.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!("securemail-postfix-{}-{label}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A Postfix tool from Debian's postfix package (`/usr/sbin` is often missing from a user's PATH).
pub fn postfix_tool(tool: &str) -> Command {
    let search_path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search_path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .map(Command::new)
        .unwrap_or_else(|| panic!("{tool} is not installed: run e2e/install-deps.sh (installs Debian's postfix)"))
}

/// Runs a command to success and returns its stdout; stderr must be empty, since Postfix reports problems
/// in configuration files as warnings there.
pub fn run_quietly(command: &mut Command) -> String {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.is_empty(), "{command:?}: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

pub fn postconf(config_dir: &Path, args: &[&str]) -> String {
    run_quietly(postfix_tool("postconf").arg("-c").arg(config_dir).args(args))
}

/// `(name, value)` as Postfix reads main.cf: comments skipped, continuation lines joined with one space.
pub fn parameters(main_cf: &str) -> Vec<(String, String)> {
    let mut logical_lines: Vec<String> = Vec::new();
    for line in main_cf.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        match logical_lines.last_mut() {
            Some(last) if line.starts_with(char::is_whitespace) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ => logical_lines.push(line.to_owned()),
        }
    }
    logical_lines
        .iter()
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap();
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect()
}

/// What Postfix's own parser makes of rendered files. `postconf -n` warns about unknown parameter names (as
/// "unused parameter"), `-x` also about `$references` to undefined parameters, `-M` and `-P` fail on master.cf
/// syntax errors, and `postfix check` refuses values every Postfix program checks at start (such as a numeric
/// `myhostname` or `mydomain`). Other values of known parameters and restriction lists are only checked by the
/// daemons that use them: see the running-Postfix tests in postfix.rs. Needs root (`postfix check`).
pub fn assert_postfix_reads_without_warnings(label: &str, main_cf: &str, master_cf: &str) {
    let dir = ScratchDir::new(&format!("postconf-{label}"));
    fs::write(dir.0.join("main.cf"), main_cf).unwrap();
    fs::write(dir.0.join("master.cf"), master_cf).unwrap();

    let read_back: BTreeMap<_, _> = parameters(&postconf(&dir.0, &["-n"])).into_iter().collect();
    postconf(&dir.0, &["-x", "-n"]);
    let rendered = parameters(main_cf);
    let mut expected: BTreeMap<_, _> = rendered.iter().cloned().collect();
    assert_eq!(expected.len(), rendered.len(), "{label}: a parameter is set twice");
    expected.insert("config_directory".to_owned(), dir.0.display().to_string());
    assert_eq!(read_back, expected, "{label}");

    let listeners: Vec<_> = postconf(&dir.0, &["-M"])
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some("inet"))
        .map(str::to_owned)
        .collect();
    assert_eq!(listeners.len(), 1, "{label}: {listeners:?}");
    assert!(listeners[0].starts_with("587 "), "{label}: {listeners:?}");
    postconf(&dir.0, &["-P"]);

    // Without a terminal, `postfix` logs its reasons to syslog only: the exit status is the verdict.
    let status = postfix_tool("postfix")
        .arg("-c")
        .arg(&dir.0)
        .arg("check")
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{label}: `postfix -c DIR check` failed ({status}); run it in a terminal on these files to see why:\n{main_cf}"
    );
}
