//! `wxhost:plugin/callback-crypto`: the checks of what WeChat and WeChat Pay
//! send to the callback URLs, lent to plugins by operation. The protocol is
//! in [`crate::wechat`]; this adapter holds the secrets (WECHAT_TOKEN,
//! WECHAT_AES_KEY, WECHAT_APPID, the APIv3 key, the platform keys), the
//! ledger of plaintext-mode signatures, and maps errors to WIT.

use futures::future::BoxFuture;

use super::{CapabilitySpec, Context, PluginState, ServiceInputs};
use crate::role::Role;
use sha2::Digest as _;
use wasmtime::component::{HasData, Linker};

use crate::bindings::CapabilityError;
use crate::bindings::wxhost::plugin::callback_crypto::{
    self as wit, CryptoError, EncryptedReply, PayNotifyHeaders, PayNotifyV3, PushProof,
};
use crate::database::{Database, Pool};
use crate::wechat::pay::{PayNotifyKeys, SignatureHeaders};
use crate::wechat::xml::push_xml;
use crate::wechat::{CallbackKeys, VerifyError, unix_now};

pub use crate::wechat::callback::BadAesKey;

/// A capability call's error: a [`CryptoError`] for the plugin, or a trap.
pub type CryptoFailure = CapabilityError<CryptoError>;

/// The owned context: the callback secrets of this process.
pub struct CallbackCrypto {
    keys: CallbackKeys,
    /// Plaintext pushes accepted although an EncodingAESKey is set (a switch of mode).
    accept_plaintext_with_aes_key: bool,
    pay: Option<PayNotifyKeys>,
    /// Plaintext-mode signatures seen, each bound to its body.
    seen: SignatureLedger,
}

impl From<VerifyError> for CryptoError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::BadSignature => CryptoError::BadSignature,
            VerifyError::StaleTimestamp => CryptoError::StaleTimestamp,
            VerifyError::Malformed(what) => CryptoError::Malformed(what),
            VerifyError::WrongAppid => CryptoError::WrongAppid,
            VerifyError::SignatureProbe => CryptoError::SignatureProbe,
            VerifyError::UnknownKey(id) => CryptoError::UnknownKey(id),
            VerifyError::NotConfigured(what) => CryptoError::NotConfigured(what.into()),
        }
    }
}

impl From<VerifyError> for CryptoFailure {
    fn from(e: VerifyError) -> Self {
        CryptoError::from(e).into()
    }
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
        let now = unix_now();
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

impl CallbackCrypto {
    pub fn new(
        token: Option<secrecy::SecretString>,
        encoding_aes_key: Option<&secrecy::SecretString>,
        appid: Option<String>,
        window_secs: Option<u64>,
    ) -> Result<Self, BadAesKey> {
        Ok(CallbackCrypto {
            keys: CallbackKeys::new(token, encoding_aes_key, appid, window_secs)?,
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

    /// Adds WeChat Pay notify verification.
    pub fn with_pay(mut self, keys: PayNotifyKeys) -> Self {
        self.pay = Some(keys);
        self
    }

    /// The protocol keys (the simulator and tests seal messages with them).
    pub fn keys(&self) -> &CallbackKeys {
        &self.keys
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
                self.keys.decrypt_message(msg_signature, &proof.timestamp, &proof.nonce, encrypt)?
            }
            None => {
                // Its signature covers token, timestamp and nonce but not the
                // body, so with an EncodingAESKey set (WeChat encrypts every
                // push) it is refused before anything else.
                if self.keys.has_aes_key() && !self.accept_plaintext_with_aes_key {
                    return Err(CryptoError::PlaintextRefused);
                }
                self.keys.verify_server_signature(&proof.signature, &proof.timestamp, &proof.nonce)?;
                // Kept while the timestamp is accepted (a day when the check is off).
                let window = self.keys.window_secs().unwrap_or(86_400) as i64;
                let expires_at = proof.timestamp.parse::<i64>().unwrap_or_else(|_| unix_now()) + window + 60;
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

    fn pay(&self) -> Result<&PayNotifyKeys, VerifyError> {
        self.pay
            .as_ref()
            .ok_or(VerifyError::NotConfigured("WECHATPAY_APIV3_KEY and the platform public key are not set"))
    }

    pub fn verify_pay_notify_v3(
        &self,
        h: &PayNotifyHeaders,
        body: &[u8],
    ) -> Result<PayNotifyV3, VerifyError> {
        let headers = SignatureHeaders {
            timestamp: h.timestamp.clone(),
            nonce: h.nonce.clone(),
            signature: h.signature.clone(),
            serial: h.serial.clone(),
        };
        let notify = self.pay()?.verify_v3(&headers, body, unix_now())?;
        Ok(PayNotifyV3 { event_type: notify.event_type, resource_json: notify.resource_json })
    }

    pub fn verify_pay_notify_v2(&self, xml: &str) -> Result<Vec<(String, String)>, VerifyError> {
        self.pay()?.verify_v2(xml)
    }

    pub fn open_refund_notify_v2(&self, xml: &str) -> Result<Vec<(String, String)>, VerifyError> {
        self.pay()?.open_refund_v2(xml)
    }
}

/// Both roles: the web role checks at the edge, the app role again before it
/// changes anything (it never takes the web role's word).
pub const SPEC: CapabilitySpec =
    CapabilitySpec { name: "callback-crypto", roles: &[Role::Web, Role::App], open, link };

fn open<'a>(inputs: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async move {
        let s = inputs.settings;
        if s.wechat_token.is_none() {
            tracing::warn!(
                "WECHAT_TOKEN is not set: WeChat's pushes and server verification will be refused"
            );
        }
        let crypto = CallbackCrypto::new(
            s.wechat_token.clone(),
            s.wechat_aes_key.as_ref(),
            s.wechat_appid.clone(),
            inputs.timestamp_window_secs,
        )?
        .accept_plaintext_with_aes_key(inputs.accept_plaintext_with_aes_key);
        let crypto = match s.pay_notify_keys(inputs.platform_keys.as_ref())? {
            Some(keys) => crypto.with_pay(keys),
            None => crypto,
        };
        let crypto = match inputs.database {
            Some(db) => crypto.with_shared_ledger(db.clone()),
            None => crypto,
        };
        Ok(Some(Box::new(crypto) as Context))
    })
}

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| CallbackCryptoView { ctx: s.services.get() })
}

