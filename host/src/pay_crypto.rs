//! WeChat Pay's cryptography: APIv2 signatures (MD5 / HMAC-SHA256 over the
//! sorted fields), APIv3 AEAD (AES-256-GCM with the APIv3 key), and the
//! SHA256-RSA signatures of APIv3 requests, responses and notifies.

use std::collections::HashMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

/// How an APIv2 message is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2SignType {
    Md5,
    HmacSha256,
}

impl V2SignType {
    pub fn parse(s: Option<&str>) -> Option<V2SignType> {
        match s {
            None | Some("MD5") | Some("") => Some(V2SignType::Md5),
            Some("HMAC-SHA256") => Some(V2SignType::HmacSha256),
            _ => None,
        }
    }
}

/// APIv2 `sign`: sort the fields, drop empty values and `sign` itself, join
/// `k=v` with `&`, append `&key=API_KEY`, digest, upper-case hex.
pub fn v2_sign(fields: &[(String, String)], api_key: &str, sign_type: V2SignType) -> String {
    let mut pairs: Vec<&(String, String)> =
        fields.iter().filter(|(k, v)| k != "sign" && !v.is_empty()).collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut text = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    text.push_str("&key=");
    text.push_str(api_key);
    let digest = match sign_type {
        V2SignType::Md5 => Md5::digest(text.as_bytes()).to_vec(),
        V2SignType::HmacSha256 => {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(api_key.as_bytes()).expect("any key length");
            mac.update(text.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
    };
    hex::encode_upper(digest)
}

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

/// SHA256-RSA (PKCS#1 v1.5) signature, base64, as WeChat Pay writes them.
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

/// WeChat Pay's verification keys by the id `Wechatpay-Serial` names: the
/// public key's `PUB_KEY_ID_…`, or a platform certificate's serial.
#[derive(Default, Clone)]
pub struct PlatformKeys {
    by_id: HashMap<String, RsaPublicKey>,
}

impl PlatformKeys {
    pub fn insert(&mut self, id: impl Into<String>, key: RsaPublicKey) {
        self.by_id.insert(id.into(), key);
    }

    pub fn get(&self, id: &str) -> Option<&RsaPublicKey> {
        self.by_id.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vectors/wechat.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn v2_signatures_match_the_sdk_vectors() {
        for v in vectors()["pay_v2_sign"].as_array().unwrap() {
            let key = v["api_key"].as_str().unwrap();
            let fields: Vec<(String, String)> = v["params"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            assert_eq!(v2_sign(&fields, key, V2SignType::Md5), v["md5"].as_str().unwrap());
            assert_eq!(v2_sign(&fields, key, V2SignType::HmacSha256), v["hmac_sha256"].as_str().unwrap());
            // Empty values and a `sign` field do not count.
            let mut more = fields.clone();
            more.push(("attach".into(), String::new()));
            more.push(("sign".into(), "WHATEVER".into()));
            assert_eq!(v2_sign(&more, key, V2SignType::Md5), v["md5"].as_str().unwrap());
        }
    }

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
        let fixture = |f: &str| {
            std::fs::read_to_string(format!("{}/tests/fixtures/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap()
        };
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
}
