//! What the end-to-end rows send: WeChat's subscribe pushes (plaintext mode)
//! and WeChat Pay's APIv3 payment notifies, built and signed exactly as the
//! platforms do (see `build_notify` in host/src/sim/pay.rs), all before any
//! timed phase; and the pending orders those notifies pay.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use wxhost::wechat::pay::RsaSigner;
use wxhost::wechat::pay::v3::{signed_message, v3_encrypt};
use wxhost::wechat::sorted_sha1;

use crate::load::Source;
use crate::product::{APIV3_KEY, APPID, MCHID, PUB_KEY_ID, TOKEN, fixture};

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() as i64
}

/// The openid of push user `n` (every push is a distinct subscribe event).
pub fn push_openid(n: u64) -> String {
    format!("oPush{n:010}")
}

/// Subscribe pushes from distinct users, numbered by `counter` (shared by every
/// phase against one database, so no event repeats). Plaintext mode, each
/// push signed with its own nonce as WeChat does (the host binds a plaintext
/// signature to the first body it came with).
pub fn push_source(web_url: &str, counter: Arc<AtomicU64>) -> Source {
    let ts = unix_now().to_string();
    let web_url = web_url.to_string();
    Arc::new(move |client, _| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let nonce = format!("bench{n}");
        let url = format!(
            "{web_url}/api/v1/auth/wechat/verify?signature={}&timestamp={ts}&nonce={nonce}&openid=oBench",
            sorted_sha1(&[TOKEN, &ts, &nonce])
        );
        let xml = subscribe_xml(&push_openid(n), &ts);
        Some(client.post(&url).header("content-type", "text/xml").body(xml))
    })
}

/// A plaintext subscribe push from `openid`, created at `ts`.
pub fn subscribe_xml(openid: &str, ts: &str) -> String {
    format!(
        "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>\
         <CreateTime>{ts}</CreateTime><MsgType><![CDATA[event]]></MsgType>\
         <Event><![CDATA[subscribe]]></Event><EventKey><![CDATA[]]></EventKey></xml>"
    )
}

/// Users the consume row spends from, and how much each holds.
pub const CONSUMERS: u64 = 16;
pub const CONSUMER_QUOTA: i64 = 1_000_000_000;

pub fn consumer_openid(n: u64) -> String {
    format!("oConsume{n:04}")
}

/// The business service consuming 1 unit per job, each job a new idempotency
/// key, spread over [`CONSUMERS`] users (numbered by `counter`, shared by every
/// phase against one database, so no key repeats).
pub fn consume_source(app_url: &str, key: &'static str, counter: Arc<AtomicU64>) -> Source {
    let url = format!("{app_url}/api/v1/quota/consume");
    Arc::new(move |client, _| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let body = format!(
            r#"{{"openid":"{}","units":1,"idempotency_key":"bench-job-{n}","description":"bench"}}"#,
            consumer_openid(n % CONSUMERS)
        );
        Some(client.post(&url).bearer_auth(key).header("content-type", "application/json").body(body))
    })
}

/// The consume row's users, each with [`CONSUMER_QUOTA`] and the opening ledger row that explains it.
pub async fn insert_consumers(db: &wxhost::database::Database) -> anyhow::Result<()> {
    let now = unix_now();
    for n in 0..CONSUMERS {
        let openid = consumer_openid(n);
        wxhost::on_pool!(&db.pool, |p| {
            let mut tx = p.begin().await?;
            sqlx::query("INSERT INTO users (openid, subscribed, quota, created_at, updated_at) VALUES (?, 1, ?, ?, ?)")
                .bind(&openid)
                .bind(CONSUMER_QUOTA)
                .bind(now)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO quota_ledger (openid, delta, balance_after, cause, description, created_at) \
                 VALUES (?, ?, ?, 'opening', 'bench', ?)",
            )
            .bind(&openid)
            .bind(CONSUMER_QUOTA)
            .bind(CONSUMER_QUOTA)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        })?;
    }
    Ok(())
}

/// `GET verify` (server verification), one signed query for every request.
pub fn verify_source(web_url: &str) -> Source {
    let ts = unix_now().to_string();
    let url = format!(
        "{web_url}/api/v1/auth/wechat/verify?signature={}&timestamp={ts}&nonce=bench&echostr=5188563426541789870",
        sorted_sha1(&[TOKEN, &ts, "bench"])
    );
    Arc::new(move |client, _| Some(client.get(&url)))
}

/// Order `i` of the payment rows.
pub fn out_trade_no(i: usize) -> String {
    format!("BENCH{i:010}")
}

pub fn payer_openid(i: usize) -> String {
    format!("oPay{i:010}")
}

pub const PRICE_FEN: i64 = 990;
pub const CREDITS: i64 = 10;