/// The borrowed view: the role's context, if it has one.
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
    fn convert_crypto_error(&mut self, err: CryptoFailure) -> wasmtime::Result<CryptoError> {
        err.downcast()
    }

    async fn verify_push(&mut self, proof: PushProof) -> Result<Vec<(String, String)>, CryptoFailure> {
        Ok(self.ctx()?.verify_push(&proof).await?)
    }

    async fn verify_server_signature(
        &mut self,
        signature: String,
        timestamp: String,
        nonce: String,
    ) -> Result<(), CryptoFailure> {
        Ok(self.ctx()?.keys.verify_server_signature(&signature, &timestamp, &nonce)?)
    }

    async fn decrypt_message(
        &mut self,
        msg_signature: String,
        timestamp: String,
        nonce: String,
        encrypt: String,
    ) -> Result<String, CryptoFailure> {
        Ok(self.ctx()?.keys.decrypt_message(&msg_signature, &timestamp, &nonce, &encrypt)?)
    }

    async fn encrypt_reply(
        &mut self,
        reply: String,
        timestamp: String,
        nonce: String,
    ) -> Result<EncryptedReply, CryptoFailure> {
        let sealed = self.ctx()?.keys.encrypt(&reply, &timestamp, &nonce)?;
        Ok(EncryptedReply {
            encrypt: sealed.encrypt,
            msg_signature: sealed.msg_signature,
            timestamp: sealed.timestamp,
            nonce: sealed.nonce,
        })
    }

    async fn verify_pay_notify_v3(
        &mut self,
        headers: PayNotifyHeaders,
        body: Vec<u8>,
    ) -> Result<PayNotifyV3, CryptoFailure> {
        Ok(self.ctx()?.verify_pay_notify_v3(&headers, &body)?)
    }

    async fn verify_pay_notify_v2(&mut self, xml: String) -> Result<Vec<(String, String)>, CryptoFailure> {
        Ok(self.ctx()?.verify_pay_notify_v2(&xml)?)
    }

    async fn open_refund_notify_v2(&mut self, xml: String) -> Result<Vec<(String, String)>, CryptoFailure> {
        Ok(self.ctx()?.open_refund_notify_v2(&xml)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_memory_ledger_binds_a_plaintext_signature_to_its_first_body_until_it_expires() {
        let ledger = SignatureLedger::Memory(Default::default());
        let now = unix_now();
        assert!(ledger.bind("old", b"x", now - 1).await.unwrap());
        assert!(ledger.bind("s1", b"a", now + 100).await.unwrap());
        assert!(ledger.bind("s1", b"a", now + 100).await.unwrap(), "the same body again: a retry");
        assert!(!ledger.bind("s1", b"b", now + 100).await.unwrap(), "another body: refused");
        assert!(ledger.bind("old", b"y", now + 100).await.unwrap(), "an expired signature is forgotten");
    }

    #[tokio::test]
    async fn a_plaintext_push_is_refused_while_an_encoding_aes_key_is_set() {
        let key = secrecy::SecretString::from("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG".to_string());
        let crypto =
            CallbackCrypto::new(Some("t".to_string().into()), Some(&key), Some("wx1".into()), None).unwrap();
        let ts = unix_now().to_string();
        let proof = PushProof {
            signature: crate::wechat::sorted_sha1(&["t", &ts, "n"]),
            timestamp: ts,
            nonce: "n".into(),
            msg_signature: None,
            body: "<xml><A>1</A></xml>".into(),
        };
        assert!(matches!(crypto.verify_push(&proof).await, Err(CryptoError::PlaintextRefused)));
        let switching =
            CallbackCrypto::new(Some("t".to_string().into()), Some(&key), Some("wx1".into()), None)
                .unwrap()
                .accept_plaintext_with_aes_key(true);
        assert_eq!(switching.verify_push(&proof).await.unwrap(), vec![("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn every_protocol_refusal_reaches_the_plugin_under_its_wit_name() {
        assert!(matches!(CryptoError::from(VerifyError::SignatureProbe), CryptoError::SignatureProbe));
        assert!(matches!(
            CryptoError::from(VerifyError::NotConfigured("WECHAT_TOKEN is not set")),
            CryptoError::NotConfigured(m) if m == "WECHAT_TOKEN is not set"
        ));
        let failure: CryptoFailure = VerifyError::WrongAppid.into();
        assert!(matches!(failure.downcast(), Ok(CryptoError::WrongAppid)));
    }
}
