//! DANE for SMTP (RFC 7672): matching TLSA records against the chain a server presented, and the certificate
//! verifier that enforces them during the handshake.
//!
//! Usage 3 (DANE-EE): the leaf matches; neither names nor dates are checked (section 3.1.1). Usage 2 (DANE-TA):
//! a certificate of the presented chain matches (or, for selector 1 with exact matching, the record holds the
//! trust anchor's public key itself), the leaf chains to it under WebPKI path rules, and the leaf is valid for one
//! of the reference names (section 3.2). Other usages never reach here (the policy drops them).

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::digest;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, Der, ServerName, TrustAnchor, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::evidence::Verification;
use crate::policy::Tlsa;

/// Longest chain considered; a server sending more is not trying to be verified.
const MAX_CHAIN: usize = 10;

/// Which kind of TLSA record the presented chain matches by digest alone, end entity first: `DaneEe` when a
/// usage 3 record matches the leaf, `DaneTa` when a usage 2 record matches a certificate above the leaf. Pure; the
/// full DANE-TA check (path and name) is [`verify`].
pub fn matching_usage(tlsa: &[Tlsa], chain: &[CertificateDer<'_>]) -> Option<Verification> {
    let leaf = chain.first()?;
    if tlsa.iter().any(|record| record.usage == 3 && matches(record, leaf)) {
        return Some(Verification::DaneEe);
    }
    let above_leaf = chain.iter().skip(1).take(MAX_CHAIN);
    above_leaf
        .clone()
        .any(|cert| tlsa.iter().any(|record| record.usage == 2 && matches(record, cert)))
        .then_some(Verification::DaneTa)
}

/// Why a chain does not satisfy the TLSA records.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DaneError {
    #[error("DANE: no TLSA record matches the presented certificates")]
    NoMatch,
    #[error("DANE-TA: the certificate does not chain to the TLSA trust anchor ({0})")]
    BadChain(String),
    #[error("DANE-TA: the certificate is not valid for the MX host name")]
    NameMismatch,
}

/// Checks `chain` (leaf first) against `tlsa` as RFC 7672 asks; `reference_names` are the names a DANE-TA leaf
/// must carry.
pub fn verify(
    tlsa: &[Tlsa],
    chain: &[CertificateDer<'_>],
    reference_names: &[ServerName<'_>],
    now: UnixTime,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<Verification, DaneError> {
    let leaf = chain.first().ok_or(DaneError::NoMatch)?;
    if tlsa.iter().any(|record| record.usage == 3 && matches(record, leaf)) {
        return Ok(Verification::DaneEe);
    }
    let chain = &chain[..chain.len().min(MAX_CHAIN)];
    let anchors = trust_anchors(tlsa, chain);
    if anchors.is_empty() {
        return Err(DaneError::NoMatch);
    }
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|err| DaneError::BadChain(err.to_string()))?;
    let mut last_error = DaneError::NoMatch;
    for anchor in &anchors {
        let path = end_entity.verify_for_usage(
            algorithms.all,
            std::slice::from_ref(anchor),
            &chain[1..],
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        );
        match path {
            Ok(_)
                if reference_names
                    .iter()
                    .any(|name| end_entity.verify_is_valid_for_subject_name(name).is_ok()) =>
            {
                return Ok(Verification::DaneTa);
            }
            Ok(_) => last_error = DaneError::NameMismatch,
            Err(err) => last_error = DaneError::BadChain(err.to_string()),
        }
    }
    Err(last_error)
}

/// Trust anchors the usage 2 records name: certificates of the chain above the leaf that match, and public keys
/// given in full (selector 1, matching 0), which take the subject of whichever certificate they may have issued.
fn trust_anchors<'a>(tlsa: &'a [Tlsa], chain: &'a [CertificateDer<'_>]) -> Vec<TrustAnchor<'a>> {
    let mut anchors = Vec::new();
    for cert in chain.iter().skip(1) {
        if tlsa.iter().any(|record| record.usage == 2 && matches(record, cert))
            && let Some(fields) = CertFields::parse(cert)
        {
            anchors.push(TrustAnchor {
                subject: Der::from(fields.subject),
                subject_public_key_info: Der::from(fields.spki_contents),
                name_constraints: None,
            });
        }
    }
    for record in tlsa
        .iter()
        .filter(|r| r.usage == 2 && r.selector == 1 && r.matching == 0)
    {
        let Some((spki, _)) = read_tlv(&record.data, SEQUENCE) else {
            continue;
        };
        for cert in chain {
            if let Some(fields) = CertFields::parse(cert) {
                anchors.push(TrustAnchor {
                    subject: Der::from(fields.issuer),
                    subject_public_key_info: Der::from(spki.contents),
                    name_constraints: None,
                });
            }
        }
    }
    anchors
}

