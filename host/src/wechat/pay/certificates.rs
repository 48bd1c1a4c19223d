//! WeChat Pay's platform certificates, for merchants still on certificates
//! (`GET /v3/certificates`). Each certificate comes AES-256-GCM-sealed under
//! the APIv3 key: only WeChat Pay and the merchant hold that key, so a
//! certificate that opens is WeChat Pay's. The host keeps them sealed as they
//! came (database, internal API) and opens them in the process that uses them.

use rsa::RsaPublicKey;
use rsa::pkcs8::DecodePublicKey as _;
use serde::{Deserialize, Serialize};

use super::v3::{self, AeadError, PlatformKeys, SignatureError, SignatureHeaders};

/// The `associated_data` WeChat Pay seals certificates with.
pub const ASSOCIATED_DATA: &str = "certificate";

/// One entry of `GET /v3/certificates`, as WeChat Pay sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCertificate {
    pub serial_no: String,
    pub effective_time: String,
    pub expire_time: String,
    pub encrypt_certificate: Sealed,
}

/// The AEAD envelope of one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub algorithm: String,
    pub nonce: String,
    pub associated_data: String,
    pub ciphertext: String,
}

/// The answer of `GET /v3/certificates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificatesAnswer {
    pub data: Vec<SealedCertificate>,
}

/// An opened platform certificate.
#[derive(Debug, Clone)]
pub struct PlatformCertificate {
    /// Upper-case hex, as `Wechatpay-Serial` names it.
    pub serial: String,
    pub key: RsaPublicKey,
    /// Its X.509 validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

impl PlatformCertificate {
    pub fn is_valid_at(&self, now: i64) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// Why a certificate, or an answer of certificates, was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("the certificates answer is not the JSON WeChat Pay sends")]
    NotAnAnswer,
    #[error("certificate {0}: the algorithm must be AEAD_AES_256_GCM")]
    Algorithm(String),
    #[error("certificate {0}: {1}")]
    Sealed(String, AeadError),
    #[error("certificate {0}: not a PEM X.509 certificate with an RSA key")]
    NotACertificate(String),
    #[error("certificate {claimed}: the certificate inside has serial {actual}")]
    SerialMismatch { claimed: String, actual: String },
    #[error("the certificates answer: {0}")]
    Signature(SignatureError),
}

impl SealedCertificate {
    /// Opens it with the APIv3 key and reads the certificate inside; its serial
    /// must be the one the entry claims.
    pub fn open(&self, apiv3_key: &[u8; 32]) -> Result<PlatformCertificate, CertificateError> {
        let claimed = self.serial_no.to_ascii_uppercase();
        let sealed = &self.encrypt_certificate;
        if sealed.algorithm != "AEAD_AES_256_GCM" {
            return Err(CertificateError::Algorithm(claimed));
        }
        let pem = v3::v3_decrypt(apiv3_key, &sealed.nonce, &sealed.associated_data, &sealed.ciphertext)
            .map_err(|e| CertificateError::Sealed(claimed.clone(), e))?;
        let pem = String::from_utf8(pem).map_err(|_| CertificateError::NotACertificate(claimed.clone()))?;
        let cert =
            parse_certificate_pem(&pem).ok_or_else(|| CertificateError::NotACertificate(claimed.clone()))?;
        if cert.serial != claimed {
            return Err(CertificateError::SerialMismatch { claimed, actual: cert.serial });
        }
        Ok(cert)
    }

