//! PKCS#8 PEM armour for DKIM private keys, shared by the operator (which writes keys into Secrets) and the sidecar
//! (which reads them). Buffers holding key bytes are zeroized on drop, and no error repeats any of the input.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

/// The PEM type label of PKCS#8 private keys (RFC 7468 §10).
pub const LABEL: &str = "PRIVATE KEY";
const LINE: usize = 64;

/// Why a PEM text is not a PKCS#8 private key; fixed phrases only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemError {
    MissingHeader,
    MissingFooter,
    BadBase64,
}

impl PemError {
    /// A fixed explanation, safe to log.
    pub fn reason(self) -> &'static str {
        match self {
            Self::MissingHeader => "it does not start with a PKCS#8 PRIVATE KEY PEM header",
            Self::MissingFooter => "it does not end with a PKCS#8 PRIVATE KEY PEM footer",
            Self::BadBase64 => "its body is not valid base64",
        }
    }
}

/// The header line, `-----BEGIN <label>-----`.
pub fn header() -> String {
    format!("-----BEGIN {LABEL}-----")
}

/// The footer line, `-----END <label>-----`.
pub fn footer() -> String {
    format!("-----END {LABEL}-----")
}

/// Wraps DER bytes in PEM armour with 64-column lines, in pre-sized buffers so no reallocation leaves a copy.
pub fn encode(der: &[u8]) -> Zeroizing<String> {
    let encoded_len = base64::encoded_len(der.len(), true).unwrap_or_default();
    let mut body = Zeroizing::new(String::with_capacity(encoded_len));
    BASE64.encode_string(der, &mut body);
    let (header, footer) = (header(), footer());
    let capacity = header.len() + footer.len() + encoded_len + encoded_len / LINE + 3;
    let mut pem = Zeroizing::new(String::with_capacity(capacity));
    pem.push_str(&header);
    for (index, c) in body.chars().enumerate() {
        if index % LINE == 0 {
            pem.push('\n');
        }
        pem.push(c);
    }
    pem.push('\n');
    pem.push_str(&footer);
    pem.push('\n');
    pem
}

/// Unwraps PEM armour into DER bytes.
pub fn decode(pem: &str) -> Result<Zeroizing<Vec<u8>>, PemError> {
    let body = pem
        .trim()
        .strip_prefix(&header())
        .ok_or(PemError::MissingHeader)?
        .strip_suffix(&footer())
        .ok_or(PemError::MissingFooter)?;
    let mut base64 = Zeroizing::new(String::with_capacity(body.len()));
    base64.extend(body.chars().filter(|c| !c.is_ascii_whitespace()));
    let mut der = Zeroizing::new(Vec::with_capacity(base64::decoded_len_estimate(base64.len())));
    // The decoder's own error quotes the offending character, which is key material.
    BASE64
        .decode_vec(base64.as_bytes(), &mut der)
        .map_err(|_| PemError::BadBase64)?;
    Ok(der)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn armour_has_64_column_lines_between_header_and_footer() {
        let pem = encode(&[7u8; 100]);
        let lines: Vec<&str> = pem.lines().collect();
        assert_eq!(lines.first().copied(), Some(header().as_str()));
        assert_eq!(lines.last().copied(), Some(footer().as_str()));
        assert!(lines[1..lines.len() - 1].iter().all(|line| line.len() <= 64));
    }

    #[test]
    fn other_labels_and_bad_bodies_are_refused_without_echo() {
        let rsa = format!("-----BEGIN RSA {LABEL}-----\nAAAA\n-----END RSA {LABEL}-----\n");
        assert_eq!(decode(&rsa), Err(PemError::MissingHeader));
        let bad = format!("{}\nsecret$$\n{}\n", header(), footer());
        assert_eq!(decode(&bad), Err(PemError::BadBase64));
        assert!(!PemError::BadBase64.reason().contains("secret"));
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(der in proptest::collection::vec(any::<u8>(), 0..600)) {
            prop_assert_eq!(decode(&encode(&der)).map(|bytes| bytes.to_vec()), Ok(der));
        }
    }
}
