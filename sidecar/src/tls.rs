//! TLS client configurations for talking to MX hosts, one per way a peer must be authenticated
//! ([`PeerAuth`]) and minimum version. Never below TLS 1.2. Built configurations are cached: the WebPKI root
//! store is costly to build and every delivery needs one.

pub mod dane;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use securemail_api::tenant::TlsVersion;

use crate::policy::PeerAuth;

/// Configurations kept; DANE records differ per MX host, so the cache is bounded and simply emptied when full.
const MAX_CACHED: usize = 512;

/// Why the TLS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("no usable trusted root certificates in the system store (or SSL_CERT_FILE); errors: {0}")]
    NoRoots(String),
    #[error("cannot build a TLS client configuration: {0}")]
    Config(String),
}

/// Builds and caches client configurations.
pub struct TlsConfigs {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    cache: Mutex<HashMap<CacheKey, Arc<ClientConfig>>>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum CacheKey {
    WebPki(bool),
    Any(bool),
    Dane {
        tls13_only: bool,
        tlsa: Vec<(u8, u8, u8, Vec<u8>)>,
        names: Vec<String>,
    },
}

impl TlsConfigs {
    /// With the system trust store for WebPKI (rustls-native-certs; honours `SSL_CERT_FILE`). Blocking file I/O,
    /// done once at start-up.
    pub fn with_native_roots() -> Result<Self, TlsSetupError> {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
            return Err(TlsSetupError::NoRoots(errors.join("; ")));
        }
        Ok(Self::with_roots(roots))
    }

    /// With these WebPKI roots (tests inject their own CA).
    pub fn with_roots(roots: RootCertStore) -> Self {
        Self {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            roots: Arc::new(roots),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The configuration for a peer authenticated by `auth`, with TLS `min_version` or newer.
    pub fn client_config(&self, auth: &PeerAuth, min_version: TlsVersion) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let tls13_only = min_version == TlsVersion::Tls13;
        let key = match auth {
            PeerAuth::WebPki => CacheKey::WebPki(tls13_only),
            PeerAuth::AnyCertificate => CacheKey::Any(tls13_only),
            PeerAuth::Dane { tlsa, reference_names } => CacheKey::Dane {
                tls13_only,
                tlsa: tlsa
                    .iter()
                    .map(|r| (r.usage, r.selector, r.matching, r.data.clone()))
                    .collect(),
                names: reference_names.clone(),
            },
        };
        if let Some(config) = self.lock_cache().get(&key) {
            return Ok(Arc::clone(config));
        }
        let config = Arc::new(self.build(auth, tls13_only)?);
        let mut cache = self.lock_cache();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, Arc::clone(&config));
        Ok(config)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<ClientConfig>>> {
        // The map stays consistent even if a holder panicked: every operation on it is a single call.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn build(&self, auth: &PeerAuth, tls13_only: bool) -> Result<ClientConfig, TlsSetupError> {
        let algorithms = self.provider.signature_verification_algorithms;
        let verifier: Arc<dyn ServerCertVerifier> = match auth {
            PeerAuth::WebPki => {
                WebPkiServerVerifier::builder_with_provider(Arc::clone(&self.roots), Arc::clone(&self.provider))
                    .build()
                    .map_err(|err| TlsSetupError::Config(err.to_string()))?
            }
            PeerAuth::AnyCertificate => Arc::new(AnyCertificate { algorithms }),
            PeerAuth::Dane { tlsa, reference_names } => Arc::new(dane::DaneVerifier {
                tlsa: tlsa.clone(),
                // A reference name that is not a DNS name can never match; dropping it is the same answer.
                reference_names: reference_names
                    .iter()
                    .filter_map(|name| ServerName::try_from(name.clone()).ok())
                    .collect(),
                algorithms,
            }),
        };
        let versions: &[&'static rustls::SupportedProtocolVersion] = if tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        Ok(ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(versions)
            .map_err(|err| TlsSetupError::Config(err.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }
}

impl fmt::Debug for TlsConfigs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfigs")
            .field("roots", &self.roots.len())
            .field("cached", &self.lock_cache().len())
            .finish()
    }
}

/// Tenant mode `encrypted`: any certificate is accepted, but the handshake signature must be made with its key,
/// so the session is at least bound to the certificate that will be recorded in evidence.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Why a handshake failed, in words for the reply to Postfix and a class for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeFailure {
    pub kind: HandshakeFailureKind,
    pub reason: String,
}

/// What kind of handshake failure: the first two mean the peer offers no secure path, the last may be transient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailureKind {
    /// The peer's certificate was refused.
    Certificate,
    /// TLS itself failed, e.g. no common version or cipher suite.
    Protocol,
    /// The connection broke during the handshake.
    Network,
}

impl HandshakeFailure {
    /// Classifies the error `tokio_rustls` returned for a handshake.
    pub fn of(err: &std::io::Error) -> Self {
        let tls_error = err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls_error {
            Some(rustls::Error::InvalidCertificate(cert_error)) => Self {
                kind: HandshakeFailureKind::Certificate,
                reason: describe_certificate_error(cert_error),
            },
            Some(other) => Self {
                kind: HandshakeFailureKind::Protocol,
                reason: format!("TLS handshake failed: {other}"),
            },
            None => Self {
                kind: HandshakeFailureKind::Network,
                reason: format!("TLS handshake failed: {}", err.kind()),
            },
        }
    }
}

fn describe_certificate_error(err: &rustls::CertificateError) -> String {
    use rustls::CertificateError as E;
    match err {
        E::NotValidForName | E::NotValidForNameContext { .. } => "WebPKI: name mismatch".to_owned(),
        E::Expired | E::ExpiredContext { .. } => "WebPKI: expired".to_owned(),
        E::NotValidYet | E::NotValidYetContext { .. } => "WebPKI: not yet valid".to_owned(),
        E::UnknownIssuer => "WebPKI: unknown issuer".to_owned(),
        E::Revoked => "WebPKI: revoked".to_owned(),
        E::BadSignature => "bad signature".to_owned(),
        E::Other(other) => other.to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Tlsa;

    #[test]
    fn configurations_are_cached_per_auth_and_minimum_version() {
        let configs = TlsConfigs::with_roots(RootCertStore::empty());
        // WebPKI with no roots cannot be built: a clear error, not a config that trusts nothing silently.
        assert!(matches!(
            configs.client_config(&PeerAuth::WebPki, TlsVersion::Tls12),
            Err(TlsSetupError::Config(_))
        ));
        let any12 = configs
            .client_config(&PeerAuth::AnyCertificate, TlsVersion::Tls12)
            .unwrap();
        let any12_again = configs
            .client_config(&PeerAuth::AnyCertificate, TlsVersion::Tls12)
            .unwrap();
        let any13 = configs
            .client_config(&PeerAuth::AnyCertificate, TlsVersion::Tls13)
            .unwrap();
        assert!(Arc::ptr_eq(&any12, &any12_again));
        assert!(!Arc::ptr_eq(&any12, &any13));

        let dane = |data: u8| PeerAuth::Dane {
            tlsa: vec![Tlsa {
                usage: 3,
                selector: 1,
                matching: 1,
                data: vec![data; 32],
            }],
            reference_names: vec!["mx.example.net".into()],
        };
        let first = configs.client_config(&dane(1), TlsVersion::Tls12).unwrap();
        let other = configs.client_config(&dane(2), TlsVersion::Tls12).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(Arc::ptr_eq(
            &first,
            &configs.client_config(&dane(1), TlsVersion::Tls12).unwrap()
        ));
    }
}
