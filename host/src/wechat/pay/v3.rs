//! WeChat Pay APIv3: the AEAD of notify resources and certificates
//! (AES-256-GCM with the APIv3 key), and the SHA256-RSA signatures of
//! requests (`Authorization: WECHATPAY2-SHA256-RSA2048 …`), answers and
//! notifies (`Wechatpay-*` headers, checked with the platform's keys).

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

/// Why an AEAD resource did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AeadError {
    #[error("the nonce must be 12 bytes")]
    Nonce,
    #[error("the ciphertext is not base64")]
    Base64,
    #[error("the ciphertext does not decrypt with the APIv3 key (tampered, or another key)")]
    Decrypt,
}

/// APIv3 `resource` decryption: AES-256-GCM, key = the APIv3 key, the 16-byte tag at the end.
pub fn v3_decrypt(
    apiv3_key: &[u8; 32],
    nonce: &str,
    associated_data: &str,
    ciphertext_b64: &str,
) -> Result<Vec<u8>, AeadError> {
    if nonce.len() != 12 {
        return Err(AeadError::Nonce);
    }
    let ciphertext = BASE64.decode(ciphertext_b64).map_err(|_| AeadError::Base64)?;
    let cipher = Aes256Gcm::new(apiv3_key.into());
    cipher
        .decrypt(
            Nonce::from_slice(nonce.as_bytes()),
            Payload { msg: &ciphertext, aad: associated_data.as_bytes() },
        )
        .map_err(|_| AeadError::Decrypt)
}

/// The inverse of [`v3_decrypt`] (the simulator and tests play WeChat Pay with it).
pub fn v3_encrypt(
    apiv3_key: &[u8; 32],
    nonce: &str,
    associated_data: &str,
    plaintext: &[u8],
) -> Result<String, AeadError> {
    if nonce.len() != 12 {
        return Err(AeadError::Nonce);
    }
    let cipher = Aes256Gcm::new(apiv3_key.into());
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(nonce.as_bytes()),
            Payload { msg: plaintext, aad: associated_data.as_bytes() },
        )
        .map_err(|_| AeadError::Decrypt)?;
    Ok(BASE64.encode(sealed))
}

/// SHA256-RSA (PKCS#1 v1.5) signatures with a private key: the merchant key
/// (APIv3 requests, JSAPI `paySign`) and, in the simulator, the platform key.
/// Signs with ring, whose RSA private-key operation is constant time.
pub struct RsaSigner(ring::signature::RsaKeyPair);

impl RsaSigner {
    /// A PEM private key: PKCS#8 (`BEGIN PRIVATE KEY`, WeChat Pay's
    /// `apiclient_key.pem`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`).
    pub fn from_pem(pem: &str) -> anyhow::Result<RsaSigner> {
        let (label, der) = pem_rfc7468::decode_vec(pem.trim().as_bytes())
            .map_err(|_| anyhow::anyhow!("not a PEM private key"))?;
        let pair = match label {
            "PRIVATE KEY" => ring::signature::RsaKeyPair::from_pkcs8(&der),
            "RSA PRIVATE KEY" => ring::signature::RsaKeyPair::from_der(&der),
            other => anyhow::bail!("a PEM `{other}` is not an RSA private key"),
        }
        .map_err(|e| anyhow::anyhow!("not a usable RSA private key ({e})"))?;
        Ok(RsaSigner(pair))
    }

    /// Base64 SHA256-RSA signature of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut signature = vec![0; self.0.public().modulus_len()];
        self.0
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                message,
                &mut signature,
            )
            .expect("the buffer is the modulus length");
        BASE64.encode(signature)
    }
}

/// SHA256-RSA signature with the `rsa` crate (tests only build messages with it).
pub fn rsa_sign(key: &RsaPrivateKey, message: &[u8]) -> String {
    let signer = SigningKey::<Sha256>::new(key.clone());
    BASE64.encode(signer.sign(message).to_bytes())
}

