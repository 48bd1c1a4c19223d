//! The simulated platform identities: the keys WeChat Pay signs answers and
//! notifies with. In public-key mode one key, named `PUB_KEY_ID_…`; in
//! certificate mode X.509 certificates named by serial, listed by
//! `GET /v3/certificates` sealed under the merchant's APIv3 key. A rotation
//! issues a new certificate that signs from then on, while the old one stays
//! listed (and valid) until it expires, as WeChat Pay rotates.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::pay_config;
use super::v3::{V3Call, v3_error, v3_signed};
use crate::sim::{Sim, now};
use crate::wechat::pay::RsaSigner;
use crate::wechat::pay::certificates::{CertificatesAnswer, SealedCertificate, parse_certificate_pem};
use crate::wechat::pay::random_token;

/// How long a certificate the simulator issues is valid (WeChat Pay's are five years).
pub const CERTIFICATE_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// A key WeChat Pay signs with, and what merchants know it by.
pub struct PlatformIdentity {
    /// `PUB_KEY_ID_…` in public-key mode, the certificate's serial in certificate mode.
    pub id: String,
    pub(super) signer: RsaSigner,
    /// Certificate mode: the certificate (PEM) and when it expires (Unix seconds).
    certificate: Option<(String, i64)>,
}

impl PlatformIdentity {
    pub fn public_key(id: String, signer: RsaSigner) -> PlatformIdentity {
        PlatformIdentity { id, signer, certificate: None }
    }

    /// The identity of a certificate (PEM) whose private key is `signer`'s.
    pub fn certificate(pem: &str, signer: RsaSigner) -> anyhow::Result<PlatformIdentity> {
        let cert = parse_certificate_pem(pem).ok_or_else(|| anyhow::anyhow!("not an X.509 certificate"))?;
        Ok(PlatformIdentity { id: cert.serial, signer, certificate: Some((pem.to_string(), cert.not_after)) })
    }

    pub fn is_certificate(&self) -> bool {
        self.certificate.is_some()
    }
}

/// Every identity WeChat Pay has had for the merchant; the newest signs.
pub struct PlatformIdentities(std::sync::RwLock<Vec<Arc<PlatformIdentity>>>);

impl PlatformIdentities {
    pub fn new(first: PlatformIdentity) -> PlatformIdentities {
        PlatformIdentities(std::sync::RwLock::new(vec![Arc::new(first)]))
    }

    /// The identity answers and notifies are signed with now.
    pub fn signing(&self) -> Arc<PlatformIdentity> {
        self.0.read().expect("identities lock").last().expect("one identity at least").clone()
    }

    fn push(&self, identity: PlatformIdentity) {
        self.0.write().expect("identities lock").push(Arc::new(identity));
    }

    /// The certificates valid now, oldest first.
    fn listed(&self) -> Vec<String> {
        let at = now();
        let all = self.0.read().expect("identities lock");
        all.iter()
            .filter_map(|i| i.certificate.as_ref())
            .filter(|(_, exp)| *exp > at)
            .map(|(pem, _)| pem.clone())
            .collect()
    }
}

/// A new RSA key and a self-signed certificate for it, valid from a minute
/// ago (clock skew) for `valid_for`; returns the key (PKCS#8 PEM) and the
/// certificate (PEM). WeChat Pay's serials are 20 bytes, 40 hex digits.
pub fn issue_certificate(subject: &str, valid_for: Duration) -> anyhow::Result<(String, String)> {
    use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)?;
    let cert = self_signed_certificate(&key, subject, valid_for)?;
    Ok((key.to_pkcs8_pem(LineEnding::LF)?.to_string(), cert))
}

/// A self-signed X.509 certificate (PEM) for `key`.
pub fn self_signed_certificate(
    key: &rsa::RsaPrivateKey,
    subject: &str,
    valid_for: Duration,
) -> anyhow::Result<String> {
    use std::str::FromStr as _;
    use x509_cert::builder::{Builder as _, CertificateBuilder, Profile};
    use x509_cert::der::EncodePem as _;
    use x509_cert::der::asn1::UtcTime;
    use x509_cert::spki::SubjectPublicKeyInfoOwned;
    use x509_cert::time::{Time, Validity};

    let mut serial: [u8; 20] = rand::random();
    // Positive and exactly 20 bytes: no sign byte, no leading zero.
    serial[0] = serial[0].clamp(0x10, 0x7f);
    let from = Duration::from_secs(now().saturating_sub(60) as u64);
    let validity = Validity {
        not_before: Time::UtcTime(UtcTime::from_unix_duration(from)?),
        not_after: Time::UtcTime(UtcTime::from_unix_duration(from + valid_for)?),
    };
    let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key.clone());
    let spki = SubjectPublicKeyInfoOwned::from_key(key.to_public_key())?;
    let builder = CertificateBuilder::new(
        Profile::Root,
        x509_cert::serial_number::SerialNumber::new(&serial)?,
        validity,
        x509_cert::name::Name::from_str(subject)?,
        spki,
        &signer,
    )?;
    let cert = builder.build::<rsa::pkcs1v15::Signature>()?;
    Ok(cert.to_pem(x509_cert::der::pem::LineEnding::LF)?)
}

