//! DKIM private keys: the PKCS#8 PEM files the operator writes, parsed and used by aws-lc-rs. mail-auth only
//! canonicalises and builds the header; it reaches the key through its `SigningKey` trait, implemented here.
//!
//! Key bytes live in zeroizing buffers while they are parsed and never reach `Debug` output or error messages.

use std::fmt;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa;
use aws_lc_rs::signature::{Ed25519KeyPair, RSA_PKCS1_SHA256};
use mail_auth::common::crypto::{Algorithm, CryptoError, HashContext as _, HashImpl as _, Sha256, SigningKey};
use mail_auth::common::headers::Writable;
use securemail_api::pkcs8_pem;
use securemail_api::tenant::DkimAlgorithm;
use zeroize::Zeroizing;

/// A parsed private key, ready to sign.
pub(super) enum KeyPair {
    Rsa(rsa::KeyPair),
    Ed25519(Ed25519KeyPair),
}

impl KeyPair {
    /// Parses a PKCS#8 PEM file's content as a key of `algorithm`. The error is a fixed phrase: neither the
    /// PEM decoder's nor aws-lc's messages are passed on, since a decoder may quote the input.
    pub(super) fn from_pem(pem: &[u8], algorithm: DkimAlgorithm) -> Result<Self, &'static str> {
        let der = pem_decode(pem)?;
        match algorithm {
            DkimAlgorithm::RsaSha256 => rsa::KeyPair::from_pkcs8(&der)
                .map(Self::Rsa)
                .map_err(|_| "PKCS#8 content is not an RSA private key of 2048 to 8192 bits"),
            // Accepts PKCS#8 v1 (what the operator and `openssl genpkey` write) and v2.
            DkimAlgorithm::Ed25519Sha256 => Ed25519KeyPair::from_pkcs8(&der)
                .map(Self::Ed25519)
                .map_err(|_| "PKCS#8 content is not an Ed25519 private key"),
        }
    }
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl SigningKey for KeyPair {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        let failed = || mail_auth::Error::Crypto(CryptoError::Library("aws-lc-rs refused to sign".into()));
        match self {
            Self::Rsa(pair) => {
                let mut data = Vec::with_capacity(1024);
                input.write(&mut data);
                let mut signature = vec![0; pair.public_modulus_len()];
                // PKCS#1 v1.5 is deterministic; aws-lc-rs ignores the generator, the API still asks for one.
                pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), &data, &mut signature)
                    .map_err(|_| failed())?;
                Ok(signature)
            }
            Self::Ed25519(pair) => {
                // RFC 8463 §3: Ed25519 signs the SHA-256 of the canonicalised headers, not the headers themselves.
                let mut hasher = Self::Hasher::hasher();
                input.write(&mut hasher);
                let signature = pair.try_sign(hasher.complete().as_ref()).map_err(|_| failed())?;
                Ok(signature.as_ref().to_vec())
            }
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Rsa(_) => Algorithm::RsaSha256,
            Self::Ed25519(_) => Algorithm::Ed25519Sha256,
        }
    }
}

fn pem_decode(pem: &[u8]) -> Result<Zeroizing<Vec<u8>>, &'static str> {
    let text = std::str::from_utf8(pem).map_err(|_| "the file is not PEM text")?;
    pkcs8_pem::decode(text).map_err(pkcs8_pem::PemError::reason)
}
