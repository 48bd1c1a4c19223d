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

use crate::bindings::wxhost::plugin::callback_crypto::{
    self as wit, CryptoError, EncryptedReply, PayNotifyHeaders, PayNotifyV3, PushProof,
};
use crate::database::{Database, Pool};
use crate::pay_crypto::{self, SignatureError, V2SignType};

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
    /// Plaintext pushes accepted although an EncodingAESKey is set (a switch of mode).
    accept_plaintext_with_aes_key: bool,
    pay: Option<PayNotifyKeys>,
    /// Plaintext-mode signatures seen, each bound to its body.
    seen: SignatureLedger,
}

/// Plaintext-mode push signatures already accepted, each with a hash of the
/// body it came with: the signature covers token, timestamp and nonce but not
/// the body, so a signed query seen once (a log line, a GET verify URL) could
/// otherwise carry any body until its timestamp goes stale.
pub enum SignatureLedger {
    /// This process's own (the web role has no database).
    Memory(std::sync::Mutex<MemoryLedger>),
    /// Shared by every app process (`callback_signatures`, a host table).
    Database(Database),
}

/// Signatures by body hash, and the order they expire in (timestamps are
/// close to arrival order, so expired ones leave from the front).
#[derive(Default)]
pub struct MemoryLedger {
    bodies: std::collections::HashMap<String, [u8; 32]>,
    expiry: std::collections::VecDeque<(i64, String)>,
}

/// Most signatures one process remembers; past it the oldest go first (the
/// app role's shared ledger still holds them).
const MEMORY_LEDGER_MAX: usize = 200_000;

impl SignatureLedger {
    /// Records `signature` with `body` until `expires_at`; false if it was
    /// already recorded with another body.
    async fn bind(&self, signature: &str, body: &[u8], expires_at: i64) -> Result<bool, CryptoError> {
        let digest: [u8; 32] = sha2::Sha256::digest(body).into();
        let now = now_unix();
        match self {
            SignatureLedger::Memory(ledger) => {
                let mut ledger = ledger.lock().expect("signature ledger lock");
                let MemoryLedger { bodies, expiry } = &mut *ledger;
                while let Some((until, _)) = expiry.front()
                    && (*until < now || expiry.len() > MEMORY_LEDGER_MAX)
                {
                    let (_, gone) = expiry.pop_front().expect("a front entry");
                    bodies.remove(&gone);
                }
                let first = *bodies.entry(signature.to_string()).or_insert_with(|| {
                    expiry.push_back((expires_at, signature.to_string()));
                    digest
                });
                Ok(first == digest)
            }
            SignatureLedger::Database(db) => {
                let unavailable =
                    |e: sqlx::Error| CryptoError::Unavailable(crate::database::redact_db_error(&e));
                let digest = hex::encode(digest);
                let insert = match db.pool {
                    Pool::Sqlite(_) => {
                        "INSERT INTO callback_signatures (signature, body_sha256, expires_at) VALUES (?, ?, ?) \
                         ON CONFLICT (signature) DO NOTHING"
                    }
                    Pool::Mysql(_) => {
                        "INSERT IGNORE INTO callback_signatures (signature, body_sha256, expires_at) VALUES (?, ?, ?)"
                    }
                };
                let turn = db.writer_turn().await.map_err(|e| CryptoError::Unavailable(e.to_string()))?;
                let inserted = crate::on_pool!(&db.pool, |p| sqlx::query(insert)
                    .bind(signature)
                    .bind(&digest)
                    .bind(expires_at)
                    .execute(p)
                    .await
                    .map(|r| r.rows_affected()))
                .map_err(unavailable)?;
                // Now and then (one new signature in 64), expired rows are deleted.
                if inserted == 1 && rand::random::<u8>() < 4 {
                    crate::on_pool!(&db.pool, |p| sqlx::query(
                        "DELETE FROM callback_signatures WHERE expires_at < ?"
                    )
                    .bind(now)
                    .execute(p)
                    .await
                    .map(|_| ()))
                    .map_err(unavailable)?;
                }
                drop(turn);
                let first: String = crate::on_pool!(&db.pool, |p| sqlx::query_scalar(
                    "SELECT body_sha256 FROM callback_signatures WHERE signature = ?"
                )
                .bind(signature)
                .fetch_one(p)
                .await)
                .map_err(unavailable)?;
                Ok(first == digest)
            }
        }
    }
}

