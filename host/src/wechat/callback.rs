//! The official account's callback protocol: the server signature (sha1 of
//! the sorted token, timestamp and nonce) and safe mode (`msg_signature`, the
//! message AES-256-CBC encrypted with the EncodingAESKey, the AppID at its
//! tail), as WeChat's `WXBizMsgCrypt` does it.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as BASE64};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

use super::{VerifyError, unix_now};

type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

/// EncodingAESKeys are 43 base64 characters whose last one carries unused bits:
/// WeChat's SDKs decode them leniently, and so must we.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

/// WeChat pads safe-mode plaintext PKCS#7-style to a multiple of 32 bytes.
const PAD_BLOCK: usize = 32;

/// A bad EncodingAESKey setting (never includes the key).
#[derive(Debug, thiserror::Error)]
#[error("WECHAT_AES_KEY must be the 43-character EncodingAESKey from the WeChat console")]
pub struct BadAesKey;

/// A safe-mode message sealed for WeChat, with its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub encrypt: String,
    pub msg_signature: String,
    pub timestamp: String,
    pub nonce: String,
}

/// The callback secrets: WECHAT_TOKEN, WECHAT_AES_KEY and WECHAT_APPID, each
/// optional (an operation needing a missing one is `NotConfigured`).
pub struct CallbackKeys {
    token: Option<SecretString>,
    aes_key: Option<SecretSlice<u8>>,
    appid: Option<String>,
    /// Accepted distance of a callback's timestamp from now; `None` disables the check.
    window_secs: Option<u64>,
}

impl CallbackKeys {
    pub fn new(
        token: Option<SecretString>,
        encoding_aes_key: Option<&SecretString>,
        appid: Option<String>,
        window_secs: Option<u64>,
    ) -> Result<Self, BadAesKey> {
        let aes_key = match encoding_aes_key {
            None => None,
            Some(k) => {
                let k = k.expose_secret();
                if k.len() != 43 {
                    return Err(BadAesKey);
                }
                let bytes = LENIENT_BASE64.decode(format!("{k}=")).map_err(|_| BadAesKey)?;
                if bytes.len() != 32 {
                    return Err(BadAesKey);
                }
                Some(SecretSlice::from(bytes))
            }
        };
        Ok(CallbackKeys { token, aes_key, appid, window_secs })
    }

    /// Whether safe mode is configured (WeChat then encrypts every push).
    pub fn has_aes_key(&self) -> bool {
        self.aes_key.is_some()
    }

    pub fn window_secs(&self) -> Option<u64> {
        self.window_secs
    }

    fn token(&self) -> Result<&str, VerifyError> {
        self.token
            .as_ref()
            .map(|t| t.expose_secret())
            .ok_or(VerifyError::NotConfigured("WECHAT_TOKEN is not set"))
    }

    fn aes_key(&self) -> Result<&[u8], VerifyError> {
        self.aes_key
            .as_ref()
            .map(|k| k.expose_secret())
            .ok_or(VerifyError::NotConfigured("WECHAT_AES_KEY is not set"))
    }

    fn appid(&self) -> Result<&str, VerifyError> {
        self.appid.as_deref().ok_or(VerifyError::NotConfigured("WECHAT_APPID is not set"))
    }

    fn check_timestamp(&self, timestamp: &str) -> Result<(), VerifyError> {
        let Some(window) = self.window_secs else {
            return Ok(());
        };
        let ts: i64 =
            timestamp.parse().map_err(|_| VerifyError::Malformed("timestamp is not a number".into()))?;
        if unix_now().abs_diff(ts) > window {
            return Err(VerifyError::StaleTimestamp);
        }
        Ok(())
    }

    /// The plaintext-mode server signature, then the timestamp's window.
    pub fn verify_server_signature(
        &self,
        signature: &str,
        timestamp: &str,
        nonce: &str,
    ) -> Result<(), VerifyError> {
        let expected = sorted_sha1(&[self.token()?, timestamp, nonce]);
        if !hex_eq(signature, &expected) {
            return Err(VerifyError::BadSignature);
        }
        self.check_timestamp(timestamp)
    }