    /// Seals a PEM certificate as WeChat Pay does (the simulator plays it with this).
    pub fn seal(pem: &str, apiv3_key: &[u8; 32], nonce: &str) -> Result<SealedCertificate, CertificateError> {
        let cert = parse_certificate_pem(pem).ok_or_else(|| CertificateError::NotACertificate("?".into()))?;
        let ciphertext = v3::v3_encrypt(apiv3_key, nonce, ASSOCIATED_DATA, pem.as_bytes())
            .map_err(|e| CertificateError::Sealed(cert.serial.clone(), e))?;
        Ok(SealedCertificate {
            serial_no: cert.serial.clone(),
            effective_time: super::rfc3339_cst(cert.not_before),
            expire_time: super::rfc3339_cst(cert.not_after),
            encrypt_certificate: Sealed {
                algorithm: "AEAD_AES_256_GCM".into(),
                nonce: nonce.into(),
                associated_data: ASSOCIATED_DATA.into(),
                ciphertext,
            },
        })
    }
}

/// The first X.509 certificate of a PEM text, if it holds an RSA key.
pub fn parse_certificate_pem(pem: &str) -> Option<PlatformCertificate> {
    use x509_cert::der::Decode;
    let (label, der) = pem_rfc7468::decode_vec(pem.trim().as_bytes()).ok()?;
    if label != "CERTIFICATE" {
        return None;
    }
    parse_certificate(&x509_cert::Certificate::from_der(&der).ok()?)
}

/// The serial, key and validity of a decoded certificate.
pub fn parse_certificate(cert: &x509_cert::Certificate) -> Option<PlatformCertificate> {
    use x509_cert::der::Encode;
    let tbs = &cert.tbs_certificate;
    let spki = tbs.subject_public_key_info.to_der().ok()?;
    let key = RsaPublicKey::from_public_key_der(&spki).ok()?;
    let unix = |t: &x509_cert::time::Time| i64::try_from(t.to_unix_duration().as_secs()).ok();
    Some(PlatformCertificate {
        serial: v3::serial_hex(tbs.serial_number.as_bytes()),
        key,
        not_before: unix(&tbs.validity.not_before)?,
        not_after: unix(&tbs.validity.not_after)?,
    })
}

/// Checks a `GET /v3/certificates` answer and opens its certificates.
///
/// Every certificate must open under the APIv3 key. The answer's signature
/// must verify with a key the host already holds, or with one of the answer's
/// own certificates: those opened under the APIv3 key, which only WeChat Pay
/// shares with the merchant (the rule of WeChat Pay's own certificate
/// downloader; it is what lets a rotation through when WeChat Pay signs with
/// the new certificate before the host has it).
pub fn accept_answer(
    known: &PlatformKeys,
    headers: &SignatureHeaders,
    body: &[u8],
    apiv3_key: &[u8; 32],
    now_unix: i64,
) -> Result<Vec<(SealedCertificate, PlatformCertificate)>, CertificateError> {
    let answer: CertificatesAnswer =
        serde_json::from_slice(body).map_err(|_| CertificateError::NotAnAnswer)?;
    let opened = answer
        .data
        .into_iter()
        .map(|sealed| sealed.open(apiv3_key).map(|cert| (sealed, cert)))
        .collect::<Result<Vec<_>, _>>()?;
    match known.verify(headers, body, now_unix) {
        Ok(()) => Ok(opened),
        Err(SignatureError::UnknownKey(serial)) => {
            let mut own = PlatformKeys::default();
            for (_, cert) in opened.iter().filter(|(_, c)| c.serial.eq_ignore_ascii_case(&serial)) {
                own.insert_certificate(cert);
            }
            own.verify(headers, body, now_unix).map_err(CertificateError::Signature)?;
            Ok(opened)
        }
        Err(e) => Err(CertificateError::Signature(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::pay::v3::{RsaSigner, signed_message};
    use crate::wechat::test_support::fixture;
    use crate::wechat::unix_now;

    const APIV3_KEY: &[u8; 32] = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
    /// The serial of `wechatpay_platform_test_cert.pem`.
    const SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";

    fn cert_pem() -> String {
        fixture("wechatpay_platform_test_cert.pem")
    }

    fn signed(body: &str, now: i64, serial: &str) -> SignatureHeaders {
        let key = RsaSigner::from_pem(&fixture("wechatpay_platform_test_key.pem")).unwrap();
        let nonce = "n0nce";
        SignatureHeaders {
            timestamp: now.to_string(),
            nonce: nonce.into(),
            signature: key.sign(&signed_message(&now.to_string(), nonce, body.as_bytes())),
            serial: serial.into(),
        }
    }

    fn answer() -> String {
        let sealed = SealedCertificate::seal(&cert_pem(), APIV3_KEY, "0123456789ab").unwrap();
        serde_json::to_string(&CertificatesAnswer { data: vec![sealed] }).unwrap()
    }

    #[test]
    fn a_sealed_certificate_opens_with_the_apiv3_key_only_and_keeps_its_serial_and_validity() {
        let sealed = SealedCertificate::seal(&cert_pem(), APIV3_KEY, "0123456789ab").unwrap();
        assert_eq!(sealed.serial_no, SERIAL);
        let cert = sealed.open(APIV3_KEY).unwrap();
        assert_eq!(cert.serial, SERIAL);
        assert!(cert.is_valid_at(unix_now()) && !cert.is_valid_at(cert.not_after));
        assert!(matches!(
            sealed.open(b"another 32-byte key, not the one"),
            Err(CertificateError::Sealed(_, AeadError::Decrypt))
        ));
        let mut renamed = sealed.clone();
        renamed.serial_no = "0102".into();
        assert!(matches!(renamed.open(APIV3_KEY), Err(CertificateError::SerialMismatch { .. })));
        let mut tampered = sealed;
        tampered.encrypt_certificate.associated_data = "transaction".into();
        assert!(matches!(tampered.open(APIV3_KEY), Err(CertificateError::Sealed(..))));
    }

    #[test]
    fn an_answer_signed_by_a_held_key_or_by_its_own_certificate_is_accepted() {
        let now = unix_now();
        let body = answer();
        let held = PlatformKeys::from_pem(&cert_pem(), None).unwrap();
        let got = accept_answer(&held, &signed(&body, now, SERIAL), body.as_bytes(), APIV3_KEY, now).unwrap();
        assert_eq!(got[0].1.serial, SERIAL);
        // A host that does not hold it yet: the certificate opened under the APIv3 key signs its own answer.
        let empty = PlatformKeys::default();
        assert!(accept_answer(&empty, &signed(&body, now, SERIAL), body.as_bytes(), APIV3_KEY, now).is_ok());
    }

    #[test]
    fn a_forged_stale_or_foreign_key_answer_is_refused() {
        let now = unix_now();
        let body = answer();
        let held = PlatformKeys::from_pem(&cert_pem(), None).unwrap();
        let mut forged = signed(&body, now, SERIAL);
        forged.signature = signed("something else", now, SERIAL).signature;
        assert_eq!(
            accept_answer(&held, &forged, body.as_bytes(), APIV3_KEY, now).err(),
            Some(CertificateError::Signature(SignatureError::Bad))
        );
        assert_eq!(
            accept_answer(&held, &signed(&body, now - 600, SERIAL), body.as_bytes(), APIV3_KEY, now).err(),
            Some(CertificateError::Signature(SignatureError::Stale))
        );
        // Signed under a serial neither held nor in the answer.
        assert_eq!(
            accept_answer(
                &PlatformKeys::default(),
                &signed(&body, now, "ABCDEF"),
                body.as_bytes(),
                APIV3_KEY,
                now
            )
            .err(),
            Some(CertificateError::Signature(SignatureError::UnknownKey("ABCDEF".into())))
        );
        // Sealed under another key: refused before any signature is looked at.
        assert!(matches!(
            accept_answer(
                &held,
                &signed(&body, now, SERIAL),
                body.as_bytes(),
                b"another 32-byte key, not the one",
                now
            ),
            Err(CertificateError::Sealed(..))
        ));
        assert_eq!(
            accept_answer(&held, &signed("{}", now, SERIAL), b"{}", APIV3_KEY, now).err(),
            Some(CertificateError::NotAnAnswer)
        );
    }
}
