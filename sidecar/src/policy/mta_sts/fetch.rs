//! The HTTPS fetch of an MTA-STS policy file (RFC 8461 section 3.3): WebPKI-valid certificate for
//! `mta-sts.<domain>`, no redirects, text/plain, at most 64 KiB, bounded time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use rustls::RootCertStore;

use super::{FetchError, StsFetch};
use crate::policy::dns::{DnsLookup, HickoryDns};

/// Largest policy file accepted (RFC 8461 section 3.3 recommends 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Whole-request limit: connect, TLS, headers and body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves the policy host through our own resolver, so the configured nameservers apply here too.
#[derive(Debug)]
pub struct OurResolver(pub HickoryDns);

impl Resolve for OurResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let dns = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let answer = dns.addresses(&host).await?;
            let addrs: Vec<SocketAddr> = answer.records().iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
            if addrs.is_empty() {
                return Err(format!("{host} has no A or AAAA records").into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Fetches policy files over HTTPS.
#[derive(Debug)]
pub struct HttpsFetcher {
    client: reqwest::Client,
    port: u16,
}

impl HttpsFetcher {
    /// Production: system trust store (honours SSL_CERT_FILE), port 443, our resolver.
    pub fn from_system(dns: HickoryDns) -> Result<Self, FetchError> {
        let loaded = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
        if added == 0 {
            return Err(FetchError {
                domain: "-".to_owned(),
                reason: format!(
                    "no usable system trust anchors found ({} load errors)",
                    loaded.errors.len()
                ),
            });
        }
        Self::new(Arc::new(OurResolver(dns)), roots, 443)
    }

    /// `roots` decide which certificates are WebPKI-valid; `port` is 443 except in tests.
    pub fn new<R: Resolve + 'static>(resolver: Arc<R>, roots: RootCertStore, port: u16) -> Result<Self, FetchError> {
        let setup = |reason: String| FetchError {
            domain: "-".to_owned(),
            reason,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| setup(format!("TLS setup: {error}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .https_only(true)
            .timeout(FETCH_TIMEOUT)
            .dns_resolver(resolver)
            .build()
            .map_err(|error| setup(format!("HTTP client setup: {error}")))?;
        Ok(Self { client, port })
    }
}

impl StsFetch for HttpsFetcher {
    async fn fetch(&self, domain: &str) -> Result<String, FetchError> {
        let fail = |reason: String| FetchError {
            domain: domain.to_owned(),
            reason,
        };
        let url = format!("https://mta-sts.{domain}:{}/.well-known/mta-sts.txt", self.port);
        let mut response = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|error| fail(format!("GET {url}: {}", error_chain(&error))))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(fail(format!(
                "GET {url} answered {status}: redirects are not followed (RFC 8461 3.3)"
            )));
        }
        if status != reqwest::StatusCode::OK {
            return Err(fail(format!("GET {url} answered {status}, expected 200")));
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media_type = content_type.split(';').next().unwrap_or("").trim();
        if !media_type.eq_ignore_ascii_case("text/plain") {
            return Err(fail(format!(
                "GET {url}: Content-Type {content_type:?}, expected text/plain"
            )));
        }
        let too_large = || fail(format!("GET {url}: policy larger than {MAX_POLICY_BYTES} bytes"));
        if response
            .content_length()
            .is_some_and(|len| len > MAX_POLICY_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| fail(format!("GET {url}: reading body: {}", error_chain(&error))))?
        {
            if body.len() + chunk.len() > MAX_POLICY_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| fail(format!("GET {url}: policy is not UTF-8")))
    }
}

/// reqwest's Display hides the cause (e.g. the certificate error); operators need it.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