pub use crate::pay_crypto::PayNotifyKeys;

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
        Ok(CallbackCrypto {
            token,
            aes_key,
            appid,
            window_secs,
            accept_plaintext_with_aes_key: false,
            pay: None,
            seen: SignatureLedger::Memory(Default::default()),
        })
    }

    /// Accepts plaintext pushes although an EncodingAESKey is set (while the
    /// account switches from plaintext mode).
    pub fn accept_plaintext_with_aes_key(mut self, accept: bool) -> Self {
        self.accept_plaintext_with_aes_key = accept;
        self
    }

    /// Keeps the plaintext-mode signatures in the database, shared by every
    /// process (the app role).
    pub fn with_shared_ledger(mut self, db: Database) -> Self {
        self.seen = SignatureLedger::Database(db);
        self
    }

    /// A push as WeChat sent it (see `verify-push` in wit/crypto.wit): its
    /// message's fields, or why it is refused.
    pub async fn verify_push(&self, proof: &PushProof) -> Result<Vec<(String, String)>, CryptoError> {
        let xml = match &proof.msg_signature {
            Some(msg_signature) => {
                let envelope = push_xml(&proof.body).map_err(CryptoError::Malformed)?;
                let encrypt = envelope
                    .iter()
                    .find(|(k, _)| k == "Encrypt")
                    .map(|(_, v)| v.as_str())
                    .ok_or_else(|| CryptoError::Malformed("safe mode needs an Encrypt field".into()))?;
                self.decrypt_message(msg_signature, &proof.timestamp, &proof.nonce, encrypt)?
            }
            None => {
                self.verify_plaintext_push(&proof.signature, &proof.timestamp, &proof.nonce)?;
                // Kept while the timestamp is accepted (a day when the check is off).
                let window = self.window_secs.unwrap_or(86_400) as i64;
                let expires_at = proof.timestamp.parse::<i64>().unwrap_or_else(|_| now_unix()) + window + 60;
                if !self
                    .seen
                    .bind(&proof.signature.to_ascii_lowercase(), proof.body.as_bytes(), expires_at)
                    .await?
                {
                    return Err(CryptoError::SignatureReused);
                }
                proof.body.clone()
            }
        };
        push_xml(&xml).map_err(CryptoError::Malformed)
    }

    /// Adds WeChat Pay notify verification.
    pub fn with_pay(mut self, keys: PayNotifyKeys) -> Self {
        self.pay = Some(keys);
        self
    }

    fn pay(&self) -> Result<&PayNotifyKeys, CryptoError> {
        self.pay.as_ref().ok_or_else(|| {
            CryptoError::NotConfigured("WECHATPAY_APIV3_KEY and the platform public key are not set".into())
        })
    }

    /// APIv3 notify: signature probe, clock skew, the key `serial` names, the
    /// SHA256-RSA signature over `timestamp\nnonce\nbody\n`, then the resource.
    pub fn verify_pay_notify_v3(
        &self,
        h: &PayNotifyHeaders,
        body: &[u8],
    ) -> Result<PayNotifyV3, CryptoError> {
        let pay = self.pay()?;
        let apiv3_key = pay.apiv3_key.as_ref().ok_or_else(|| {
            CryptoError::NotConfigured("WECHATPAY_APIV3_KEY and the platform public key are not set".into())
        })?;
        let headers = pay_crypto::SignatureHeaders {
            timestamp: h.timestamp.clone(),
            nonce: h.nonce.clone(),
            signature: h.signature.clone(),
            serial: h.serial.clone(),
        };
        pay.platform.verify(&headers, body, now_unix()).map_err(|e| match e {
            SignatureError::Probe => CryptoError::SignatureProbe,
            SignatureError::Stale => CryptoError::StaleTimestamp,
            SignatureError::UnknownKey(id) => CryptoError::UnknownKey(id),
            SignatureError::Bad => CryptoError::BadSignature,
            SignatureError::Malformed(what) => CryptoError::Malformed(what.into()),
        })?;
        let malformed = |what: &str| CryptoError::Malformed(what.to_string());
        let notify: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| malformed("the body is not JSON"))?;
        let resource = &notify["resource"];
        if resource["algorithm"].as_str() != Some("AEAD_AES_256_GCM") {
            return Err(malformed("resource.algorithm must be AEAD_AES_256_GCM"));
        }
        let field =
            |name: &str| resource[name].as_str().ok_or_else(|| malformed(&format!("resource.{name}")));
        let plaintext = pay_crypto::v3_decrypt(
            apiv3_key.expose_secret(),
            field("nonce")?,
            resource["associated_data"].as_str().unwrap_or_default(),
            field("ciphertext")?,
        )
        .map_err(|e| malformed(&e.to_string()))?;
        let resource_json =
            String::from_utf8(plaintext).map_err(|_| malformed("the resource is not UTF-8"))?;
        Ok(PayNotifyV3 {
            event_type: notify["event_type"].as_str().unwrap_or_default().to_string(),
            resource_json,
        })
    }

    /// APIv2 notify: the `sign` over every other received field.
    pub fn verify_pay_notify_v2(&self, xml: &str) -> Result<Vec<(String, String)>, CryptoError> {
        let key = self
            .pay()?
            .apiv2_key
            .as_ref()
            .ok_or_else(|| CryptoError::NotConfigured("WECHATPAY_APIV2_KEY is not set".into()))?;
        let fields = flat_xml(xml).map_err(CryptoError::Malformed)?;
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        let sign = get("sign").ok_or(CryptoError::BadSignature)?;
        let sign_type = V2SignType::parse(get("sign_type"))
            .ok_or_else(|| CryptoError::Malformed("unknown sign_type".into()))?;
        if sign_type != self.pay()?.apiv2_sign_type {
            return Err(CryptoError::BadSignature);
        }
        let expected = pay_crypto::v2_sign(&fields, key.expose_secret(), sign_type);
        if !bool::from(expected.as_bytes().ct_eq(sign.to_ascii_uppercase().as_bytes())) {
            return Err(CryptoError::BadSignature);
        }
        Ok(fields)
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

    /// A plaintext-mode push: its signature covers token, timestamp and nonce
    /// but not the body, so with an EncodingAESKey set (WeChat encrypts every
    /// push) it is refused before anything else.
    fn verify_plaintext_push(
        &self,
        signature: &str,
        timestamp: &str,
        nonce: &str,
    ) -> Result<(), CryptoError> {
        if self.aes_key.is_some() && !self.accept_plaintext_with_aes_key {
            return Err(CryptoError::PlaintextRefused);
        }
        self.verify_server_signature(signature, timestamp, nonce)
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

/// The fields of a flat `<xml>` message (APIv2): nothing nested.
pub fn flat_xml(xml: &str) -> Result<Vec<(String, String)>, String> {
    xml_leaves(xml, 2)
}

/// The fields of a pushed message: the leaf elements, a few events nesting
/// one level deeper (`<xml><ScanCodeInfo><ScanType>` is 3).
pub fn push_xml(xml: &str) -> Result<Vec<(String, String)>, String> {
    xml_leaves(xml, 4)
}

/// Most fields accepted in one message.
const MAX_XML_FIELDS: usize = 100;

/// The leaf elements of one `<xml>` root, in document order, nested at most
/// `max_depth` deep. DOCTYPE and entity declarations are refused outright, so
/// no XXE or entity expansion can happen.
fn xml_leaves(xml: &str, max_depth: usize) -> Result<Vec<(String, String)>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    // Open elements, and whether each has child elements (only leaves are fields).
    let mut open: Vec<(String, bool)> = Vec::new();
    let (mut fields, mut text, mut roots) = (Vec::new(), String::new(), 0);
    let name_of = |e: &quick_xml::events::BytesStart<'_>| e.local_name().into_inner().to_string();
    loop {
        match reader.read_event().map_err(|e| format!("malformed XML: {e}"))? {
            Event::DocType(_) => return Err("DOCTYPE and entity declarations are not accepted".into()),
            Event::Start(e) => {
                if open.is_empty() {
                    roots += 1;
                }
                if open.len() >= max_depth {
                    return Err("XML nested too deeply".into());
                }
                if let Some(parent) = open.last_mut() {
                    parent.1 = true;
                }
                open.push((name_of(&e), false));
                text.clear();
            }
            Event::Empty(e) => {
                if open.is_empty() {
                    roots += 1;
                } else {
                    fields.push((name_of(&e), String::new()));
                }
            }
            Event::End(_) => {
                let (name, has_children) = open.pop().ok_or("unbalanced end tag")?;
                if !open.is_empty() && !has_children {
                    fields.push((name, std::mem::take(&mut text)));
                }
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::CData(c) => text.push_str(&c.xml10_content()),
            Event::GeneralRef(r) => match r.resolve_char_ref() {
                Ok(Some(c)) => text.push(c),
                Ok(None) => text.push_str(match &*r.into_inner() {
                    "lt" => "<",
                    "gt" => ">",
                    "amp" => "&",
                    "apos" => "'",
                    "quot" => "\"",
                    other => return Err(format!("unknown entity &{other};")),
                }),
                Err(e) => return Err(format!("bad character reference: {e}")),
            },
            Event::Eof => break,
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
        }
        if fields.len() > MAX_XML_FIELDS {
            return Err("too many fields".into());
        }
    }
    if roots != 1 || !open.is_empty() {
        return Err("expected exactly one root element".into());
    }
    if fields.is_empty() {
        return Err("expected <xml> with fields".into());
    }
    Ok(fields)
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
    async fn verify_push(
        &mut self,
        proof: PushProof,
    ) -> wasmtime::Result<Result<Vec<(String, String)>, CryptoError>> {
        Ok(match self.ctx() {
            Ok(c) => c.verify_push(&proof).await,
            Err(e) => Err(e),
        })
    }

    async fn verify_server_signature(
        &mut self,
        signature: String,
        timestamp: String,
        nonce: String,
    ) -> wasmtime::Result<Result<(), CryptoError>> {
        Ok(self.ctx().and_then(|c| c.verify_server_signature(&signature, &timestamp, &nonce)))
    }

    async fn decrypt_message(
        &mut self,
        msg_signature: String,
        timestamp: String,
        nonce: String,
        encrypt: String,
    ) -> wasmtime::Result<Result<String, CryptoError>> {
        Ok(self.ctx().and_then(|c| c.decrypt_message(&msg_signature, &timestamp, &nonce, &encrypt)))
    }

    async fn encrypt_reply(
        &mut self,
        reply: String,
        timestamp: String,
        nonce: String,
    ) -> wasmtime::Result<Result<EncryptedReply, CryptoError>> {
        Ok(self.ctx().and_then(|c| c.encrypt_reply(&reply, &timestamp, &nonce)))
    }

    async fn verify_pay_notify_v3(
        &mut self,
        headers: PayNotifyHeaders,
        body: Vec<u8>,
    ) -> wasmtime::Result<Result<PayNotifyV3, CryptoError>> {
        Ok(self.ctx().and_then(|c| c.verify_pay_notify_v3(&headers, &body)))
    }

    async fn verify_pay_notify_v2(
        &mut self,
        xml: String,
    ) -> wasmtime::Result<Result<Vec<(String, String)>, CryptoError>> {
        Ok(self.ctx().and_then(|c| c.verify_pay_notify_v2(&xml)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_memory_ledger_binds_a_plaintext_signature_to_its_first_body_until_it_expires() {
        let ledger = SignatureLedger::Memory(Default::default());
        let now = now_unix();
        assert!(ledger.bind("old", b"x", now - 1).await.unwrap());
        assert!(ledger.bind("s1", b"a", now + 100).await.unwrap());
        assert!(ledger.bind("s1", b"a", now + 100).await.unwrap(), "the same body again: a retry");
        assert!(!ledger.bind("s1", b"b", now + 100).await.unwrap(), "another body: refused");
        assert!(ledger.bind("old", b"y", now + 100).await.unwrap(), "an expired signature is forgotten");
    }

    #[test]
    fn a_push_with_cdata_entities_and_nesting_parses() {
        let f = push_xml(
            "<?xml version=\"1.0\"?><xml><ToUserName><![CDATA[gh_1]]></ToUserName><Content>a &amp; b &#x4f60;</Content>\
             <CreateTime>123</CreateTime><ScanCodeInfo><ScanType><![CDATA[qrcode]]></ScanType></ScanCodeInfo></xml>",
        )
        .unwrap();
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ToUserName"), Some("gh_1"));
        assert_eq!(get("Content"), Some("a & b 你"));
        assert_eq!(get("CreateTime"), Some("123"));
        assert_eq!(get("ScanType"), Some("qrcode"));
        assert!(
            flat_xml("<xml><ScanCodeInfo><ScanType>x</ScanType></ScanCodeInfo></xml>").is_err(),
            "APIv2 is flat"
        );
    }

    #[test]
    fn doctype_entities_and_broken_xml_are_refused() {
        for bad in [
            "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\">]><xml><C>&a;</C></xml>",
            "<!DOCTYPE xml SYSTEM \"file:///etc/passwd\"><xml/>",
            "<xml><C>&xxe;</C></xml>",
            "<xml><C>unclosed</xml>",
            "<xml></xml><xml></xml>",
            "",
            "not xml at all",
            "<a><b><c><d><e>deep</e></d></c></b></a>",
        ] {
            assert!(push_xml(bad).is_err(), "{bad}");
        }
    }
    use serde_json::Value;

    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wechat_vectors.json");
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

    mod pay {
        use super::*;
        use crate::pay_crypto::{
            PlatformKeys, private_key_from_pem, public_key_from_pem, rsa_sign, v2_sign, v3_encrypt,
        };
        use secrecy::SecretBox;

        const APIV3_KEY: &[u8; 32] = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
        const KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";

        fn fixture(f: &str) -> String {
            std::fs::read_to_string(format!("{}/tests/fixtures/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap()
        }

        fn crypto() -> CallbackCrypto {
            let mut platform = PlatformKeys::default();
            platform
                .insert(KEY_ID, public_key_from_pem(&fixture("wechatpay_platform_test_pub.pem")).unwrap());
            CallbackCrypto::new(None, None, None, None).unwrap().with_pay(PayNotifyKeys {
                apiv3_key: Some(SecretBox::new(Box::new(*APIV3_KEY))),
                platform,
                apiv2_key: Some("192006250b4c09247ec02edce69f6a2d".to_string().into()),
                apiv2_sign_type: V2SignType::Md5,
            })
        }

        /// A notify as WeChat Pay sends it: encrypted resource, signed body.
        fn notify(resource: &str, timestamp: i64, signer: &str) -> (PayNotifyHeaders, Vec<u8>) {
            let ciphertext =
                v3_encrypt(APIV3_KEY, "fdasflkja484", "transaction", resource.as_bytes()).unwrap();
            let body = serde_json::json!({
                "id": "EV-2018022511223320873", "create_time": "2015-05-20T13:29:35+08:00",
                "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS", "summary": "支付成功",
                "resource": { "original_type": "transaction", "algorithm": "AEAD_AES_256_GCM",
                              "ciphertext": ciphertext, "associated_data": "transaction", "nonce": "fdasflkja484" }
            })
            .to_string()
            .into_bytes();
            let key = private_key_from_pem(&fixture(signer)).unwrap();
            let nonce = "593BEC0C930BF1AFEB40B4A08C8FB242";
            let mut message = format!("{timestamp}\n{nonce}\n").into_bytes();
            message.extend_from_slice(&body);
            message.push(b'\n');
            let headers = PayNotifyHeaders {
                timestamp: timestamp.to_string(),
                nonce: nonce.into(),
                signature: rsa_sign(&key, &message),
                serial: KEY_ID.into(),
            };
            (headers, body)
        }

        #[test]
        fn a_signed_v3_notify_verifies_and_its_resource_decrypts() {
            let resource = r#"{"out_trade_no":"WX1","trade_state":"SUCCESS","amount":{"total":990}}"#;
            let (h, body) = notify(resource, now_unix(), "wechatpay_platform_test_key.pem");
            let out = crypto().verify_pay_notify_v3(&h, &body).unwrap();
            assert_eq!(
                (out.event_type.as_str(), out.resource_json.as_str()),
                ("TRANSACTION.SUCCESS", resource)
            );
        }

        #[test]
        fn forged_stale_probing_and_unknown_key_notifies_are_refused() {
            let c = crypto();
            let (h, body) = notify("{}", now_unix(), "merchant_test_key.pem");
            assert!(matches!(c.verify_pay_notify_v3(&h, &body), Err(CryptoError::BadSignature)));

            let (h, mut body) = notify("{}", now_unix(), "wechatpay_platform_test_key.pem");
            body[5] ^= 1;
            assert!(matches!(c.verify_pay_notify_v3(&h, &body), Err(CryptoError::BadSignature)));

            let (h, body) = notify("{}", now_unix() - 300, "wechatpay_platform_test_key.pem");
            assert!(matches!(c.verify_pay_notify_v3(&h, &body), Err(CryptoError::StaleTimestamp)));
            let (h, body) = notify("{}", now_unix() + 400, "wechatpay_platform_test_key.pem");
            assert!(matches!(c.verify_pay_notify_v3(&h, &body), Err(CryptoError::StaleTimestamp)));

            let (mut h, body) = notify("{}", now_unix(), "wechatpay_platform_test_key.pem");
            h.signature = format!("WECHATPAY/SIGNTEST/{}", h.signature);
            assert!(matches!(c.verify_pay_notify_v3(&h, &body), Err(CryptoError::SignatureProbe)));

            let (mut h, body) = notify("{}", now_unix(), "wechatpay_platform_test_key.pem");
            h.serial = "PUB_KEY_ID_SOMEONE_ELSE".into();
            assert!(matches!(c.verify_pay_notify_v3(&h, &body), Err(CryptoError::UnknownKey(_))));

            let unconfigured = CallbackCrypto::new(None, None, None, None).unwrap();
            assert!(matches!(
                unconfigured.verify_pay_notify_v3(&h, &body),
                Err(CryptoError::NotConfigured(_))
            ));
        }

        #[test]
        fn v2_notifies_verify_over_every_received_field() {
            let key = "192006250b4c09247ec02edce69f6a2d";
            let mut fields: Vec<(String, String)> = [
                ("appid", "wxd930ea5d5a258f4f"),
                ("mch_id", "10000100"),
                ("nonce_str", "ibuaiVcKdpRxkhJA"),
                ("out_trade_no", "WX1"),
                ("result_code", "SUCCESS"),
                ("return_code", "SUCCESS"),
                ("total_fee", "990"),
                ("transaction_id", "4200000001"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let sign = v2_sign(&fields, key, V2SignType::Md5);
            fields.push(("sign".into(), sign));
            let xml = |fields: &[(String, String)]| {
                let inner: String =
                    fields.iter().map(|(k, v)| format!("<{k}><![CDATA[{v}]]></{k}>")).collect();
                format!("<xml>{inner}</xml>")
            };
            let c = crypto();
            let got = c.verify_pay_notify_v2(&xml(&fields)).unwrap();
            assert!(got.contains(&("total_fee".to_string(), "990".to_string())));

            let mut tampered = fields.clone();
            tampered[6].1 = "1".into();
            assert!(matches!(c.verify_pay_notify_v2(&xml(&tampered)), Err(CryptoError::BadSignature)));
            let mut extra = fields.clone();
            extra.insert(0, ("attach".into(), "x".into()));
            assert!(matches!(c.verify_pay_notify_v2(&xml(&extra)), Err(CryptoError::BadSignature)));
            // Correctly signed, but with another sign type than the merchant's.
            let mut other: Vec<(String, String)> = fields[..fields.len() - 1].to_vec();
            other.push(("sign_type".into(), "HMAC-SHA256".into()));
            let sign = v2_sign(&other, key, V2SignType::HmacSha256);
            other.push(("sign".into(), sign));
            assert!(matches!(c.verify_pay_notify_v2(&xml(&other)), Err(CryptoError::BadSignature)));
            let unsigned: Vec<_> = fields.iter().filter(|(k, _)| k != "sign").cloned().collect();
            assert!(matches!(c.verify_pay_notify_v2(&xml(&unsigned)), Err(CryptoError::BadSignature)));
            for bad in ["<xml><a>1</xml>", "<!DOCTYPE x [<!ENTITY e \"e\">]><xml><a>&e;</a></xml>", "nope"] {
                assert!(matches!(c.verify_pay_notify_v2(bad), Err(CryptoError::Malformed(_))), "{bad}");
            }
        }
    }
}