pub fn rsa_verify(key: &RsaPublicKey, message: &[u8], signature_b64: &str) -> bool {
    let Ok(bytes) = BASE64.decode(signature_b64.trim()) else { return false };
    let Ok(signature) = Signature::try_from(bytes.as_slice()) else { return false };
    VerifyingKey::<Sha256>::new(key.clone()).verify(message, &signature).is_ok()
}

pub fn private_key_from_pem(pem: &str) -> anyhow::Result<RsaPrivateKey> {
    RsaPrivateKey::from_pkcs8_pem(pem).map_err(|_| anyhow::anyhow!("not a PKCS#8 RSA private key (PEM)"))
}

pub fn public_key_from_pem(pem: &str) -> anyhow::Result<RsaPublicKey> {
    RsaPublicKey::from_public_key_pem(pem)
        .map_err(|_| anyhow::anyhow!("not an RSA public key (PEM, SubjectPublicKeyInfo)"))
}

/// WeChat Pay refuses messages whose timestamp is 5 minutes or more away; so do we.
pub const SKEW_SECS: u64 = 300;

/// Why a WeChat Pay signature (`Wechatpay-*` headers) was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// WeChat Pay probes signature checking with deliberately wrong signatures.
    #[error("a WECHATPAY/SIGNTEST/ probe")]
    Probe,
    #[error("the timestamp is 5 minutes or more away")]
    Stale,
    #[error("no platform key has the id `{0}`")]
    UnknownKey(String),
    #[error("the signature does not verify")]
    Bad,
    #[error("header {0} is missing or malformed")]
    Malformed(&'static str),
}

/// The `Wechatpay-*` headers of a notify or an API answer.
#[derive(Debug, Clone, Default)]
pub struct SignatureHeaders {
    pub timestamp: String,
    pub nonce: String,
    pub signature: String,
    pub serial: String,
}

impl SignatureHeaders {
    pub fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> SignatureHeaders {
        let field = |name: &str| get(name).unwrap_or_default().to_string();
        SignatureHeaders {
            timestamp: field("wechatpay-timestamp"),
            nonce: field("wechatpay-nonce"),
            signature: field("wechatpay-signature"),
            serial: field("wechatpay-serial"),
        }
    }
}

/// WeChat Pay's verification keys by the id `Wechatpay-Serial` names: the
/// public key's `PUB_KEY_ID_…`, or a platform certificate's serial (hex, any case).
#[derive(Default, Clone)]
pub struct PlatformKeys {
    by_id: HashMap<String, RsaPublicKey>,
    /// Whether any key is a platform certificate's (which WeChat Pay renews).
    has_certificate: bool,
}

impl PlatformKeys {
    pub fn insert(&mut self, id: impl Into<String>, key: RsaPublicKey) {
        self.by_id.insert(id.into().to_ascii_uppercase(), key);
    }

    pub fn insert_certificate(&mut self, cert: &super::certificates::PlatformCertificate) {
        self.insert(cert.serial.clone(), cert.key.clone());
        self.has_certificate = true;
    }

    /// Certificate mode: a platform certificate is among the keys.
    pub fn has_certificate(&self) -> bool {
        self.has_certificate
    }

    /// These keys and `others`' (the configured ones beside the downloaded).
    pub fn joined(&self, others: &PlatformKeys) -> PlatformKeys {
        let mut all = self.clone();
        all.by_id.extend(others.by_id.iter().map(|(k, v)| (k.clone(), v.clone())));
        all.has_certificate |= others.has_certificate;
        all
    }

    pub fn get(&self, id: &str) -> Option<&RsaPublicKey> {
        self.by_id.get(&id.to_ascii_uppercase())
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.by_id.keys().map(String::as_str)
    }

