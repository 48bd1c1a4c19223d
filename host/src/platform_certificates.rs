//! WeChat Pay's platform certificates kept fresh, for merchants still on
//! certificates (WECHATPAY_PLATFORM_PUBLIC_KEY holds a CERTIFICATE).
//!
//! The app role downloads `GET /v3/certificates` (merchant-signed; the answer
//! checked by [`accept_answer`]) twelve-hourly, hourly once the newest
//! certificate is within 30 days of expiry, and at once when a signature names
//! a serial nobody holds. The certificates go into the database sealed as they
//! came, so every app process shares them and a row that does not open under
//! the APIv3 key is never trusted. The web role has no database: it asks the
//! app role's internal API for the same sealed list and opens it itself.
//!
//! Every process checks with the configured keys plus the downloaded
//! certificates valid now, so old and new both verify during a rotation and an
//! expired certificate stops verifying on its own.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use secrecy::{ExposeSecret as _, SecretBox};
use tokio_util::sync::CancellationToken;

use crate::caps::internal_call::InternalClient;
use crate::caps::wechat_pay::WechatPay;
use crate::database::{Database, on_pool};
use crate::settings::Settings;
use crate::wechat::pay::certificates::{SealedCertificate, accept_answer};
use crate::wechat::pay::{LiveKeys, PlatformKeys};
use crate::wechat::unix_now;

/// The app role's route the web role reads the certificates from.
pub const INTERNAL_PATH: &str = "/api/v1/internal/pay/platform-certificates";
/// How often WeChat Pay is asked while the newest certificate is far from expiry.
pub const REFRESH_EVERY: Duration = Duration::from_secs(12 * 3600);
/// How often once the newest certificate expires within [`RENEW_AHEAD_SECS`].
pub const REFRESH_NEAR_EXPIRY: Duration = Duration::from_secs(3600);
pub const RENEW_AHEAD_SECS: i64 = 30 * 24 * 3600;
/// How often a process re-reads what the others downloaded.
pub const RELOAD_EVERY: Duration = Duration::from_secs(300);
/// Least time between two downloads woken by unknown serials (a forged
/// notify can name any serial; it must not make the host hammer WeChat Pay).
pub const UNKNOWN_SERIAL_COOLDOWN: Duration = Duration::from_secs(60);
/// Least time between two asks of the web role woken by unknown serials.
pub const WEB_ASK_GAP: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A process's platform certificates: the configured keys, the downloaded
/// certificates (sealed), and the live keys every check reads.
pub struct CertificateKeeper {
    live: LiveKeys,
    configured: PlatformKeys,
    apiv3_key: SecretBox<[u8; 32]>,
    held: Mutex<Vec<SealedCertificate>>,
    /// Counts finished refreshes, so a caller can wait for the next one.
    refreshed: tokio::sync::watch::Sender<u64>,
    /// Asks the refresher for a download now (the web role wants a serial).
    wanted: tokio::sync::Notify,
}

impl CertificateKeeper {
    /// In certificate mode (the configured keys hold a certificate and the
    /// APIv3 key is set); `None` in public-key mode.
    pub fn for_settings(settings: &Settings, live: &LiveKeys) -> anyhow::Result<Option<CertificateKeeper>> {
        let configured = live.current();
        let Some(apiv3_key) = settings.apiv3_key()? else { return Ok(None) };
        if !configured.has_certificate() {
            return Ok(None);
        }
        Ok(Some(CertificateKeeper::new(live.clone(), (*configured).clone(), apiv3_key)))
    }

    pub fn new(
        live: LiveKeys,
        configured: PlatformKeys,
        apiv3_key: SecretBox<[u8; 32]>,
    ) -> CertificateKeeper {
        live.renewed_elsewhere();
        CertificateKeeper {
            live,
            configured,
            apiv3_key,
            held: Mutex::default(),
            refreshed: tokio::sync::watch::Sender::new(0),
            wanted: tokio::sync::Notify::new(),
        }
    }

    /// Opens `sealed` and makes the live keys the configured ones plus every
    /// certificate that opened and is valid at `now`; keeps the unexpired ones
    /// to hand on. A certificate that does not open is dropped, loudly.
    /// Returns the serials in use.
    pub fn install(&self, sealed: Vec<SealedCertificate>, now: i64) -> Vec<String> {
        let mut keys = PlatformKeys::default();
        let mut kept = Vec::new();
        let mut in_use = Vec::new();
        for s in sealed {
            match s.open(self.apiv3_key.expose_secret()) {
                Ok(cert) if cert.not_after <= now => {}
                Ok(cert) => {
                    if cert.is_valid_at(now) {
                        keys.insert_certificate(&cert);
                        in_use.push(cert.serial.clone());
                    }
                    kept.push(s);
                }
                Err(e) => tracing::warn!("a platform certificate was refused: {e}"),
            }
        }
        self.live.replace(self.configured.joined(&keys));
        *self.held.lock().expect("certificate lock") = kept;
        in_use
    }

