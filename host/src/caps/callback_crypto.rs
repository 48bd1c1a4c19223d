//! `wxhost:plugin/callback-crypto`: signature checks and safe-mode crypto for
//! what WeChat pushes to the callback URL. Holds WECHAT_TOKEN, WECHAT_AES_KEY
//! and WECHAT_APPID; a plugin asks by operation and never sees them.

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use base64::Engine as _;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as BASE64};
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;
use wasmtime::component::{HasData, Linker};

use crate::bindings::wxhost::plugin::callback_crypto::{self as wit, CryptoError, EncryptedReply};

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

/// The owned context: the callback secrets of this process.
pub struct CallbackCrypto {
    token: Option<SecretString>,
    aes_key: Option<SecretSlice<u8>>,
    appid: Option<String>,
    /// Accepted distance of a callback's timestamp from now; `None` disables the check.
    window_secs: Option<u64>,
}

/// A bad EncodingAESKey setting (never includes the key).
#[derive(Debug, thiserror::Error)]
#[error("WECHAT_AES_KEY must be the 43-character EncodingAESKey from the WeChat console")]
pub struct BadAesKey;

impl CallbackCrypto {
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
        Ok(CallbackCrypto { token, aes_key, appid, window_secs })
    }

    fn token(&self) -> Result<&str, CryptoError> {
        self.token
            .as_ref()
            .map(|t| t.expose_secret())
            .ok_or_else(|| CryptoError::NotConfigured("WECHAT_TOKEN is not set".into()))
    }

    fn aes_key(&self) -> Result<&[u8], CryptoError> {
        self.aes_key
            .as_ref()
            .map(|k| k.expose_secret())
            .ok_or_else(|| CryptoError::NotConfigured("WECHAT_AES_KEY is not set".into()))
    }

    fn appid(&self) -> Result<&str, CryptoError> {
        self.appid.as_deref().ok_or_else(|| CryptoError::NotConfigured("WECHAT_APPID is not set".into()))
    }

    fn check_timestamp(&self, timestamp: &str) -> Result<(), CryptoError> {
        let Some(window) = self.window_secs else {
            return Ok(());
        };
        let ts: i64 =
            timestamp.parse().map_err(|_| CryptoError::Malformed("timestamp is not a number".into()))?;
        if now_unix().abs_diff(ts) > window {
            return Err(CryptoError::StaleTimestamp);
        }
        Ok(())
    }

    pub fn verify_server_signature(
        &self,
        signature: &str,
        timestamp: &str,
        nonce: &str,
    ) -> Result<(), CryptoError> {
        let expected = sorted_sha1(&[self.token()?, timestamp, nonce]);
        if !hex_eq(signature, &expected) {
            return Err(CryptoError::BadSignature);
        }
        self.check_timestamp(timestamp)
    }

    pub fn decrypt_message(
        &self,
        msg_signature: &str,
        timestamp: &str,
        nonce: &str,
        encrypt: &str,
    ) -> Result<String, CryptoError> {
        let expected = sorted_sha1(&[self.token()?, timestamp, nonce, encrypt]);
        if !hex_eq(msg_signature, &expected) {
            return Err(CryptoError::BadSignature);
        }
        self.check_timestamp(timestamp)?;
        let malformed = |what: &str| CryptoError::Malformed(what.to_string());
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
            return Err(CryptoError::WrongAppid);
        }
        String::from_utf8(body.to_vec()).map_err(|_| malformed("message is not UTF-8"))
    }

    pub fn encrypt_reply(
        &self,
        reply: &str,
        timestamp: &str,
        nonce: &str,
    ) -> Result<EncryptedReply, CryptoError> {
        let random: [u8; 16] = rand::random::<[u8; 16]>()
            .map(|b| b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[usize::from(b) % 62]);
        self.encrypt_with_prefix(reply, timestamp, nonce, &random)
    }

    /// Encryption with a chosen 16-byte random prefix (the known-answer vectors fix it).
    pub fn encrypt_with_prefix(
        &self,
        reply: &str,
        timestamp: &str,
        nonce: &str,
        random: &[u8; 16],
    ) -> Result<EncryptedReply, CryptoError> {
        let key = self.aes_key()?;
        let appid = self.appid()?;
        let len = u32::try_from(reply.len()).map_err(|_| CryptoError::Malformed("reply too long".into()))?;
        let mut plain = Vec::with_capacity(20 + reply.len() + appid.len() + PAD_BLOCK);
        plain.extend_from_slice(random);
        plain.extend_from_slice(&len.to_be_bytes());
        plain.extend_from_slice(reply.as_bytes());
        plain.extend_from_slice(appid.as_bytes());
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.extend(std::iter::repeat_n(pad as u8, pad));
        let n = plain.len();
        let cipher = Aes256CbcEnc::new(key.into(), key[..16].into())
            .encrypt_padded_mut::<NoPadding>(&mut plain, n)
            .expect("plaintext is padded to the block size");
        let encrypt = BASE64.encode(cipher);
        let msg_signature = sorted_sha1(&[self.token()?, timestamp, nonce, &encrypt]);
        Ok(EncryptedReply { encrypt, msg_signature, timestamp: timestamp.into(), nonce: nonce.into() })
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

fn hex_eq(given: &str, expected: &str) -> bool {
    given.len() == expected.len() && given.to_ascii_lowercase().as_bytes().ct_eq(expected.as_bytes()).into()
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

pub struct CallbackCryptoView<'a> {
    pub ctx: Option<&'a CallbackCrypto>,
}

impl CallbackCryptoView<'_> {
    fn ctx(&self) -> Result<&CallbackCrypto, CryptoError> {
        self.ctx
            .ok_or_else(|| CryptoError::NotConfigured("callback crypto is not available in this role".into()))
    }
}