    /// Keys from a PEM file: every `CERTIFICATE` (platform certificate mode,
    /// id = its serial; several allow a rotation) and at most one `PUBLIC KEY`
    /// (public-key mode, id = `public_key_id`, the `PUB_KEY_ID_…`).
    pub fn from_pem(text: &str, public_key_id: Option<&str>) -> anyhow::Result<PlatformKeys> {
        use x509_cert::der::Decode;
        let mut keys = PlatformKeys::default();
        let mut public_keys = 0;
        for block in pem_blocks(text) {
            let (label, der) = pem_rfc7468::decode_vec(block.as_bytes())
                .map_err(|_| anyhow::anyhow!("a PEM block is broken"))?;
            match label {
                "CERTIFICATE" => {
                    let cert = x509_cert::Certificate::from_der(&der)
                        .map_err(|_| anyhow::anyhow!("a CERTIFICATE block is not an X.509 certificate"))?;
                    let cert = super::certificates::parse_certificate(&cert)
                        .ok_or_else(|| anyhow::anyhow!("a platform certificate does not hold an RSA key"))?;
                    keys.insert_certificate(&cert);
                }
                "PUBLIC KEY" => {
                    public_keys += 1;
                    let id = public_key_id.ok_or_else(|| {
                        anyhow::anyhow!("a PUBLIC KEY needs WECHATPAY_PUBLIC_KEY_ID (its PUB_KEY_ID_…)")
                    })?;
                    let key = RsaPublicKey::from_public_key_der(&der)
                        .map_err(|_| anyhow::anyhow!("the PUBLIC KEY is not an RSA key"))?;
                    keys.insert(id, key);
                }
                other => anyhow::bail!("a PEM `{other}` is neither a CERTIFICATE nor a PUBLIC KEY"),
            }
        }
        anyhow::ensure!(public_keys <= 1, "only one PUBLIC KEY can go with WECHATPAY_PUBLIC_KEY_ID");
        anyhow::ensure!(!keys.is_empty(), "no CERTIFICATE or PUBLIC KEY found");
        Ok(keys)
    }

    /// Checks a notify's or an answer's signature over `timestamp\nnonce\nbody\n`:
    /// probes, clock skew, the key the serial names, then the signature.
    pub fn verify(&self, h: &SignatureHeaders, body: &[u8], now_unix: i64) -> Result<(), SignatureError> {
        if h.signature.starts_with("WECHATPAY/SIGNTEST/") {
            return Err(SignatureError::Probe);
        }
        if h.signature.is_empty() {
            return Err(SignatureError::Malformed("Wechatpay-Signature"));
        }
        let ts: i64 = h.timestamp.parse().map_err(|_| SignatureError::Malformed("Wechatpay-Timestamp"))?;
        if now_unix.abs_diff(ts) >= SKEW_SECS {
            return Err(SignatureError::Stale);
        }
        let key = self.get(&h.serial).ok_or_else(|| SignatureError::UnknownKey(h.serial.clone()))?;
        if rsa_verify(key, &signed_message(&h.timestamp, &h.nonce, body), &h.signature) {
            Ok(())
        } else {
            Err(SignatureError::Bad)
        }
    }
}

/// WeChat Pay's keys as this process holds them now, shared by everything
/// that checks WeChat Pay's signatures: replaced whole when certificates are
/// renewed, read without a lock. A signature under an id none of them has
/// wakes whoever renews them.
#[derive(Clone, Default)]
pub struct LiveKeys {
    keys: std::sync::Arc<arc_swap::ArcSwap<PlatformKeys>>,
    unknown_key: std::sync::Arc<tokio::sync::Notify>,
    /// Counts replacements, so a check can wait for the next one.
    replaced: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Someone renews them (certificate mode): an unknown id is worth waiting for.
    renewed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LiveKeys {
    pub fn new(keys: PlatformKeys) -> LiveKeys {
        LiveKeys { keys: std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(keys)), ..LiveKeys::default() }
    }

    pub fn current(&self) -> std::sync::Arc<PlatformKeys> {
        self.keys.load_full()
    }

    pub fn replace(&self, keys: PlatformKeys) {
        self.keys.store(std::sync::Arc::new(keys));
        self.replaced.send_modify(|n| *n += 1);
    }