    /// The unexpired downloaded certificates, sealed.
    pub fn held(&self) -> Vec<SealedCertificate> {
        self.held.lock().expect("certificate lock").clone()
    }

    pub fn holds(&self, serial: &str) -> bool {
        self.live.current().get(serial).is_some()
    }

    /// The newest expiry among the downloaded certificates.
    fn newest_expiry(&self) -> Option<i64> {
        let key = self.apiv3_key.expose_secret();
        self.held().iter().filter_map(|s| s.open(key).ok()).map(|c| c.not_after).max()
    }

    fn refresh_interval(&self, now: i64) -> Duration {
        match self.newest_expiry() {
            Some(at) if at - now > RENEW_AHEAD_SECS => REFRESH_EVERY,
            _ => REFRESH_NEAR_EXPIRY,
        }
    }

    fn mark_refreshed(&self) {
        self.refreshed.send_modify(|n| *n += 1);
    }

    /// Asks for a download and waits (at most `wait`) for the refresh after it.
    pub async fn refresh_now(&self, wait: Duration) {
        let mut refreshed = self.refreshed.subscribe();
        refreshed.mark_unchanged();
        self.wanted.notify_one();
        let _ = tokio::time::timeout(wait, refreshed.changed()).await;
    }

    /// Downloads from WeChat Pay, checks, stores and installs; returns the serials in use.
    pub async fn download(&self, pay: &WechatPay, db: &Database) -> anyhow::Result<Vec<String>> {
        let (headers, body) = pay
            .certificates_answer(Instant::now() + CALL_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("GET /v3/certificates: {e:?}"))?;
        let now = unix_now();
        let accepted =
            accept_answer(&self.live.current(), &headers, &body, self.apiv3_key.expose_secret(), now)?;
        store(db, accepted.iter().map(|(sealed, _)| sealed), now).await?;
        let (rows, _) = load(db).await?;
        Ok(self.install(rows, now))
    }
}

/// Upserts downloaded certificates. The row takes the envelope just
/// accepted (opened with today's APIv3 key, its answer's signature checked),
/// so a row sealed under an earlier key, or broken, is mended by the next
/// download rather than kept for ever.
pub async fn store(
    db: &Database,
    sealed: impl Iterator<Item = &SealedCertificate>,
    now: i64,
) -> anyhow::Result<()> {
    let upsert = match db.dialect() {
        crate::database::Dialect::Sqlite => {
            "INSERT INTO platform_certificates (serial_no, effective_time, expire_time, sealed, first_seen_at, fetched_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(serial_no) DO UPDATE SET effective_time = excluded.effective_time, \
             expire_time = excluded.expire_time, sealed = excluded.sealed, fetched_at = excluded.fetched_at"
        }
        crate::database::Dialect::Mysql => {
            "INSERT INTO platform_certificates (serial_no, effective_time, expire_time, sealed, first_seen_at, fetched_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON DUPLICATE KEY UPDATE effective_time = VALUES(effective_time), \
             expire_time = VALUES(expire_time), sealed = VALUES(sealed), fetched_at = VALUES(fetched_at)"
        }
    };
    let _turn = db.writer_turn().await?;
    for s in sealed {
        let envelope = serde_json::to_string(&s.encrypt_certificate)?;
        on_pool!(&db.pool, |p| sqlx::query(upsert)
            .bind(s.serial_no.to_ascii_uppercase())
            .bind(&s.effective_time)
            .bind(&s.expire_time)
            .bind(&envelope)
            .bind(now)
            .bind(now)
            .execute(p)
            .await
            .map(drop))
        .context("storing a platform certificate")?;
    }
    Ok(())
}

/// Every stored certificate, and when any process last downloaded.
pub async fn load(db: &Database) -> anyhow::Result<(Vec<SealedCertificate>, Option<i64>)> {
    let sql = "SELECT serial_no, effective_time, expire_time, sealed, fetched_at FROM platform_certificates";
    let rows: Vec<(String, String, String, String, i64)> =
        on_pool!(&db.pool, |p| sqlx::query_as(sql).fetch_all(p).await)
            .context("reading platform certificates")?;
    let last = rows.iter().map(|r| r.4).max();
    let mut sealed = Vec::new();
    for (serial_no, effective_time, expire_time, envelope, _) in rows {
        match serde_json::from_str(&envelope) {
            Ok(encrypt_certificate) => {
                sealed.push(SealedCertificate { serial_no, effective_time, expire_time, encrypt_certificate })
            }
            Err(_) => tracing::warn!(serial_no, "a stored platform certificate is not an envelope: ignored"),
        }
    }
    Ok((sealed, last))
}