/// A WeChat Pay APIv3 notify, signed with the platform key.
pub struct SignedNotify {
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// Signed "paid" notifies for orders `range`, signed now (on every core: RSA-2048
/// signing is the slow part) — the web role accepts them for 5 minutes.
pub fn sign_notifies(range: std::ops::Range<usize>) -> anyhow::Result<Vec<SignedNotify>> {
    let pem = std::fs::read_to_string(fixture("wechatpay_platform_test_key.pem"))
        .context("reading the platform test key")?;
    let signer = RsaSigner::from_pem(&pem)?;
    let key: &[u8; 32] = APIV3_KEY.as_bytes().try_into().expect("a 32-byte key");
    let timestamp = unix_now().to_string();
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let indices: Vec<usize> = range.collect();
    let chunk = indices.len().div_ceil(threads).max(1);
    let mut out = Vec::with_capacity(indices.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|part| {
                let (signer, timestamp) = (&signer, &timestamp);
                scope.spawn(move || {
                    part.iter().map(|&i| sign_one(signer, key, timestamp, i)).collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            out.extend(h.join().expect("signing does not panic"));
        }
    });
    Ok(out)
}

fn sign_one(signer: &RsaSigner, key: &[u8; 32], timestamp: &str, i: usize) -> SignedNotify {
    let no = out_trade_no(i);
    let resource = serde_json::json!({
        "mchid": MCHID, "appid": APPID, "out_trade_no": no, "transaction_id": format!("4200{no}"),
        "trade_type": "JSAPI", "trade_state": "SUCCESS", "trade_state_desc": "支付成功", "bank_type": "OTHERS",
        "success_time": "2026-11-25T10:00:00+08:00", "payer": { "openid": payer_openid(i) },
        "amount": { "total": PRICE_FEN, "payer_total": PRICE_FEN, "currency": "CNY", "payer_currency": "CNY" }
    })
    .to_string();
    // A fresh AEAD nonce per message, as WeChat Pay does.
    let aead_nonce = format!("{i:012}");
    let ciphertext =
        v3_encrypt(key, &aead_nonce, "transaction", resource.as_bytes()).expect("a 12-character nonce");
    let body = serde_json::json!({
        "id": format!("EV-4200{no}"), "create_time": "2026-11-25T10:00:01+08:00",
        "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS", "summary": "支付成功",
        "resource": { "original_type": "transaction", "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext,
                      "associated_data": "transaction", "nonce": aead_nonce }
    })
    .to_string();
    let nonce = format!("{:032X}", i as u128 * 0x9E37_79B9_7F4A_7C15);
    let signature = signer.sign(&signed_message(timestamp, &nonce, body.as_bytes()));
    SignedNotify {
        headers: vec![
            ("content-type", "application/json".into()),
            ("wechatpay-timestamp", timestamp.to_string()),
            ("wechatpay-nonce", nonce),
            ("wechatpay-signature", signature),
            ("wechatpay-serial", PUB_KEY_ID.into()),
            ("wechatpay-signature-type", "WECHATPAY2-SHA256-RSA2048".into()),
        ],
        body,
    }
}

fn notify_request(client: &reqwest::Client, url: &str, n: &SignedNotify) -> reqwest::RequestBuilder {
    let mut r = client.post(url).body(n.body.clone());
    for (k, v) in &n.headers {
        r = r.header(*k, v.as_str());
    }
    r
}

/// Each notify of `notifies` once, in order; then exhausted.
pub fn notify_source(web_url: &str, notifies: Arc<[SignedNotify]>) -> Source {
    let url = format!("{web_url}/api/v1/payment/notify");
    Arc::new(move |client, i| notifies.get(i as usize).map(|n| notify_request(client, &url, n)))
}

/// The same notify again and again (WeChat Pay's retries: the duplicate path).
pub fn repeat_source(web_url: &str, notify: Arc<SignedNotify>) -> Source {
    let url = format!("{web_url}/api/v1/payment/notify");
    Arc::new(move |client, _| Some(notify_request(client, &url, &notify)))
}

/// Pending orders `range` (990 fen, 10 credits) and their payers (quota 0),
/// inserted directly, as create-order leaves them once WeChat Pay has the order.
pub async fn insert_orders(
    db: &wxhost::database::Database,
    range: std::ops::Range<usize>,
) -> anyhow::Result<()> {
    let indices: Vec<usize> = range.collect();
    let now = unix_now();
    for part in indices.chunks(500) {
        let users = format!(
            "INSERT INTO users (openid, subscribed, quota, created_at, updated_at) VALUES {}",
            vec!["(?, 1, 0, ?, ?)"; part.len()].join(", ")
        );
        let orders = format!(
            "INSERT INTO orders (out_trade_no, openid, product_id, description, amount_fen, credits, status, \
             prepay_id, time_expire, created_at, updated_at, appid, mchid) VALUES {}",
            vec!["(?, ?, 'p10', '10 次识别', ?, ?, 'pending', ?, ?, ?, ?, ?, ?)"; part.len()].join(", ")
        );
        wxhost::on_pool!(&db.pool, |p| {
            let mut tx = p.begin().await?;
            let mut q = sqlx::query(&users);
            for &i in part {
                q = q.bind(payer_openid(i)).bind(now).bind(now);
            }
            q.execute(&mut *tx).await?;
            let mut q = sqlx::query(&orders);
            for &i in part {
                q = q
                    .bind(out_trade_no(i))
                    .bind(payer_openid(i))
                    .bind(PRICE_FEN)
                    .bind(CREDITS)
                    .bind(format!("wx_bench_prepay_{i}"))
                    .bind(now + 1800)
                    .bind(now)
                    .bind(now)
                    .bind(APPID)
                    .bind(MCHID);
            }
            q.execute(&mut *tx).await?;
            tx.commit().await
        })
        .context("inserting the pending orders")?;
    }
    Ok(())
}
