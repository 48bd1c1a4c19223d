//! Row 3d: where one push's time goes, one push at a time (no queueing, so
//! the parts add up): the whole push over HTTP (web role, its plugin, the
//! signed internal call, the app role, its plugin, the transaction), the app
//! role's internal call alone (sent the way the web role sends it), a request
//! to the app role's `/healthz` (the client's and loopback's own share), the same
//! transaction natively through sqlx on the same database with the host's
//! connection options, and that transaction with its commit not flushed to
//! disk. The differences are the web role with the hop between the roles,
//! the app role's host and plugin, the database, and the commit's fsync.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use sqlx::Executor;
use wxhost::internal_auth::{InternalAuth, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use wxhost::wechat::sorted_sha1;

use crate::load::{LoadGen, Outcome, Source};
use crate::product::{INTERNAL_SECRET, Kind, TOKEN};
use crate::traffic::{push_openid, push_source, subscribe_xml, unix_now};

const USER_UPDATE: &str = "/api/v1/internal/user/create-or-update";

/// Mean times of one push and of its parts, one at a time.
pub struct PushParts {
    pub whole: Duration,
    pub app_call: Duration,
    /// `GET /healthz` on the app role: what any request costs the client,
    /// loopback and hyper, counted once in the internal call.
    pub empty_call: Duration,
    pub transaction: Duration,
    pub unflushed: Duration,
    /// Requests of the two HTTP phases that failed (counted as pushes).
    pub failed: u64,
}

impl PushParts {
    /// The table's value: the five means.
    pub fn value(&self) -> String {
        let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
        format!(
            "{} / {} / {} / {} / {} ms",
            ms(self.whole),
            ms(self.app_call),
            ms(self.empty_call),
            ms(self.transaction),
            ms(self.unflushed)
        )
    }

    /// The table's check column: the parts, and the fsync's share of a push.
    pub fn parts(&self) -> String {
        let ms = |d: f64| format!("{:.2}", d * 1e3);
        let (whole, app, empty, tx, unflushed) = (
            self.whole.as_secs_f64(),
            self.app_call.as_secs_f64(),
            self.empty_call.as_secs_f64(),
            self.transaction.as_secs_f64(),
            self.unflushed.as_secs_f64(),
        );
        let fsync = (tx - unflushed).max(0.0);
        format!(
            "client and loopback {} ms, web role and the hop {} ms, app role's host and plugin {} ms, database {} ms of which the commit's fsync {} ms ({:.0}% of a push)",
            ms(empty),
            ms(whole - app),
            ms(app - tx - empty),
            ms(tx),
            ms(fsync),
            fsync / whole * 100.0
        )
    }
}

/// Measures each part for `duration`, against `product`'s roles and its
/// database at `url`; `pushes` numbers the users (shared with the other push
/// rows, so no event repeats).
pub async fn measure(
    generator: &LoadGen,
    kind: Kind,
    url: &str,
    web_url: &str,
    app_url: &str,
    pushes: Arc<AtomicU64>,
    duration: Duration,
) -> anyhow::Result<PushParts> {
    let whole = generator.closed(push_source(web_url, pushes.clone()), 1, duration).await;
    let app_call = generator.closed(user_update_source(app_url, pushes), 1, duration).await;
    let healthz = format!("{app_url}/healthz");
    let empty = Arc::new(move |client: &reqwest::Client, _| Some(client.get(&healthz))) as Source;
    let empty_call = generator.closed(empty, 1, duration).await;
    for (what, o) in [("push", &whole), ("internal call", &app_call), ("health check", &empty_call)] {
        anyhow::ensure!(
            o.ok > 0,
            "row 3d: every {what} failed: {}",
            o.first_failure.clone().unwrap_or_default()
        );
    }
    let transaction = transactions(kind, url, Flush::EveryCommit, duration).await?;
    let unflushed = transactions(kind, url, Flush::Deferred, duration).await?;
    Ok(PushParts {
        whole: mean(&whole),
        app_call: mean(&app_call),
        empty_call: mean(&empty_call),
        transaction,
        unflushed,
        failed: whole.failed() + app_call.failed(),
    })
}

fn mean(o: &Outcome) -> Duration {
    o.latencies.iter().sum::<Duration>() / o.latencies.len().max(1) as u32
}

/// The app role's internal call for push `n`, as the verify plugin sends it:
/// WeChat's signed push passed on, HMAC-signed with INTERNAL_SECRET.
fn user_update_source(app_url: &str, counter: Arc<AtomicU64>) -> Source {
    let ts = unix_now().to_string();
    let url = format!("{app_url}{USER_UPDATE}");
    let auth = Arc::new(InternalAuth::new(INTERNAL_SECRET.to_string().into()));
    Arc::new(move |client, _| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let (openid, nonce) = (push_openid(n), format!("bench{n}"));
        let body = json!({
            "openid": openid, "subscribed": true, "event_id": format!("subscribe:{openid}:{ts}"),
            "wechat": {
                "signature": sorted_sha1(&[TOKEN, &ts, &nonce]), "timestamp": ts, "nonce": nonce,
                "msg_signature": null, "body": subscribe_xml(&openid, &ts),
            },
        })
        .to_string();
        let now = unix_now().to_string();
        let signature = auth.sign("POST", USER_UPDATE, &now, body.as_bytes());
        Some(
            client
                .post(&url)
                .header(TIMESTAMP_HEADER, now)
                .header(SIGNATURE_HEADER, signature)
                .header("content-type", "application/json")
                .body(body),
        )
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// As the host's connections do: SQLite `synchronous = FULL` (its default),
    /// InnoDB `innodb_flush_log_at_trx_commit` as the server has it.
    EveryCommit,
    /// SQLite `synchronous = OFF`; InnoDB `innodb_flush_log_at_trx_commit = 0`
    /// (for this phase only, then put back).
    Deferred,
}

/// The mean time of the push's transaction done natively, one after another
/// for `duration`: the event claimed, the user upserted, committed. The same
/// statements as the internal plugin's, on a connection with the host's options.
async fn transactions(kind: Kind, url: &str, flush: Flush, duration: Duration) -> anyhow::Result<Duration> {
    use wxhost::database::{Pool, pool_options};
    const CLAIM: &str = "INSERT INTO processed_events (event_key, kind, created_at) VALUES (?, ?, ?)";
    const INSERT_USER: &str = "INSERT INTO users (openid, unionid, nickname, avatar_url, subscribed, quota, \
         created_at, updated_at) VALUES (?, NULL, NULL, NULL, 1, 0, ?, ?) ";
    let one = wxhost::database::PoolSettings { max_connections: 1, ..Default::default() };
    let (pool, upsert, configured_flush) = match kind {
        Kind::Sqlite => {
            let mut options = wxhost::database::sqlite_options(url)?;
            if flush == Flush::Deferred {
                options = options.synchronous(sqlx::sqlite::SqliteSynchronous::Off);
            }
            let pool = Pool::Sqlite(pool_options(&one).connect_with(options).await?);
            (
                pool,
                "ON CONFLICT (openid) DO UPDATE SET subscribed = 1, updated_at = excluded.updated_at",
                None,
            )
        }
        Kind::Mariadb => {
            let options: sqlx::mysql::MySqlConnectOptions = url.parse().context("the MariaDB URL")?;
            let pool = pool_options(&one).connect_with(wxhost::database::mysql_session(options)).await?;
            let configured: i64 =
                sqlx::query_scalar("SELECT CAST(@@GLOBAL.innodb_flush_log_at_trx_commit AS SIGNED)")
                    .fetch_one(&pool)
                    .await?;
            if flush == Flush::Deferred {
                pool.execute("SET GLOBAL innodb_flush_log_at_trx_commit = 0").await?;
            }
            let upsert = "ON DUPLICATE KEY UPDATE subscribed = 1, updated_at = VALUES(updated_at)";
            (Pool::Mysql(pool), upsert, Some(configured))
        }
    };
    let upsert = format!("{INSERT_USER}{upsert}");
    let mut count = 0u32;
    let started = Instant::now();
    let outcome: anyhow::Result<()> = wxhost::database::on_pool!(&pool, |p| async {
        while started.elapsed() < duration {
            let (key, openid, now) = native_event(count, flush);
            let mut tx = p.begin().await?;
            tx.execute(sqlx::query(CLAIM).bind(&key).bind("user").bind(now)).await?;
            tx.execute(sqlx::query(&upsert).bind(&openid).bind(now).bind(now)).await?;
            tx.commit().await?;
            count += 1;
        }
        Ok(())
    }
    .await);
    let elapsed = started.elapsed();
    if let (Pool::Mysql(p), Some(configured)) = (&pool, configured_flush) {
        // Put back, whatever happened.
        let restore = format!("SET GLOBAL innodb_flush_log_at_trx_commit = {configured}");
        p.execute(restore.as_str()).await?;
    }
    outcome?;
    anyhow::ensure!(count > 0, "row 3d: no transaction ran");
    Ok(elapsed / count)
}

/// The event key, openid and time of native transaction `n` (users apart
/// from the pushes', so the checks afterwards count only those).
fn native_event(n: u32, flush: Flush) -> (String, String, i64) {
    let phase = if flush == Flush::EveryCommit { "f" } else { "d" };
    let openid = format!("oTx{phase}{n:010}");
    (format!("user:subscribe:{openid}"), openid, unix_now())
}
