//! DKIM signing (RFC 6376, RFC 8463) with the tenant's keys: the From: domain picks the keys, every key of that
//! domain signs (RSA first, then Ed25519 when dual signing), relaxed/relaxed over the recommended header set,
//! with From, To and Subject over-signed. mail-auth canonicalises and writes the header; aws-lc-rs signs.
//!
//! Input is CRLF mail exactly as it will be sent; the body is never modified, only header lines are returned.

mod from;
mod key;
mod message;
mod store;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;

use jiff::Timestamp;
use mail_auth::common::crypto::SigningKey as _;
use mail_auth::common::headers::{Writable, Writer};
use mail_auth::dkim::{Canonicalization, DkimSigner, Done, Signature};
use securemail_api::sidecar_config::SigningDomain;
use securemail_api::tenant::DkimAlgorithm;

use key::KeyPair;
use message::Message;
pub use store::{KeyStore, Refresh};

/// Signed header fields. Fields absent from a message are signed too (as empty), so adding one later breaks the
/// signature; From, To and Subject are listed twice so that even an added second instance does.
const SIGNED_HEADERS: [&str; 18] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Sender",
    "From",
    "To",
    "Subject",
];

/// A key file that could not be loaded. Messages name the file, domain and selector, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("DKIM key {selector} of {domain}: cannot read {}: {source}", path.display())]
    Read {
        domain: String,
        selector: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("DKIM key {selector} of {domain}: {} is not a usable {} key: {reason}", path.display(), algorithm_name(*algorithm))]
    Invalid {
        domain: String,
        selector: String,
        path: PathBuf,
        algorithm: DkimAlgorithm,
        reason: &'static str,
    },
    #[error("DKIM signing domain {domain:?}: {problem}")]
    Domain { domain: String, problem: &'static str },
}

/// Why a message was not signed. The caller turns it into a reply to Postfix: none of these may end in the
/// message being sent unsigned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("message has no From: header")]
    MissingFrom,
    #[error("message has {count} From: headers; exactly one is allowed")]
    RepeatedFrom { count: usize },
    #[error("From: names {count} mailboxes; the signing domain must be unambiguous")]
    MultipleFromMailboxes { count: usize },
    #[error("From: header cannot be parsed: {reason}")]
    UnparsableFrom { reason: &'static str },
    /// The From: domain is not one this tenant signs for: a domain outside its spec, or one another tenant holds
    /// (the operator leaves those out of the signing list).
    #[error("header From domain {domain} is not one of this tenant's sending domains")]
    ForeignDomain { domain: String },
    /// The From: domain is the tenant's but has no active key yet.
    #[error("no active DKIM key for From: domain {domain} yet")]
    NoKeyForDomain { domain: String },
    #[error("message contains a bare CR or LF; only CRLF mail can be signed")]
    BareLineEnding,
    #[error("message header section has a line that is not a header field")]
    MalformedHeader,
    #[error("DKIM key {selector} of {domain} failed to sign")]
    Crypto { domain: String, selector: String },
}

/// All signing keys of one pod, by domain. Immutable: reloading builds a new one (see [`KeyStore`]).
pub struct Signer {
    domains: BTreeMap<String, Vec<DomainKey>>,
}

// LMTP sessions on every runtime thread share one signer.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Signer>();
    shared::<KeyStore>();
};

struct DomainKey {
    algorithm: DkimAlgorithm,
    file: PathBuf,
    signer: DkimSigner<KeyPair, Done>,
}

impl Signer {
    /// Reads and parses every key file of `signing` (blocking file I/O: run it off the async executor).
    pub fn load(signing: &[SigningDomain]) -> Result<Self, KeyError> {
        let mut domains = BTreeMap::new();
        for entry in signing {
            let domain = from::normalise_domain(&entry.domain).ok_or_else(|| KeyError::Domain {
                domain: entry.domain.clone(),
                problem: "not a valid DNS name",
            })?;
            let mut keys = entry
                .keys
                .iter()
                .map(|key| DomainKey::load(&domain, key))
                .collect::<Result<Vec<_>, _>>()?;
            keys.sort_by_key(|key| key.algorithm);
            if domains.insert(domain, keys).is_some() {
                return Err(KeyError::Domain {
                    domain: entry.domain.clone(),
                    problem: "listed more than once",
                });
            }
        }
        Ok(Self { domains })
    }