    /// Says that something renews these keys (and answers [`Self::unknown_key_seen`]).
    pub fn renewed_elsewhere(&self) {
        self.renewed.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`PlatformKeys::verify`] with the current keys.
    pub fn verify(&self, h: &SignatureHeaders, body: &[u8], now_unix: i64) -> Result<(), SignatureError> {
        let result = self.keys.load().verify(h, body, now_unix);
        if let Err(SignatureError::UnknownKey(_)) = &result {
            self.unknown_key.notify_one();
        }
        result
    }

    /// [`Self::verify`]; when the id is unknown and the keys are renewed,
    /// waits (at most `wait`) for renewals and checks again after each. WeChat
    /// Pay signs its answers with a new certificate from the moment it
    /// switches, so the first answer under it is waited for, not refused.
    pub async fn verify_or_await_renewal(
        &self,
        h: &SignatureHeaders,
        body: &[u8],
        wait: std::time::Duration,
    ) -> Result<(), SignatureError> {
        let mut replaced = self.replaced.subscribe();
        let mut result = self.verify(h, body, crate::wechat::unix_now());
        let until = tokio::time::Instant::now() + wait;
        while matches!(result, Err(SignatureError::UnknownKey(_)))
            && self.renewed.load(std::sync::atomic::Ordering::Relaxed)
        {
            if !matches!(tokio::time::timeout_at(until, replaced.changed()).await, Ok(Ok(()))) {
                break;
            }
            result = self.keys.load().verify(h, body, crate::wechat::unix_now());
        }
        result
    }

    /// Resolves when a signature named a key none of the current ones has.
    pub async fn unknown_key_seen(&self) {
        self.unknown_key.notified().await
    }
}

/// What WeChat Pay signs in notifies and answers: `timestamp\nnonce\nbody\n`.
pub fn signed_message(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut message = format!("{timestamp}\n{nonce}\n").into_bytes();
    message.extend_from_slice(body);
    message.push(b'\n');
    message
}

/// A certificate serial as WeChat Pay writes it: upper-case hex, no leading zero bytes.
pub(crate) fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len().saturating_sub(1));
    hex::encode_upper(&bytes[start..])
}

/// The `-----BEGIN …-----` … `-----END …-----` blocks of a PEM file.
fn pem_blocks(text: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(begin) = rest.find("-----BEGIN ") {
        let from_begin = &rest[begin..];
        let Some(end) = from_begin.find("-----END ") else { break };
        let Some(close) = from_begin[end + 9..].find("-----") else { break };
        let len = end + 9 + close + 5;
        blocks.push(&from_begin[..len]);
        rest = &from_begin[len..];
    }
    blocks
}

/// One APIv3 request as the merchant signs it.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path_and_query: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub body: &'a str,
}

impl SignedRequest<'_> {
    /// The `Authorization` header: the merchant's signature over
    /// `METHOD\npath?query\ntimestamp\nnonce\nbody\n`, with the merchant id
    /// and the serial of the merchant's API certificate.
    pub fn authorization(&self, merchant_key: &RsaSigner, mchid: &str, serial_no: &str) -> String {
        let SignedRequest { method, path_and_query, timestamp, nonce, body } = self;
        let signature = merchant_key
            .sign(format!("{method}\n{path_and_query}\n{timestamp}\n{nonce}\n{body}\n").as_bytes());
        format!(
            "WECHATPAY2-SHA256-RSA2048 mchid=\"{mchid}\",nonce_str=\"{nonce}\",signature=\"{signature}\",timestamp=\"{timestamp}\",serial_no=\"{serial_no}\""
        )
    }
}

/// The fields of a merchant's `Authorization` header (WeChat Pay's side of
/// [`SignedRequest::authorization`]; the simulator checks requests with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub mchid: String,
    pub serial_no: String,
    pub nonce: String,
    pub timestamp: String,
    pub signature: String,
}