/// Whether `record` matches the DER certificate `cert`.
fn matches(record: &Tlsa, cert: &[u8]) -> bool {
    let selected = match record.selector {
        0 => cert,
        1 => match CertFields::parse(cert) {
            Some(fields) => fields.spki,
            None => return false,
        },
        _ => return false,
    };
    match record.matching {
        0 => selected == record.data.as_slice(),
        1 => digest::digest(&digest::SHA256, selected).as_ref() == record.data.as_slice(),
        2 => digest::digest(&digest::SHA512, selected).as_ref() == record.data.as_slice(),
        _ => false,
    }
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const EXPLICIT_VERSION: u8 = 0xa0;

/// The parts of an X.509 certificate DANE needs, as slices of its DER.
struct CertFields<'a> {
    /// Contents of the issuer Name, without its SEQUENCE header (as webpki's trust anchors want it).
    issuer: &'a [u8],
    subject: &'a [u8],
    /// The whole SubjectPublicKeyInfo, header included (what selector 1 digests).
    spki: &'a [u8],
    spki_contents: &'a [u8],
}

impl<'a> CertFields<'a> {
    fn parse(der: &'a [u8]) -> Option<Self> {
        let (certificate, _) = read_tlv(der, SEQUENCE)?;
        let (tbs, _) = read_tlv(certificate.contents, SEQUENCE)?;
        let mut rest = tbs.contents;
        if rest.first() == Some(&EXPLICIT_VERSION) {
            rest = read_tlv(rest, EXPLICIT_VERSION)?.1;
        }
        let (_serial, rest) = read_tlv(rest, INTEGER)?;
        let (_signature, rest) = read_tlv(rest, SEQUENCE)?;
        let (issuer, rest) = read_tlv(rest, SEQUENCE)?;
        let (_validity, rest) = read_tlv(rest, SEQUENCE)?;
        let (subject, rest) = read_tlv(rest, SEQUENCE)?;
        let (spki, _) = read_tlv(rest, SEQUENCE)?;
        Some(Self {
            issuer: issuer.contents,
            subject: subject.contents,
            spki: spki.whole,
            spki_contents: spki.contents,
        })
    }
}

struct Tlv<'a> {
    whole: &'a [u8],
    contents: &'a [u8],
}

/// One DER element with tag `tag` at the start of `input`, and what follows it. Definite lengths of up to four
/// octets only, which covers every certificate.
fn read_tlv(input: &[u8], tag: u8) -> Option<(Tlv<'_>, &[u8])> {
    if *input.first()? != tag {
        return None;
    }
    let first = *input.get(1)?;
    let (length, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let octets = usize::from(first & 0x7f);
        if !(1..=4).contains(&octets) {
            return None;
        }
        let bytes = input.get(2..2 + octets)?;
        let length = bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (length, 2 + octets)
    };
    let end = header.checked_add(length)?;
    let whole = input.get(..end)?;
    Some((
        Tlv {
            whole,
            contents: &whole[header..],
        },
        &input[end..],
    ))
}