struct HasCallbackCrypto;

impl HasData for HasCallbackCrypto {
    type Data<'a> = CallbackCryptoView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> CallbackCryptoView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasCallbackCrypto>(linker, get)
}

impl wit::Host for CallbackCryptoView<'_> {
    fn verify_server_signature(
        &mut self,
        signature: String,
        timestamp: String,
        nonce: String,
    ) -> wasmtime::Result<Result<(), CryptoError>> {
        Ok(self.ctx().and_then(|c| c.verify_server_signature(&signature, &timestamp, &nonce)))
    }

    fn decrypt_message(
        &mut self,
        msg_signature: String,
        timestamp: String,
        nonce: String,
        encrypt: String,
    ) -> wasmtime::Result<Result<String, CryptoError>> {
        Ok(self.ctx().and_then(|c| c.decrypt_message(&msg_signature, &timestamp, &nonce, &encrypt)))
    }

    fn encrypt_reply(
        &mut self,
        reply: String,
        timestamp: String,
        nonce: String,
    ) -> wasmtime::Result<Result<EncryptedReply, CryptoError>> {
        Ok(self.ctx().and_then(|c| c.encrypt_reply(&reply, &timestamp, &nonce)))
    }

    fn verify_pay_notify_v3(
        &mut self,
        _headers: wit::PayNotifyHeaders,
        _body: Vec<u8>,
    ) -> wasmtime::Result<Result<wit::PayNotifyV3, CryptoError>> {
        Ok(Err(CryptoError::NotConfigured(
            "WeChat Pay notify verification is not available in this wxhost version".into(),
        )))
    }

    fn verify_pay_notify_v2(
        &mut self,
        _xml: String,
    ) -> wasmtime::Result<Result<Vec<(String, String)>, CryptoError>> {
        Ok(Err(CryptoError::NotConfigured(
            "WeChat Pay notify verification is not available in this wxhost version".into(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/vectors/wechat.json");
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn s(v: &Value, k: &str) -> String {
        v[k].as_str().unwrap_or_else(|| panic!("vector field {k}")).to_string()
    }

    fn crypto_for(v: &Value) -> CallbackCrypto {
        let key = v.get("encoding_aes_key").map(|_| SecretString::from(s(v, "encoding_aes_key")));
        CallbackCrypto::new(
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
            let c = crypto_for(v);
            let (sig, ts, nonce) = (s(v, "signature"), s(v, "timestamp"), s(v, "nonce"));
            c.verify_server_signature(&sig, &ts, &nonce).unwrap();
            c.verify_server_signature(&sig.to_uppercase(), &ts, &nonce).unwrap();
            let mut forged = sig.clone().into_bytes();
            forged[0] = if forged[0] == b'0' { b'1' } else { b'0' };
            let forged = String::from_utf8(forged).unwrap();
            for (sig, ts) in [(forged.as_str(), ts.as_str()), ("", ts.as_str()), (sig.as_str(), "1410685590")]
            {
                assert!(matches!(c.verify_server_signature(sig, ts, &nonce), Err(CryptoError::BadSignature)));
            }
        }
    }

    #[test]
    fn stale_timestamps_are_refused_even_with_a_valid_signature() {
        let v = &vectors()["server_signature"][0];
        let c = CallbackCrypto::new(Some(s(v, "token").into()), None, None, Some(300)).unwrap();
        let err =
            c.verify_server_signature(&s(v, "signature"), &s(v, "timestamp"), &s(v, "nonce")).unwrap_err();
        assert!(matches!(err, CryptoError::StaleTimestamp));
        let now = now_unix().to_string();
        let sig = sorted_sha1(&[&s(v, "token"), &now, "n"]);
        c.verify_server_signature(&sig, &now, "n").unwrap();
    }

    #[test]
    fn safe_mode_vectors_decrypt_and_check_their_signature() {
        for v in vectors()["safe_mode"].as_array().unwrap() {
            let c = crypto_for(v);
            let plain = c
                .decrypt_message(&s(v, "msg_signature"), &s(v, "timestamp"), &s(v, "nonce"), &s(v, "encrypt"))
                .unwrap();
            assert_eq!(plain, s(v, "plaintext"));
        }
    }

    #[test]
    fn safe_mode_encryption_with_a_fixed_prefix_matches_the_vector() {
        for v in vectors()["safe_mode"].as_array().unwrap().iter().filter(|v| v.get("random16").is_some()) {
            let c = crypto_for(v);
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
        let c = crypto_for(v);
        let reply = "<xml><Content><![CDATA[欢迎 🎉]]></Content></xml>";
        let out = c.encrypt_reply(reply, "1409304348", "abc").unwrap();
        assert_eq!(
            c.decrypt_message(&out.msg_signature, &out.timestamp, &out.nonce, &out.encrypt).unwrap(),
            reply
        );
    }

    #[test]
    fn broken_ciphertexts_and_foreign_appids_are_clean_errors() {
        let v = &vectors()["safe_mode"][0];
        let c = crypto_for(v);
        let sign = |enc: &str| sorted_sha1(&[&s(v, "token"), "1", "n", enc]);
        for enc in ["not base64!", "", "AAAA", &BASE64.encode([0u8; 32]), &BASE64.encode([7u8; 48])] {
            let err = c.decrypt_message(&sign(enc), "1", "n", enc).unwrap_err();
            assert!(matches!(err, CryptoError::Malformed(_)), "{enc}: {err:?}");
        }
        let other = CallbackCrypto::new(
            Some(s(v, "token").into()),
            Some(&SecretString::from(s(v, "encoding_aes_key"))),
            Some("wx0000000000000000".into()),
            None,
        )
        .unwrap();
        let sealed = other.encrypt_reply("<xml/>", "1", "n").unwrap();
        let err = c.decrypt_message(&sealed.msg_signature, "1", "n", &sealed.encrypt).unwrap_err();
        assert!(matches!(err, CryptoError::WrongAppid));
    }
}