    /// The `DKIM-Signature:` header lines to prepend to `message`, one per key of its From: domain, with
    /// `t=` set to `now`.
    pub fn sign(&self, message: &[u8], now: Timestamp) -> Result<Vec<u8>, SignError> {
        let message = Message::parse(message)?;
        let domain = from::from_domain(&message.fields)?;
        let keys = match self.domains.get(&domain) {
            Some(keys) if !keys.is_empty() => keys,
            Some(_) => return Err(SignError::NoKeyForDomain { domain }),
            None => return Err(SignError::ForeignDomain { domain }),
        };
        let timestamp = u64::try_from(now.as_second()).unwrap_or(0);
        let mut headers = Vec::with_capacity(keys.len() * 640);
        for key in keys {
            let signature = key.sign(&message, timestamp).map_err(|_| SignError::Crypto {
                domain: domain.clone(),
                selector: key.signer.template.s.clone(),
            })?;
            signature.write(&mut headers, true);
        }
        Ok(headers)
    }
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(&self.domains).finish()
    }
}

impl DomainKey {
    fn load(domain: &str, config: &securemail_api::sidecar_config::SigningKey) -> Result<Self, KeyError> {
        let path = config.private_key_file.clone();
        let pem = zeroize::Zeroizing::new(std::fs::read(&path).map_err(|source| KeyError::Read {
            domain: domain.to_owned(),
            selector: config.selector.clone(),
            path: path.clone(),
            source,
        })?);
        let key = KeyPair::from_pem(&pem, config.algorithm).map_err(|reason| KeyError::Invalid {
            domain: domain.to_owned(),
            selector: config.selector.clone(),
            path: path.clone(),
            algorithm: config.algorithm,
            reason,
        })?;
        let signer = DkimSigner::from_key(key)
            .domain(domain)
            .selector(&config.selector)
            .headers(SIGNED_HEADERS)
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Self {
            algorithm: config.algorithm,
            file: path,
            signer,
        })
    }

    /// `DkimSigner::sign` as mail-auth has it, but with the time passed in rather than read from the system
    /// clock; every step is mail-auth's public API.
    fn sign(&self, message: &Message<'_>, timestamp: u64) -> mail_auth::Result<Signature> {
        let template = &self.signer.template;
        let (_, headers, signed_headers, body) = template.canonicalize(message.stream());
        let mut signature = template.clone();
        signature.bh = self.signer.key.hash(body).as_ref().to_vec();
        signature.t = timestamp;
        signature.h = signed_headers;
        signature.b = self.signer.key.sign(HeadersWithSignature {
            headers,
            signature: &signature,
        })?;
        Ok(signature)
    }
}

impl fmt::Debug for DomainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainKey")
            .field("selector", &self.signer.template.s)
            .field("algorithm", &self.algorithm)
            .field("file", &self.file)
            .field("key", &self.signer.key)
            .finish()
    }
}

/// The data a DKIM signature covers: the signed headers, then the signature header itself with `b=` empty.
struct HeadersWithSignature<'a, H> {
    headers: H,
    signature: &'a Signature,
}

impl<H: Writable> Writable for HeadersWithSignature<'_, H> {
    fn write(self, writer: &mut impl Writer) {
        self.headers.write(writer);
        self.signature.write(writer, false);
    }
}