/// The verifier for [`crate::policy::PeerAuth::Dane`]; the handshake signature is still checked with the leaf's key.
pub(super) struct DaneVerifier {
    pub(super) tlsa: Vec<Tlsa>,
    pub(super) reference_names: Vec<ServerName<'static>>,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for DaneVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaneVerifier")
            .field("tlsa_records", &self.tlsa.len())
            .field("reference_names", &self.reference_names)
            .finish()
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'_>> = std::iter::once(end_entity.clone())
            .chain(intermediates.iter().cloned())
            .collect();
        verify(&self.tlsa, &chain, &self.reference_names, now, &self.algorithms)
            .map(|_| ServerCertVerified::assertion())
            .map_err(|err| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err)))))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(usage: u8, selector: u8, matching: u8, data: &[u8]) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data: data.to_vec(),
        }
    }

    fn algorithms() -> WebPkiSupportedAlgorithms {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    }

    struct Pki {
        ca: CertificateDer<'static>,
        ca_spki: Vec<u8>,
        leaf: CertificateDer<'static>,
        leaf_spki: Vec<u8>,
    }

    fn pki(leaf_name: &str) -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, &ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![leaf_name.to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        Pki {
            ca: ca_cert.der().clone(),
            ca_spki: rcgen::PublicKeyData::subject_public_key_info(&ca_key),
            leaf: leaf.der().clone(),
            leaf_spki: rcgen::PublicKeyData::subject_public_key_info(&leaf_key),
        }
    }

    fn sha256(data: &[u8]) -> Vec<u8> {
        digest::digest(&digest::SHA256, data).as_ref().to_vec()
    }

    fn sha512(data: &[u8]) -> Vec<u8> {
        digest::digest(&digest::SHA512, data).as_ref().to_vec()
    }

    fn names(names: &[&str]) -> Vec<ServerName<'static>> {
        names
            .iter()
            .map(|name| ServerName::try_from(name.to_string()).unwrap())
            .collect()
    }

    #[test]
    fn parsed_spki_is_the_key_rcgen_made() {
        let pki = pki("mx.example.net");
        assert_eq!(CertFields::parse(&pki.leaf).unwrap().spki, pki.leaf_spki.as_slice());
        assert_eq!(CertFields::parse(&pki.ca).unwrap().spki, pki.ca_spki.as_slice());
    }

    #[test]
    fn dane_ee_matches_the_leaf_by_cert_or_key_in_every_matching_type() {
        let pki = pki("other-name.example");
        let chain = [pki.leaf.clone(), pki.ca.clone()];
        let now = UnixTime::now();
        for good in [
            record(3, 0, 0, &pki.leaf),
            record(3, 0, 1, &sha256(&pki.leaf)),
            record(3, 0, 2, &sha512(&pki.leaf)),
            record(3, 1, 0, &pki.leaf_spki),
            record(3, 1, 1, &sha256(&pki.leaf_spki)),
            record(3, 1, 2, &sha512(&pki.leaf_spki)),
        ] {
            assert_eq!(
                matching_usage(std::slice::from_ref(&good), &chain),
                Some(Verification::DaneEe)
            );
            // No name check for DANE-EE: the leaf names another host.
            let names = names(&["mx.example.net"]);
            assert_eq!(
                verify(&[good], &chain, &names, now, &algorithms()),
                Ok(Verification::DaneEe)
            );
        }
        for bad in [
            record(3, 1, 1, &sha256(&pki.ca_spki)),
            record(3, 1, 1, &sha256(b"")),
            record(3, 2, 1, &sha256(&pki.leaf_spki)),
            record(3, 1, 3, &sha256(&pki.leaf_spki)),
            record(2, 1, 1, &sha256(&pki.leaf_spki)),
        ] {
            assert_eq!(matching_usage(std::slice::from_ref(&bad), &chain), None, "{bad:?}");
            assert_eq!(verify(&[bad], &chain, &[], now, &algorithms()), Err(DaneError::NoMatch));
        }
    }

    #[test]
    fn dane_ta_needs_a_chain_to_the_anchor_and_a_reference_name() {
        let pki = pki("mx.example.net");
        let chain = [pki.leaf.clone(), pki.ca.clone()];
        let now = UnixTime::now();
        let by_cert = record(2, 0, 1, &sha256(&pki.ca));
        assert_eq!(
            matching_usage(std::slice::from_ref(&by_cert), &chain),
            Some(Verification::DaneTa)
        );
        let good_names = names(&["mx.example.net"]);
        assert_eq!(
            verify(std::slice::from_ref(&by_cert), &chain, &good_names, now, &algorithms()),
            Ok(Verification::DaneTa)
        );
        assert_eq!(
            verify(
                std::slice::from_ref(&by_cert),
                &chain,
                &names(&["mx.other.example"]),
                now,
                &algorithms()
            ),
            Err(DaneError::NameMismatch)
        );

        // The full key as trust anchor, CA certificate not sent.
        let key_only = record(2, 1, 0, &pki.ca_spki);
        let leaf_only = [pki.leaf.clone()];
        assert_eq!(matching_usage(std::slice::from_ref(&key_only), &leaf_only), None);
        assert_eq!(
            verify(&[key_only], &leaf_only, &good_names, now, &algorithms()),
            Ok(Verification::DaneTa)
        );

        // An anchor that did not issue the leaf.
        let stranger = self::pki("mx.example.net");
        let forged = [pki.leaf.clone(), stranger.ca.clone()];
        let stranger_record = record(2, 0, 1, &sha256(&stranger.ca));
        assert!(matches!(
            verify(&[stranger_record], &forged, &good_names, now, &algorithms()),
            Err(DaneError::BadChain(_))
        ));
    }

    #[test]
    fn truncated_or_garbage_der_never_matches_or_panics() {
        let pki = pki("mx.example.net");
        for len in 0..pki.leaf.len() {
            assert!(CertFields::parse(&pki.leaf[..len]).is_none());
        }
        let garbage = CertificateDer::from(vec![0x30, 0x84, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(matching_usage(&[record(3, 1, 0, b"")], &[garbage]), None);
    }
}