/// Installs the stored certificates (a process starting, before it serves).
pub async fn install_stored(keeper: &CertificateKeeper, db: &Database) {
    match load(db).await {
        Ok((rows, _)) => {
            keeper.install(rows, unix_now());
        }
        Err(e) => tracing::warn!("platform certificates not read: {e:#}"),
    }
}

/// The app role's refresher: re-reads the shared rows, downloads when due
/// or asked, until `shutdown`.
pub async fn keep_fresh_from_wechat_pay(
    keeper: Arc<CertificateKeeper>,
    db: Database,
    pay: Arc<WechatPay>,
    shutdown: CancellationToken,
) {
    let mut asked = false;
    let mut last_asked_download: Option<Instant> = None;
    loop {
        let now = unix_now();
        match load(&db).await {
            Ok((rows, last_fetched)) => {
                keeper.install(rows, now);
                let interval = keeper.refresh_interval(now).as_secs() as i64;
                let due = last_fetched.is_none_or(|at| now - at >= interval);
                let may_ask = last_asked_download.is_none_or(|at| at.elapsed() >= UNKNOWN_SERIAL_COOLDOWN);
                if due || (asked && may_ask) {
                    if asked {
                        last_asked_download = Some(Instant::now());
                    }
                    match keeper.download(&pay, &db).await {
                        Ok(serials) => tracing::info!(?serials, "platform certificates downloaded"),
                        Err(e) => tracing::warn!("platform certificates not renewed: {e:#}"),
                    }
                }
            }
            Err(e) => tracing::warn!("platform certificates not re-read: {e:#}"),
        }
        keeper.mark_refreshed();
        asked = tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => false,
            _ = keeper.live.unknown_key_seen() => true,
            _ = keeper.wanted.notified() => true,
            _ = shutdown.cancelled() => return,
        };
    }
}

/// The web role's refresher: reads the app role's list now and then, and
/// (at most every [`WEB_ASK_GAP`]) when a notify names a serial it lacks, then
/// asking the app role to download first.
pub async fn keep_fresh_from_app_role(
    keeper: Arc<CertificateKeeper>,
    app: Arc<InternalClient>,
    shutdown: CancellationToken,
) {
    let mut woken = false;
    loop {
        let path = if woken { format!("{INTERNAL_PATH}?refresh=1") } else { INTERNAL_PATH.to_string() };
        let request_id = format!("{:032x}", rand::random::<u128>());
        match app.call("GET", &path, Vec::new(), &request_id, CALL_TIMEOUT).await {
            Ok(r) if r.status == 200 => match serde_json::from_slice::<HandedOn>(&r.body) {
                Ok(list) => {
                    keeper.install(list.certificates, unix_now());
                }
                Err(_) => tracing::warn!("the app role's platform certificates are not a list"),
            },
            Ok(r) => tracing::warn!(status = r.status, "the app role did not hand on platform certificates"),
            Err(e) => tracing::warn!("platform certificates not read from the app role: {e:?}"),
        }
        keeper.mark_refreshed();
        woken = tokio::select! {
            _ = tokio::time::sleep(RELOAD_EVERY) => false,
            _ = keeper.live.unknown_key_seen() => true,
            _ = shutdown.cancelled() => return,
        };
        if woken {
            // A burst of notifies under a new serial asks once.
            tokio::time::sleep(WEB_ASK_GAP).await;
        }
    }
}

/// What the app role hands the web role.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct HandedOn {
    pub certificates: Vec<SealedCertificate>,
}

/// Starts the refresher this process's roles can run; says why when none can.
pub fn spawn_refresher(
    keeper: Arc<CertificateKeeper>,
    db: Option<Database>,
    pay: Option<Arc<WechatPay>>,
    app: Option<Arc<InternalClient>>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: CancellationToken,
) {
    match (db, pay, app) {
        (Some(db), Some(pay), _) => {
            tasks.spawn(keep_fresh_from_wechat_pay(keeper, db, pay, shutdown));
        }
        (None, _, Some(app)) => {
            tasks.spawn(keep_fresh_from_app_role(keeper, app, shutdown));
        }
        _ => tracing::warn!(
            "platform certificates will not be renewed: the app role needs WECHATPAY_MCHID and its keys, \
             the web role APP_INTERNAL_URL and INTERNAL_SECRET"
        ),
    }
}