/// The subject of the certificates the simulator issues for `mchid`.
pub fn subject_for(mchid: &str) -> String {
    format!("CN=WeChat Pay platform (simulated) {mchid},O=wxhost simulator,C=CN")
}

pub(super) fn routes() -> axum::Router<Sim> {
    axum::Router::new()
        .route("/v3/certificates", get(list))
        .route("/sim/pay/certificates/rotate", post(rotate_route))
        .route("/sim/pay/certificates/forge", post(forge_route))
}

/// `GET /v3/certificates`: the valid certificates, each sealed under the APIv3
/// key, signed with the newest.
async fn list(call: V3Call) -> Response {
    let config = call.config();
    let forged = {
        let mut pay = call.sim.pay.lock().expect("sim pay lock");
        pay.certificate_downloads += 1;
        pay.forge_certificates
    };
    if forged {
        return forged_answer();
    }
    let mut data = Vec::new();
    for pem in config.platform.listed() {
        match SealedCertificate::seal(&pem, &config.apiv3_key, &random_token(12)) {
            Ok(sealed) => data.push(sealed),
            Err(e) => return v3_error(StatusCode::INTERNAL_SERVER_ERROR, "SYSTEM_ERROR", &e.to_string()),
        }
    }
    let body = serde_json::to_value(CertificatesAnswer { data }).expect("serialisable");
    v3_signed(config, StatusCode::OK, Some(body))
}

/// What a man in the middle without the APIv3 key could send: a certificate
/// of its own, sealed under a key of its own, its answer signed by it.
fn forged_answer() -> Response {
    let (key_pem, cert_pem) = issue_certificate("CN=not WeChat Pay", CERTIFICATE_LIFETIME).expect("a key");
    let own_key: [u8; 32] = rand::random();
    let sealed = SealedCertificate::seal(&cert_pem, &own_key, &random_token(12)).expect("a certificate");
    let identity = PlatformIdentity::certificate(&cert_pem, RsaSigner::from_pem(&key_pem).expect("a key"))
        .expect("a certificate");
    let body = serde_json::to_value(CertificatesAnswer { data: vec![sealed] }).expect("serialisable");
    super::v3::signed_by(&identity, StatusCode::OK, Some(body))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Rotate {
    /// How long the new certificate is valid (default five years).
    valid_secs: Option<u64>,
}

impl Sim {
    /// Issues a new platform certificate that signs from now on; the old ones
    /// stay listed until they expire. Returns its serial.
    pub fn rotate_platform_certificate(&self, valid_for: Duration) -> anyhow::Result<String> {
        let config =
            pay_config(self).ok_or_else(|| anyhow::anyhow!("the simulator has no WeChat Pay merchant"))?;
        if !config.platform.signing().is_certificate() {
            anyhow::bail!("the merchant is in public-key mode: WeChat Pay rotates no certificates");
        }
        let (key_pem, cert_pem) = issue_certificate(&subject_for(&config.mchid), valid_for)?;
        let identity = PlatformIdentity::certificate(&cert_pem, RsaSigner::from_pem(&key_pem)?)?;
        let serial = identity.id.clone();
        config.platform.push(identity);
        Ok(serial)
    }

    /// How often `GET /v3/certificates` was asked.
    pub fn certificate_downloads(&self) -> u64 {
        self.pay.lock().expect("sim pay lock").certificate_downloads
    }

    /// While set, `GET /v3/certificates` answers what a man in the middle would.
    pub fn forge_certificates(&self, forge: bool) {
        self.pay.lock().expect("sim pay lock").forge_certificates = forge;
    }
}

async fn rotate_route(State(sim): State<Sim>, body: Option<Json<Rotate>>) -> Response {
    let valid =
        body.and_then(|Json(r)| r.valid_secs).map(Duration::from_secs).unwrap_or(CERTIFICATE_LIFETIME);
    match sim.rotate_platform_certificate(valid) {
        Ok(serial) => Json(json!({ "serial_no": serial })).into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Forge {
    forge: bool,
}

async fn forge_route(State(sim): State<Sim>, Json(f): Json<Forge>) -> Response {
    sim.forge_certificates(f.forge);
    StatusCode::NO_CONTENT.into_response()
}