    /// Safe mode: `msg_signature` over token, timestamp, nonce and `encrypt`,
    /// the timestamp's window, then decryption and the AppID tail.
    pub fn decrypt_message(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<String, VerifyError> {
        let expected = sorted_sha1(&[self.token()?, timestamp, nonce, encrypt]);
        if !hex_eq(msg_signature, &expected) {
            return Err(VerifyError::BadSignature);
        }
        self.check_timestamp(timestamp)?;
        let malformed = |what: &str| VerifyError::Malformed(what.to_string());
        let mut buf = BASE64.decode(encrypt.trim()).map_err(|_| malformed("Encrypt is not base64"))?;
        if buf.is_empty() || buf.len() % PAD_BLOCK != 0 {
            return Err(malformed("ciphertext length is not a multiple of 32"));
        }
        let key = self.aes_key()?;
        let plain = Aes256CbcDec::new(key.into(), key[..16].into())
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| malformed("ciphertext does not decrypt"))?;
        let pad = usize::from(*plain.last().ok_or_else(|| malformed("empty plaintext"))?);
        if pad == 0
            || pad > PAD_BLOCK
            || pad > plain.len()
            || plain[plain.len() - pad..].iter().any(|&b| usize::from(b) != pad)
        {
            return Err(malformed("bad padding"));
        }
        let plain = &plain[..plain.len() - pad];
        if plain.len() < 20 {
            return Err(malformed("plaintext too short"));
        }
        let len = u32::from_be_bytes(plain[16..20].try_into().expect("4 bytes")) as usize;
        let body = plain.get(20..20 + len).ok_or_else(|| malformed("message length beyond plaintext"))?;
        let tail = &plain[20 + len..];
        if tail != self.appid()?.as_bytes() {
            return Err(VerifyError::WrongAppid);
        }
        String::from_utf8(body.to_vec()).map_err(|_| malformed("message is not UTF-8"))
    }

    /// Safe mode: encrypts a message for WeChat (a reply, or the simulator's push) and signs it.
    pub fn encrypt(&self, message: &str, timestamp: &str, nonce: &str) -> Result<Sealed, VerifyError> {
        let random: [u8; 16] = rand::random::<[u8; 16]>()
            .map(|b| b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[usize::from(b) % 62]);
        self.encrypt_with_prefix(message, timestamp, nonce, &random)
    }

    /// Encryption with a chosen 16-byte random prefix (the known-answer vectors fix it).
    pub fn encrypt_with_prefix(
        &self,
        message: &str,
        timestamp: &str,
        nonce: &str,
        random: &[u8; 16],
    ) -> Result<Sealed, VerifyError> {
        let key = self.aes_key()?;
        let appid = self.appid()?;
        let len =
            u32::try_from(message.len()).map_err(|_| VerifyError::Malformed("message too long".into()))?;
        let mut plain = Vec::with_capacity(20 + message.len() + appid.len() + PAD_BLOCK);
        plain.extend_from_slice(random);
        plain.extend_from_slice(&len.to_be_bytes());
        plain.extend_from_slice(message.as_bytes());
        plain.extend_from_slice(appid.as_bytes());
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.extend(std::iter::repeat_n(pad as u8, pad));
        let n = plain.len();
        let cipher = Aes256CbcEnc::new(key.into(), key[..16].into())
            .encrypt_padded_mut::<NoPadding>(&mut plain, n)
            .expect("plaintext is padded to the block size");
        let encrypt = BASE64.encode(cipher);
        let msg_signature = sorted_sha1(&[self.token()?, timestamp, nonce, &encrypt]);
        Ok(Sealed { encrypt, msg_signature, timestamp: timestamp.into(), nonce: nonce.into() })
    }
}

