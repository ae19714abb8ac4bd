//! DKIM key pairs: generated once per selector with aws-lc-rs, stored as PKCS#8 PEM in a Secret, and re-read from
//! there on every reconcile (a key is never regenerated silently, since that would break every signature in flight).
//!
//! Private key material lives only in zeroizing buffers and never reaches `Debug` output or error messages.

use std::fmt;

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::error::KeyRejected;
use aws_lc_rs::rsa::{self, KeySize};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use securemail_api::pkcs8_pem;
use securemail_api::tenant::DkimAlgorithm;
use thiserror::Error;
use zeroize::Zeroizing;

/// Why a key could not be generated or read. Messages name the algorithm or size, never key bytes.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("RSA key size {bits} is not supported for DKIM; use 2048, 3072 or 4096")]
    UnsupportedRsaSize { bits: u32 },
    #[error("generating a {algorithm:?} key failed")]
    Generation { algorithm: DkimAlgorithm },
    #[error("encoding a {algorithm:?} key failed")]
    Encoding { algorithm: DkimAlgorithm },
    #[error("stored DKIM private key is not a PKCS#8 PEM block: {reason}")]
    Pem { reason: &'static str },
    #[error("stored DKIM private key is not a valid {algorithm:?} key ({reason})")]
    Rejected {
        algorithm: DkimAlgorithm,
        reason: &'static str,
    },
}

/// A freshly generated DKIM key pair.
pub struct DkimKey {
    algorithm: DkimAlgorithm,
    private_key_pem: Zeroizing<String>,
    public_key_base64: String,
}

impl DkimKey {
    pub fn algorithm(&self) -> DkimAlgorithm {
        self.algorithm
    }

    /// PKCS#8 PEM (label `PRIVATE KEY`), the form the Secret stores and the sidecar loads.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    /// The `p=` value of the DKIM TXT record.
    pub fn public_key_base64(&self) -> &str {
        &self.public_key_base64
    }
}

impl fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DkimKey")
            .field("algorithm", &self.algorithm)
            .field("private_key_pem", &"<redacted>")
            .field("public_key_base64", &self.public_key_base64)
            .finish()
    }
}

/// Generates a DKIM key pair. `rsa_bits` (2048, 3072 or 4096) applies to RSA only.
///
/// RSA: `p=` is the base64 SubjectPublicKeyInfo (RFC 6376 §3.6.1). Ed25519: `p=` is the raw 32-byte public key
/// (RFC 8463 §4.2). The private key is PKCS#8 v1, which OpenSSL, Python and aws-lc-rs all read.
///
/// CPU-heavy (RSA 4096 can take a second or more): call it from `spawn_blocking`.
pub fn generate(algorithm: DkimAlgorithm, rsa_bits: u32) -> Result<DkimKey, KeyError> {
    let generation = KeyError::Generation { algorithm };
    let encoding = KeyError::Encoding { algorithm };
    let (pkcs8, public_key_base64) = match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let size = match rsa_bits {
                2048 => KeySize::Rsa2048,
                3072 => KeySize::Rsa3072,
                4096 => KeySize::Rsa4096,
                bits => return Err(KeyError::UnsupportedRsaSize { bits }),
            };
            let pair = rsa::KeyPair::generate(size).map_err(|_| generation)?;
            let pkcs8: Pkcs8V1Der = pair.as_der().map_err(|_| encoding.clone())?;
            (pkcs8, rsa_public_key_base64(&pair).map_err(|_| encoding)?)
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let pair = Ed25519KeyPair::generate().map_err(|_| generation)?;
            let pkcs8: Pkcs8V1Der = pair.as_der().map_err(|_| encoding)?;
            (pkcs8, BASE64.encode(pair.public_key().as_ref()))
        }
    };
    Ok(DkimKey {
        algorithm,
        private_key_pem: pkcs8_pem::encode(pkcs8.as_ref()),
        public_key_base64,
    })
}

/// The `p=` value for a stored PKCS#8 PEM private key, so the published record always matches the key in the
/// Secret without regenerating it.
pub fn public_key_from_pem(pem: &str, algorithm: DkimAlgorithm) -> Result<String, KeyError> {
    let der = decode_pem(pem)?;
    let rejected = |err: KeyRejected| KeyError::Rejected {
        algorithm,
        reason: err.description_(),
    };
    match algorithm {
        DkimAlgorithm::RsaSha256 => {
            let pair = rsa::KeyPair::from_pkcs8(&der).map_err(rejected)?;
            rsa_public_key_base64(&pair).map_err(|_| KeyError::Encoding { algorithm })
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(rejected)?;
            Ok(BASE64.encode(pair.public_key().as_ref()))
        }
    }
}

fn rsa_public_key_base64(pair: &rsa::KeyPair) -> Result<String, aws_lc_rs::error::Unspecified> {
    let spki: PublicKeyX509Der = pair.public_key().as_der()?;
    Ok(BASE64.encode(spki.as_ref()))
}