fn algorithm_name(algorithm: DkimAlgorithm) -> &'static str {
    match algorithm {
        DkimAlgorithm::RsaSha256 => "rsa-sha256",
        DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use aws_lc_rs::encoding::{AsDer as _, Pkcs8V1Der};
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::Ed25519KeyPair;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use securemail_api::pkcs8_pem;
    use securemail_api::sidecar_config::SigningKey;

    use super::*;

    pub(crate) const NOW: Timestamp = Timestamp::constant(1_767_225_600, 0);

    pub(crate) const MESSAGE: &[u8] = b"From: Records <records@example.org>\r\nTo: patient@example.net\r\n\
        Subject: Your results\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n\
        See the portal.\r\n";

    /// A PKCS#8 PEM key file like the operator's, written to `path`.
    pub(crate) fn write_key(path: &Path, algorithm: DkimAlgorithm) {
        let der: Pkcs8V1Der = match algorithm {
            DkimAlgorithm::RsaSha256 => aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap().as_der(),
            DkimAlgorithm::Ed25519Sha256 => Ed25519KeyPair::generate().unwrap().as_der(),
        }
        .unwrap();
        std::fs::write(path, pem(der.as_ref())).unwrap();
    }

    fn pem(der: &[u8]) -> String {
        let body = BASE64.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "{}\n{}\n{}\n",
            pkcs8_pem::header(),
            lines.join("\n"),
            pkcs8_pem::footer()
        )
    }

    pub(crate) fn domain(name: &str, keys: &[(&str, DkimAlgorithm, &Path)]) -> SigningDomain {
        SigningDomain {
            domain: name.into(),
            keys: keys
                .iter()
                .map(|&(selector, algorithm, path)| SigningKey {
                    selector: selector.into(),
                    algorithm,
                    private_key_file: path.into(),
                })
                .collect(),
        }
    }

    /// The unfolded `DKIM-Signature:` lines of a `sign` result, folds turned into single spaces.
    pub(crate) fn unfolded(headers: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(headers).unwrap().replace("\r\n\t", " ");
        text.split_terminator("\r\n").map(str::to_owned).collect()
    }

    /// A tag's value with folding whitespace removed (RFC 6376 §3.2).
    pub(crate) fn tag(header: &str, name: &str) -> String {
        let start = header
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name}= in {header}"))
            + name.len()
            + 2;
        header[start..].split(';').next().unwrap().split_whitespace().collect()
    }

    #[test]
    fn every_key_of_the_from_domain_signs_rsa_first_with_over_signed_headers() {
        let dir = tempfile::tempdir().unwrap();
        let (ed25519, rsa) = (dir.path().join("ed25519.pem"), dir.path().join("rsa.pem"));
        write_key(&ed25519, DkimAlgorithm::Ed25519Sha256);
        write_key(&rsa, DkimAlgorithm::RsaSha256);
        // Listed Ed25519 first: the order of signatures comes from the algorithm, not the configuration.
        let signer = Signer::load(&[domain(
            "example.org",
            &[
                ("sm-ed", DkimAlgorithm::Ed25519Sha256, &ed25519),
                ("sm-rsa", DkimAlgorithm::RsaSha256, &rsa),
            ],
        )])
        .unwrap();

        let headers = signer.sign(MESSAGE, NOW).unwrap();

        let raw = std::str::from_utf8(&headers).unwrap();
        assert!(raw.ends_with(";\r\n"), "{raw}");
        // Folded header lines: every line after the first of a field starts with a tab. mail-auth keeps v= to c=
        // on the first line (over 78 columns with a long selector, well under RFC 5322's 998 limit).
        for line in raw.split_terminator("\r\n") {
            assert!(
                line.starts_with("DKIM-Signature: ") || line.starts_with('\t'),
                "{line:?}"
            );
            assert!(line.len() <= 100, "{line:?}");
        }
        let signatures = unfolded(&headers);
        assert_eq!(signatures.len(), 2, "{signatures:?}");
        for (signature, algorithm, selector) in [
            (&signatures[0], "rsa-sha256", "sm-rsa"),
            (&signatures[1], "ed25519-sha256", "sm-ed"),
        ] {
            assert_eq!(tag(signature, "a"), algorithm);
            assert_eq!(tag(signature, "s"), selector);
            assert_eq!(tag(signature, "d"), "example.org");
            assert_eq!(tag(signature, "c"), "relaxed/relaxed");
            assert_eq!(tag(signature, "t"), "1767225600");
            // Present fields bottom-up, then every listed field once more: the second From, To and Subject and
            // the absent ones sign "no further instance".
            assert_eq!(
                tag(signature, "h"),
                "Message-ID:Date:Subject:To:From:Cc:Reply-To:In-Reply-To:References:MIME-Version:Content-Type:\
                 Content-Transfer-Encoding:List-Unsubscribe:List-Unsubscribe-Post:Sender:From:To:Subject"
            );
        }
    }

    #[test]
    fn only_an_exactly_matching_from_domain_is_signed_and_refusals_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("ed25519.pem");
        write_key(&key, DkimAlgorithm::Ed25519Sha256);
        let signer = Signer::load(&[
            domain("Example.org", &[("sm", DkimAlgorithm::Ed25519Sha256, &key)]),
            domain("retired.example", &[]),
        ])
        .unwrap();
        let sign = |from: &str| {
            let message = format!("From: {from}\r\nTo: patient@example.net\r\nSubject: s\r\n\r\nbody\r\n");
            signer.sign(message.as_bytes(), NOW)
        };

        let signed = unfolded(&sign("Records <records@EXAMPLE.org>").unwrap());
        assert_eq!(tag(&signed[0], "d"), "example.org");
        for (from, domain) in [
            ("a@other.example", "other.example"),
            ("a@mail.example.org", "mail.example.org"),
            ("a@org", "org"),
        ] {
            assert_eq!(
                sign(from),
                Err(SignError::ForeignDomain { domain: domain.into() }),
                "From: {from}"
            );
        }
        // Listed without a key (yet): not the sender's fault.
        assert_eq!(
            sign("a@retired.example"),
            Err(SignError::NoKeyForDomain {
                domain: "retired.example".into()
            })
        );
        assert_eq!(
            SignError::ForeignDomain {
                domain: "other.example".into()
            }
            .to_string(),
            "header From domain other.example is not one of this tenant's sending domains"
        );
        assert_eq!(
            sign("a@example.org, b@example.org"),
            Err(SignError::MultipleFromMailboxes { count: 2 })
        );
        assert_eq!(
            signer.sign(b"From: a@example.org\n\nbody\n", NOW),
            Err(SignError::BareLineEnding)
        );
    }

    #[test]
    fn unusable_key_files_are_refused_naming_file_domain_and_selector_but_no_key_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let ed25519 = dir.path().join("ed25519.pem");
        write_key(&ed25519, DkimAlgorithm::Ed25519Sha256);
        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA";
        let cases: [(&str, String, DkimAlgorithm, &str); 5] = [
            (
                "not-pem.pem",
                format!("{secret}\n"),
                DkimAlgorithm::RsaSha256,
                "does not start with",
            ),
            (
                "pkcs1.pem",
                format!(
                    "-----BEGIN RSA {label}-----\n{secret}\n-----END RSA {label}-----\n",
                    label = pkcs8_pem::LABEL
                ),
                DkimAlgorithm::RsaSha256,
                "does not start with",
            ),
            (
                "bad-base64.pem",
                format!("{}\n{secret}$$\n{}\n", pkcs8_pem::header(), pkcs8_pem::footer()),
                DkimAlgorithm::Ed25519Sha256,
                "not valid base64",
            ),
            (
                "not-a-key.pem",
                format!("{}\n{secret}==\n{}\n", pkcs8_pem::header(), pkcs8_pem::footer()),
                DkimAlgorithm::Ed25519Sha256,
                "not an Ed25519 private key",
            ),
            (
                "wrong-algorithm.pem",
                std::fs::read_to_string(&ed25519).unwrap(),
                DkimAlgorithm::RsaSha256,
                "not an RSA private key",
            ),
        ];
        for (file, content, algorithm, reason) in cases {
            let path = dir.path().join(file);
            std::fs::write(&path, &content).unwrap();
            let err = Signer::load(&[domain("example.org", &[("sm-1", algorithm, &path)])]).unwrap_err();
            let message = err.to_string();
            for expected in [path.to_str().unwrap(), "example.org", "sm-1", reason] {
                assert!(message.contains(expected), "{expected:?} missing from {message:?}");
            }
            let key_body = content.lines().nth(1).unwrap_or(&content);
            for shown in [message, format!("{err:?}")] {
                assert!(!shown.contains(secret) && !shown.contains(&key_body[..20]), "{shown}");
            }
        }

        let missing = dir.path().join("missing.pem");
        let err = Signer::load(&[domain("example.org", &[("sm-2", DkimAlgorithm::RsaSha256, &missing)])]).unwrap_err();
        assert!(
            matches!(&err, KeyError::Read { path, .. } if *path == missing),
            "{err:?}"
        );
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn invalid_or_repeated_signing_domains_are_refused() {
        for (domains, problem) in [
            (vec![domain("", &[])], "not a valid DNS name"),
            (
                vec![domain("example.org", &[]), domain("EXAMPLE.org", &[])],
                "listed more than once",
            ),
        ] {
            match Signer::load(&domains) {
                Err(KeyError::Domain { problem: found, .. }) => assert_eq!(found, problem),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn debug_output_names_the_keys_but_never_shows_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let (ed25519, rsa) = (dir.path().join("ed25519.pem"), dir.path().join("rsa.pem"));
        write_key(&ed25519, DkimAlgorithm::Ed25519Sha256);
        write_key(&rsa, DkimAlgorithm::RsaSha256);
        let config = [domain(
            "example.org",
            &[
                ("sm-rsa", DkimAlgorithm::RsaSha256, &rsa),
                ("sm-ed", DkimAlgorithm::Ed25519Sha256, &ed25519),
            ],
        )];
        let store = KeyStore::load(&config).unwrap();

        for debug in [
            format!("{:?}", store.signer()),
            format!("{store:?}"),
            format!("{store:#?}"),
        ] {
            for expected in ["example.org", "sm-rsa", "sm-ed", "rsa.pem", "<redacted>"] {
                assert!(debug.contains(expected), "{expected:?} missing from {debug}");
            }
            for file in [&rsa, &ed25519] {
                let pem = std::fs::read_to_string(file).unwrap();
                let body: String = pem.lines().filter(|line| !line.starts_with("-----")).collect();
                let der = BASE64.decode(&body).unwrap();
                let der_hex: String = der.iter().map(|byte| format!("{byte:02x}")).collect();
                // No 12-character window of the encoded key, nor of its bytes in hex or as a Debug list.
                for window in body.as_bytes().windows(12).chain(der_hex.as_bytes().windows(12)) {
                    assert!(
                        !debug.contains(std::str::from_utf8(window).unwrap()),
                        "key material in {debug}"
                    );
                }
                let der_list = format!("{:?}", &der[der.len() - 8..]);
                assert!(
                    !debug.contains(der_list.trim_matches(['[', ']'])),
                    "key bytes in {debug}"
                );
            }
        }
    }
}