/// WeChat's signature rule: sha1 hex of the concatenation of the sorted strings.
pub fn sorted_sha1(parts: &[&str]) -> String {
    let mut parts = parts.to_vec();
    parts.sort_unstable();
    let mut h = Sha1::new();
    for p in parts {
        h.update(p.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Compares a hex signature as sent (any case) with ours, in constant time.
fn hex_eq(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && given.to_ascii_lowercase().as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::test_support::vectors;
    use serde_json::Value;

    fn s(v: &Value, k: &str) -> String {
        v[k].as_str().unwrap_or_else(|| panic!("vector field {k}")).to_string()
    }

    fn keys_for(v: &Value) -> CallbackKeys {
        let key = v.get("encoding_aes_key").map(|_| SecretString::from(s(v, "encoding_aes_key")));
        CallbackKeys::new(
            Some(s(v, "token").into()),
            key.as_ref(),
            v.get("appid").map(|_| s(v, "appid")),
            None,
        )
        .unwrap()
    }

    #[test]
    fn server_signature_vectors_verify_and_forgeries_do_not() {
        for v in vectors()["server_signature"].as_array().unwrap() {
            let c = keys_for(v);
            let (sig, ts, nonce) = (s(v, "signature"), s(v, "timestamp"), s(v, "nonce"));
            c.verify_server_signature(&sig, &ts, &nonce).unwrap();
            c.verify_server_signature(&sig.to_uppercase(), &ts, &nonce).unwrap();
            let mut forged = sig.clone().into_bytes();
            forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
            let forged = String::from_utf8(forged).unwrap();
            for (sig, ts) in [(forged.as_str(), ts.as_str()), ("", ts.as_str()), (sig.as_str(), "1410685590")]
            {
                assert_eq!(c.verify_server_signature(sig, ts, &nonce), Err(VerifyError::BadSignature));
            }
        }
    }

    #[test]
    fn stale_timestamps_are_refused_even_with_a_valid_signature() {
        let v = &vectors()["server_signature"][0];
        let c = CallbackKeys::new(Some(s(v, "token").into()), None, None, Some(300)).unwrap();
        let err =
            c.verify_server_signature(&s(v, "signature"), &s(v, "timestamp"), &s(v, "nonce")).unwrap_err();
        assert_eq!(err, VerifyError::StaleTimestamp);
        let now = unix_now().to_string();
        let sig = sorted_sha1(&[&s(v, "token"), &now, "n"]);
        c.verify_server_signature(&sig, &now, "n").unwrap();
    }

    #[test]
    fn safe_mode_vectors_decrypt_and_check_their_signature() {
        for v in vectors()["safe_mode"].as_array().unwrap() {
            let c = keys_for(v);
            let plain = c
                .decrypt_message(&s(v, "msg_signature"), &s(v, "timestamp"), &s(v, "nonce"), &s(v, "encrypt"))
                .unwrap();
            assert_eq!(plain, s(v, "plaintext"));
        }
    }

    #[test]
    fn safe_mode_encryption_with_a_fixed_prefix_matches_the_vector() {
        for v in vectors()["safe_mode"].as_array().unwrap().iter().filter(|v| v.get("random16").is_some()) {
            let c = keys_for(v);
            let random: [u8; 16] = s(v, "random16").as_bytes().try_into().unwrap();
            let out = c
                .encrypt_with_prefix(&s(v, "plaintext"), &s(v, "timestamp"), &s(v, "nonce"), &random)
                .unwrap();
            assert_eq!(out.encrypt, s(v, "encrypt"));
            assert_eq!(out.msg_signature, s(v, "msg_signature"));
        }
    }

    #[test]
    fn encrypted_replies_round_trip() {
        let v = &vectors()["safe_mode"][0];
        let c = keys_for(v);
        let reply = "<xml><Content><![CDATA[欢迎 🎉]]></Content></xml>";
        let out = c.encrypt(reply, "1409304348", "abc").unwrap();
        assert_eq!(
            c.decrypt_message(&out.msg_signature, &out.timestamp, &out.nonce, &out.encrypt).unwrap(),
            reply
        );
    }

    #[test]
    fn broken_ciphertexts_and_foreign_appids_are_clean_errors() {
        let v = &vectors()["safe_mode"][0];
        let c = keys_for(v);
        let sign = |enc: &str| sorted_sha1(&[&s(v, "token"), "1", "n", enc]);
        for enc in ["not base64!", "", "AAAA", &BASE64.encode([0u8; 32]), &BASE64.encode([7u8; 48])] {
            let err = c.decrypt_message(&sign(enc), "1", "n", enc).unwrap_err();
            assert!(matches!(err, VerifyError::Malformed(_)), "{enc}: {err:?}");
        }
        let other = CallbackKeys::new(
            Some(s(v, "token").into()),
            Some(&SecretString::from(s(v, "encoding_aes_key"))),
            Some("wx0000000000000000".into()),
            None,
        )
        .unwrap();
        let sealed = other.encrypt("<xml/>", "1", "n").unwrap();
        let err = c.decrypt_message(&sealed.msg_signature, "1", "n", &sealed.encrypt).unwrap_err();
        assert_eq!(err, VerifyError::WrongAppid);
    }

    #[test]
    fn a_bad_encoding_aes_key_is_refused_without_showing_it() {
        for bad in ["short", &"!".repeat(43)] {
            let err = CallbackKeys::new(None, Some(&SecretString::from(bad.to_string())), None, None)
                .err()
                .unwrap();
            assert!(!err.to_string().contains(bad));
        }
    }
}