fn decode_pem(pem: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    pkcs8_pem::decode(pem).map_err(|err| KeyError::Pem { reason: err.reason() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use securemail_api::dns;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// A private key file for the external tools, removed when dropped.
    struct KeyFile(PathBuf);

    impl KeyFile {
        fn new(key: &DkimKey) -> Self {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            use std::sync::atomic::{AtomicU32, Ordering};
            static SERIAL: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "securemail-dkim-test-{}-{}.pem",
                std::process::id(),
                SERIAL.fetch_add(1, Ordering::Relaxed)
            ));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .expect("create key file");
            file.write_all(key.private_key_pem().as_bytes())
                .expect("write key file");
            Self(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for KeyFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn openssl(args: &[&str], key: &KeyFile) -> Vec<u8> {
        let output = Command::new("openssl")
            .args(args)
            .arg("-in")
            .arg(key.path())
            .output()
            .expect("openssl is installed (e2e/install-deps.sh)");
        assert!(
            output.status.success(),
            "openssl {args:?} refused the key: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }

    fn assert_pkcs8_pem(pem: &str) {
        assert!(pem.starts_with(&format!("{}\n", pkcs8_pem::header())), "{pem}");
        assert!(pem.ends_with(&format!("\n{}\n", pkcs8_pem::footer())));
        assert!(pem.lines().all(|line| line.len() <= 64));
    }

    #[test]
    fn rsa_2048_round_trips_through_pem() {
        let key = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        assert_eq!(key.algorithm(), DkimAlgorithm::RsaSha256);
        assert_pkcs8_pem(key.private_key_pem());
        // A 2048-bit RSA SubjectPublicKeyInfo is 294 bytes of DER.
        let spki = BASE64.decode(key.public_key_base64()).unwrap();
        assert_eq!((spki.len(), spki[0]), (294, 0x30));
        let again = public_key_from_pem(key.private_key_pem(), DkimAlgorithm::RsaSha256).unwrap();
        assert_eq!(again, key.public_key_base64());
    }

    #[test]
    fn ed25519_round_trips_through_pem() {
        let key = generate(DkimAlgorithm::Ed25519Sha256, 2048).unwrap();
        assert_pkcs8_pem(key.private_key_pem());
        assert_eq!(BASE64.decode(key.public_key_base64()).unwrap().len(), 32);
        let again = public_key_from_pem(key.private_key_pem(), DkimAlgorithm::Ed25519Sha256).unwrap();
        assert_eq!(again, key.public_key_base64());
    }

    #[test]
    fn every_generation_is_a_new_key() {
        let a = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        let b = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        assert_ne!(a.public_key_base64(), b.public_key_base64());
    }

    #[test]
    fn rsa_sizes_other_than_2048_3072_4096_are_refused_by_size() {
        for bits in [0, 1024, 2047, 8192] {
            let err = generate(DkimAlgorithm::RsaSha256, bits).unwrap_err();
            assert_eq!(err, KeyError::UnsupportedRsaSize { bits });
            assert!(err.to_string().contains(&bits.to_string()), "{err}");
        }
    }

    #[test]
    fn debug_never_prints_the_private_key() {
        let key = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>") && debug.contains(key.public_key_base64()));
        let body = key.private_key_pem().lines().nth(1).unwrap();
        assert!(!debug.contains("PRIVATE KEY") && !debug.contains(body), "{debug}");
    }

    #[test]
    fn a_key_read_back_with_the_wrong_algorithm_is_refused() {
        let ed25519 = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        let err = public_key_from_pem(ed25519.private_key_pem(), DkimAlgorithm::RsaSha256).unwrap_err();
        assert!(matches!(
            err,
            KeyError::Rejected {
                algorithm: DkimAlgorithm::RsaSha256,
                ..
            }
        ));
        let rsa = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        let err = public_key_from_pem(rsa.private_key_pem(), DkimAlgorithm::Ed25519Sha256).unwrap_err();
        assert!(matches!(err, KeyError::Rejected { .. }));
    }

    #[test]
    fn malformed_pem_is_refused_without_echoing_its_content() {
        let (begin, end) = (pkcs8_pem::header(), pkcs8_pem::footer());
        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA$$";
        let cases = [
            String::new(),
            format!(
                "-----BEGIN RSA {label}-----\n{secret}\n-----END RSA {label}-----\n",
                label = pkcs8_pem::LABEL
            ),
            format!("{begin}\n{secret}\n"),
            format!("{begin}\n{secret}\n{end}\n"),
            format!("{begin}\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n{end}\n"),
        ];
        for pem in cases {
            for algorithm in [DkimAlgorithm::RsaSha256, DkimAlgorithm::Ed25519Sha256] {
                let err = public_key_from_pem(&pem, algorithm).unwrap_err();
                let message = err.to_string();
                assert!(!message.contains("c2VjcmV0"), "{message}");
                assert!(!format!("{err:?}").contains("c2VjcmV0"));
            }
        }
    }

    #[test]
    fn openssl_accepts_the_keys_and_derives_the_same_public_keys() {
        for (algorithm, bits) in [(DkimAlgorithm::RsaSha256, 2048), (DkimAlgorithm::Ed25519Sha256, 0)] {
            let key = generate(algorithm, bits).unwrap();
            let file = KeyFile::new(&key);
            openssl(&["pkey", "-noout", "-check"], &file);
            let spki = openssl(&["pkey", "-pubout", "-outform", "DER"], &file);
            let expected = match algorithm {
                DkimAlgorithm::RsaSha256 => BASE64.encode(&spki),
                // RFC 8463: the record carries the raw key, the last 32 bytes of the SubjectPublicKeyInfo.
                DkimAlgorithm::Ed25519Sha256 => BASE64.encode(&spki[spki.len() - 32..]),
            };
            assert_eq!(key.public_key_base64(), expected, "{algorithm:?}");
        }
    }

    #[test]
    fn rsa_3072_and_4096_keys_have_the_requested_size() {
        for (bits, spki_len) in [(3072, 422), (4096, 550)] {
            let key = generate(DkimAlgorithm::RsaSha256, bits).unwrap();
            let spki = BASE64.decode(key.public_key_base64()).unwrap();
            assert_eq!(spki.len(), spki_len, "{bits} bits");
            let text = openssl(&["pkey", "-noout", "-text_pub"], &KeyFile::new(&key));
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains(&format!("({bits} bit)")), "{text}");
        }
    }

    /// Signs a message with dkimpy using the generated private key and verifies it against the record that
    /// `securemail_api::dns::dkim` renders, read back by dnspython's zone-file parser: the key, the `p=` encoding
    /// and the split TXT presentation form all have to be right for an independent implementation.
    const DKIMPY_SIGN_AND_VERIFY: &str = r#"
import sys, dkim, dns.rdata, dns.rdataclass, dns.rdatatype
algorithm, private_key, record, name = sys.argv[1:5]
txt = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, record)
published = b"".join(txt.strings)
if algorithm == "rsa":
    privkey, signature_algorithm = open(private_key, "rb").read(), b"rsa-sha256"
else:
    privkey, signature_algorithm = private_key.encode(), b"ed25519-sha256"
message = (b"From: Records <records@example.org>\r\nTo: patient@example.net\r\n"
           b"Subject: Your results\r\nMessage-ID: <1@example.org>\r\n\r\nSee the portal.\r\n")
signature = dkim.sign(message, b"sm-test", b"example.org", privkey,
                      signature_algorithm=signature_algorithm, include_headers=[b"from", b"to", b"subject"])
def dnsfunc(qname, timeout=5):
    assert qname == name.encode() + b".", qname
    return published
good = dkim.verify(signature + message, dnsfunc=dnsfunc)
tampered = dkim.verify(signature + message.replace(b"portal", b"p0rtal"), dnsfunc=dnsfunc)
print(f"good={good} tampered={tampered} strings={len(txt.strings)}")
sys.exit(0 if good and not tampered else 1)
"#;

    fn dkimpy_verifies(key: &DkimKey, private_key_arg: &str) -> String {
        let importable = Command::new("python3")
            .args(["-c", "import dkim, nacl, dns.rdata"])
            .status()
            .is_ok_and(|status| status.success());
        assert!(
            importable,
            "dkimpy, pynacl and dnspython are needed for this test: run e2e/install-deps.sh"
        );
        let record = dns::dkim("example.org", "sm-test", key.algorithm(), key.public_key_base64());
        let algorithm = match key.algorithm() {
            DkimAlgorithm::RsaSha256 => "rsa",
            DkimAlgorithm::Ed25519Sha256 => "ed25519",
        };
        let output = Command::new("python3")
            .args(["-c", DKIMPY_SIGN_AND_VERIFY, algorithm, private_key_arg])
            .args([&record.value, &record.name])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "dkimpy did not verify: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    #[test]
    fn dkimpy_verifies_an_rsa_signature_against_the_rendered_record() {
        let key = generate(DkimAlgorithm::RsaSha256, 2048).unwrap();
        let file = KeyFile::new(&key);
        let stdout = dkimpy_verifies(&key, file.path().to_str().unwrap());
        // A 2048-bit key's record is over 255 bytes, so the split form is what dkimpy read.
        assert!(stdout.contains("strings=2"), "{stdout}");
    }

    #[test]
    fn dkimpy_verifies_an_ed25519_signature_against_the_rendered_record() {
        let key = generate(DkimAlgorithm::Ed25519Sha256, 0).unwrap();
        // dkimpy signs Ed25519 with the base64 seed; openssl extracts it from our PKCS#8 (v1: 16-byte header,
        // then the 32-byte seed).
        let pkcs8 = openssl(&["pkey", "-outform", "DER"], &KeyFile::new(&key));
        assert_eq!(pkcs8.len(), 48);
        let seed = BASE64.encode(&pkcs8[16..]);
        dkimpy_verifies(&key, &seed);
    }
}
