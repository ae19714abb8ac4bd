//! The sweep for secrets where they must never be: every log line, event, metric, status and evidence record the
//! suites make SecureMail write is searched for private key material and for recipient local parts. The suites
//! run it when an operator or an MTA host they started goes away, so every case contributes what it wrote.

use std::fmt::Write as _;

/// What must not appear, each with a name for the report that does not repeat the secret.
#[derive(Debug, Default)]
pub struct Secrets {
    needles: Vec<(String, String)>,
}

impl Secrets {
    /// Every private key in `pem_text` (PEM blocks whose label ends in `PRIVATE KEY`): pieces of its base64 body that
    /// are key material, skipping the algorithm prefix every key of its kind shares.
    pub fn add_private_keys(&mut self, origin: &str, pem_text: &str) {
        let mut body: Option<String> = None;
        for line in pem_text.lines().map(str::trim) {
            if line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----") {
                body = Some(String::new());
            } else if line.starts_with("-----END ") {
                if let Some(body) = body.take() {
                    self.add_key_body(origin, &body);
                }
            } else if let Some(body) = body.as_mut() {
                body.push_str(line);
            }
        }
    }

    fn add_key_body(&mut self, origin: &str, body: &str) {
        const PIECE: usize = 40;
        // An Ed25519 key is 64 base64 characters, the last 43 of them the seed; RSA bodies run to ~1600.
        let mut start = 24.min(body.len().saturating_sub(PIECE));
        while start + PIECE <= body.len() {
            self.needles.push((
                format!("private key material from {origin}"),
                body[start..start + PIECE].to_owned(),
            ));
            start += PIECE;
        }
    }

    /// A recipient's local part, as it would appear in an address (`local@`).
    pub fn add_local_part(&mut self, recipient: &str) {
        if let Some((local, _)) = recipient.rsplit_once('@')
            && !local.is_empty()
        {
            self.needles
                .push(("a recipient local part".to_owned(), format!("{local}@")));
        }
    }

    /// The header every PEM private key carries.
    fn needles(&self) -> impl Iterator<Item = (&str, &str)> {
        std::iter::once(("a PEM private key header", "PRIVATE KEY-----")).chain(
            self.needles
                .iter()
                .map(|(what, needle)| (what.as_str(), needle.as_str())),
        )
    }

    /// Every hit in `sources` (name, text), one line each naming the source, the line number and what was found;
    /// empty when there is none.
    pub fn find_in(&self, sources: &[(String, String)]) -> String {
        let mut report = String::new();
        for (source, text) in sources {
            for (number, line) in text.lines().enumerate() {
                for (what, needle) in self.needles() {
                    if line.contains(needle) {
                        let _ = writeln!(report, "{source} line {}: {what}", number + 1);
                    }
                }
            }
        }
        report
    }
}

/// Panics with the report when `sources` hold any of `secrets`; skipped while the thread is already panicking (a
/// failed case reports its own failure, not a second one from its clean-up).
pub fn assert_none_in(secrets: &Secrets, sources: &[(String, String)]) {
    if std::thread::panicking() {
        return;
    }
    let report = secrets.find_in(sources);
    assert!(report.is_empty(), "secrets where they must never be:\n{report}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_key_pieces_headers_and_local_parts_and_nothing_else() {
        let generated = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "ed25519"])
            .output()
            .expect("openssl");
        let pem = String::from_utf8(generated.stdout).unwrap();
        let body: String = pem.lines().filter(|line| !line.starts_with("-----")).collect();
        let mut secrets = Secrets::default();
        secrets.add_private_keys("clinic/dkim", &pem);
        secrets.add_local_part("pat.doe@example.net");
        let sources = vec![
            (
                "clean".to_owned(),
                format!("delivered to example.net via mx\n{}", &body[..20]),
            ),
            ("key".to_owned(), format!("first line\nseed={} and more", &body[20..])),
            ("pem".to_owned(), pem.lines().next().unwrap().to_owned()),
            ("address".to_owned(), "rcpt=<pat.doe@example.net>".to_owned()),
        ];
        let report = secrets.find_in(&sources);
        assert!(!report.contains("clean"), "{report}");
        assert!(
            report.contains("key line 2: private key material from clinic/dkim"),
            "{report}"
        );
        assert!(report.contains("pem line 1: a PEM private key header"), "{report}");
        assert!(report.contains("address line 1: a recipient local part"), "{report}");
        assert!(
            !report.contains("pat.doe"),
            "the report must not repeat the secret: {report}"
        );
    }
}