impl Authorization {
    /// `WECHATPAY2-SHA256-RSA2048 k="v",…`; `None` for another scheme.
    pub fn parse(header: &str) -> Option<Authorization> {
        let params = header.strip_prefix("WECHATPAY2-SHA256-RSA2048 ")?;
        let fields: HashMap<&str, &str> = params
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        let field = |k: &str| fields.get(k).copied().unwrap_or_default().to_string();
        Some(Authorization {
            mchid: field("mchid"),
            serial_no: field("serial_no"),
            nonce: field("nonce_str"),
            timestamp: field("timestamp"),
            signature: field("signature"),
        })
    }

    /// Whether the signature covers this request, made with `merchant_public`'s private key.
    pub fn verifies(
        &self,
        merchant_public: &RsaPublicKey,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> bool {
        let mut message =
            format!("{method}\n{path_and_query}\n{}\n{}\n", self.timestamp, self.nonce).into_bytes();
        message.extend_from_slice(body);
        message.push(b'\n');
        rsa_verify(merchant_public, &message, &self.signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::test_support::{fixture, vectors};

    #[test]
    fn v3_resources_decrypt_like_the_sdk_vector_and_refuse_tampering() {
        for v in vectors()["pay_v3_aead"].as_array().unwrap() {
            let key: [u8; 32] = v["apiv3_key"].as_str().unwrap().as_bytes().try_into().unwrap();
            let (nonce, aad, ct) = (
                v["nonce"].as_str().unwrap(),
                v["associated_data"].as_str().unwrap(),
                v["ciphertext_b64"].as_str().unwrap(),
            );
            assert_eq!(
                v3_decrypt(&key, nonce, aad, ct).unwrap(),
                v["plaintext"].as_str().unwrap().as_bytes()
            );
            assert_eq!(
                v3_encrypt(&key, nonce, aad, v["plaintext"].as_str().unwrap().as_bytes()).unwrap(),
                ct
            );
            assert_eq!(v3_decrypt(&key, nonce, "other", ct), Err(AeadError::Decrypt));
            assert_eq!(v3_decrypt(&key, "short", aad, ct), Err(AeadError::Nonce));
            assert_eq!(v3_decrypt(&key, nonce, aad, "%%%"), Err(AeadError::Base64));
            let mut other_key = key;
            other_key[0] ^= 1;
            assert_eq!(v3_decrypt(&other_key, nonce, aad, ct), Err(AeadError::Decrypt));
        }
    }

    #[test]
    fn rsa_signatures_verify_with_the_matching_public_key_only() {
        let platform = private_key_from_pem(&fixture("wechatpay_platform_test_key.pem")).unwrap();
        let platform_pub = public_key_from_pem(&fixture("wechatpay_platform_test_pub.pem")).unwrap();
        let merchant_pub = public_key_from_pem(&fixture("merchant_test_pub.pem")).unwrap();
        let message = b"1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n{\"id\":\"x\"}\n";
        let signature = rsa_sign(&platform, message);
        assert!(rsa_verify(&platform_pub, message, &signature));
        assert!(!rsa_verify(&merchant_pub, message, &signature));
        assert!(!rsa_verify(&platform_pub, b"tampered", &signature));
        assert!(!rsa_verify(&platform_pub, message, "not base64"));
        assert!(!rsa_verify(&platform_pub, message, ""));
    }

    #[test]
    fn platform_certificates_go_by_their_serial_and_public_keys_by_their_id() {
        let cert = fixture("wechatpay_platform_test_cert.pem");
        let public = fixture("wechatpay_platform_test_pub.pem");
        let signer = RsaSigner::from_pem(&fixture("wechatpay_platform_test_key.pem")).unwrap();
        let body = br#"{"prepay_id":"wx1"}"#;
        let headers = |serial: &str, timestamp: i64| SignatureHeaders {
            timestamp: timestamp.to_string(),
            nonce: "N0NCE".into(),
            signature: signer.sign(&signed_message(&timestamp.to_string(), "N0NCE", body)),
            serial: serial.into(),
        };
        let now = 1_700_000_000;

        // Certificate mode: the serial, in either case.
        let keys = PlatformKeys::from_pem(&cert, None).unwrap();
        let serial = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
        assert_eq!(keys.verify(&headers(serial, now), body, now), Ok(()));
        assert_eq!(keys.verify(&headers(&serial.to_lowercase(), now), body, now), Ok(()));
        assert_eq!(keys.verify(&headers(serial, now), b"tampered", now), Err(SignatureError::Bad));
        assert_eq!(keys.verify(&headers(serial, now - 300), body, now), Err(SignatureError::Stale));
        let mut probe = headers(serial, now);
        probe.signature = format!("WECHATPAY/SIGNTEST/{}", probe.signature);
        assert_eq!(keys.verify(&probe, body, now), Err(SignatureError::Probe));

        // A rotation file: the certificate and the public key together.
        let both = PlatformKeys::from_pem(&format!("{cert}\n{public}"), Some("PUB_KEY_ID_01")).unwrap();
        assert_eq!(both.verify(&headers("PUB_KEY_ID_01", now), body, now), Ok(()));
        assert_eq!(both.verify(&headers(serial, now), body, now), Ok(()));
        assert_eq!(
            both.verify(&headers("PUB_KEY_ID_02", now), body, now),
            Err(SignatureError::UnknownKey("PUB_KEY_ID_02".into()))
        );

        // Mistakes are named.
        let no_id = PlatformKeys::from_pem(&public, None).err().unwrap().to_string();
        assert!(no_id.contains("WECHATPAY_PUBLIC_KEY_ID"), "{no_id}");
        let private =
            PlatformKeys::from_pem(&fixture("merchant_test_key.pem"), None).err().unwrap().to_string();
        assert!(private.contains("PRIVATE KEY") && !private.contains("MII"), "no key bytes: {private}");
        assert!(PlatformKeys::from_pem("nothing here", None).is_err());
    }

    #[test]
    fn the_merchant_signer_matches_the_rsa_reference_and_refuses_other_pems() {
        let signer = RsaSigner::from_pem(&fixture("merchant_test_key.pem")).unwrap();
        let reference = private_key_from_pem(&fixture("merchant_test_key.pem")).unwrap();
        let message = b"wxb11529c136998cb6\n1414561699\n5K8264ILTKCH16CQ2502SI8ZNMTM67VS\nprepay_id=wx201410272009395522657a690389285100\n";
        // PKCS#1 v1.5 is deterministic: ring and the reference agree byte for byte.
        assert_eq!(signer.sign(message), rsa_sign(&reference, message));
        let public = public_key_from_pem(&fixture("merchant_test_pub.pem")).unwrap();
        assert!(rsa_verify(&public, message, &signer.sign(message)));
        assert!(RsaSigner::from_pem(&fixture("merchant_test_pub.pem")).is_err());
        assert!(RsaSigner::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").is_err());
    }

    #[test]
    fn a_signed_request_verifies_as_wechat_pay_checks_it_and_not_once_changed() {
        let key = RsaSigner::from_pem(&fixture("merchant_test_key.pem")).unwrap();
        let public = public_key_from_pem(&fixture("merchant_test_pub.pem")).unwrap();
        let request = SignedRequest {
            method: "POST",
            path_and_query: "/v3/pay/transactions/native",
            timestamp: "1554208460",
            nonce: "593BEC0C930BF1AFEB40B4A08C8FB242",
            body: r#"{"amount":{"total":1}}"#,
        };
        let header = request.authorization(&key, "1900000001", "SERIAL01");
        let auth = Authorization::parse(&header).unwrap();
        assert_eq!((auth.mchid.as_str(), auth.serial_no.as_str()), ("1900000001", "SERIAL01"));
        assert_eq!(auth.timestamp, "1554208460");
        assert!(auth.verifies(&public, "POST", "/v3/pay/transactions/native", request.body.as_bytes()));
        assert!(!auth.verifies(&public, "POST", "/v3/pay/transactions/h5", request.body.as_bytes()));
        assert!(!auth.verifies(&public, "POST", "/v3/pay/transactions/native", b"{}"));
        assert!(Authorization::parse("Bearer x").is_none());
    }
}
