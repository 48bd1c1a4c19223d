//! The wechat-api capability against the WeChat simulator, on SQLite and
//! MariaDB: one shared access_token per lifetime for several processes, one
//! refresh after WeChat invalidates it, OAuth, allow-lists, and a WeChat that
//! is down or slow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use wxhost::bindings::wxhost::plugin::wechat_api::{ApiError, Host as _, Method};
use wxhost::caps::wechat_api::{TokenEndpoint, WechatApi, WechatApiView};
use wxhost::database;
use wxhost::sim::{Sim, SimConfig};

const SECRET: &str = "sim-app-secret";

async fn simulator(token_ttl: Duration) -> (Sim, String) {
    let sim = Sim::new(SimConfig {
        appid: APPID.into(),
        secret: SECRET.into(),
        token: TOKEN.into(),
        aes_key: Some(AES_KEY.into()),
        web_url: None,
        token_ttl,
    });
    let (addr, _task) =
        sim.serve("127.0.0.1:0".parse().unwrap(), tokio_util::sync::CancellationToken::new()).await.unwrap();
    (sim, format!("http://{addr}"))
}

/// One "app process": its own pool and its own capability context on the shared database.
async fn process(db: &TestDatabase, base: &str, endpoint: TokenEndpoint) -> Arc<WechatApi> {
    let database = database::connect(&db.url, &Default::default()).await.unwrap();
    database::migrate(&database).await.unwrap();
    Arc::new(
        WechatApi::new(Some(base), None, APPID.into(), SECRET.to_string().into(), endpoint, database)
            .unwrap(),
    )
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

async fn menu_get(api: &WechatApi) -> Result<serde_json::Value, ApiError> {
    api.call(Method::Get, "cgi-bin/menu/get", &[], None, soon()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_token_per_lifetime_on_both_databases() {
    let mut runs = Vec::new();
    for endpoint in [TokenEndpoint::Stable, TokenEndpoint::Plain] {
        for db in all_databases().await {
            runs.push(token_lifetimes(db, endpoint));
        }
    }
    // Independent simulators and databases: run side by side to keep the suite short.
    futures::future::join_all(runs).await;
}

async fn token_lifetimes(db: TestDatabase, endpoint: TokenEndpoint) {
    let which = format!("{} {endpoint:?}", db.name);
    // A 5 s lifetime: the host refreshes 1 s ahead, so every 4 s.
    let (sim, base) = simulator(Duration::from_secs(5)).await;
    let processes = [process(&db, &base, endpoint).await, process(&db, &base, endpoint).await];
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(9) {
        let batch = processes.iter().flat_map(|p| [p.clone(), p.clone()]).map(|p| async move {
            // No menu yet: WeChat's 46003 proves the call went through with a valid token.
            match menu_get(&p).await {
                Err(ApiError::Wechat(e)) if e.errcode == 46003 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        for result in futures::future::join_all(batch).await {
            result.unwrap_or_else(|e| panic!("{which}: a call failed: {e}"));
            calls += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued = sim.tokens_issued();
    // 9 s at one token per 4 s: the first plus two or three refreshes, never one per process.
    assert!((2..=4).contains(&issued), "{which}: {issued} tokens for {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_dying_mid_refresh_does_not_stall_others_while_the_old_token_is_valid_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let (sim, base) = simulator(Duration::from_secs(120)).await;
        let first = process(&db, &base, TokenEndpoint::Stable).await;
        assert!(matches!(menu_get(&first).await, Err(ApiError::Wechat(e)) if e.errcode == 46003), "{which}");

        // The token is due for its refresh, and a process took the lease and died.
        let pool = database::connect(&db.url, &Default::default()).await.unwrap().pool;
        let now = wxhost::internal_auth::unix_now() as i64;
        let sql = "UPDATE token_cache SET expires_at = ?, lease_owner = 'died-mid-refresh', lease_until = ?";
        wxhost::on_pool!(&pool, |p| sqlx::query(sql)
            .bind(now - 1)
            .bind(now + 10)
            .execute(p)
            .await
            .map(|_| ()))
        .unwrap();

        // Another process calls at once with the token WeChat still takes.
        let other = process(&db, &base, TokenEndpoint::Stable).await;
        let started = Instant::now();
        let answer = menu_get(&other).await;
        assert!(matches!(&answer, Err(ApiError::Wechat(e)) if e.errcode == 46003), "{which}: {answer:?}");
        // The dead holder's lease runs 10 s: the call did not wait for it.
        assert!(started.elapsed() < Duration::from_secs(5), "{which}: waited {:?}", started.elapsed());
        assert_eq!(sim.tokens_issued(), 1, "{which}: the lease holder's refresh was not repeated");

        // Once the lease lapses, the next caller refreshes.
        let sql = "UPDATE token_cache SET lease_until = ?";
        wxhost::on_pool!(&pool, |p| sqlx::query(sql).bind(now - 1).execute(p).await.map(|_| ())).unwrap();
        let answer = menu_get(&other).await;
        assert!(matches!(&answer, Err(ApiError::Wechat(e)) if e.errcode == 46003), "{which}: {answer:?}");
        assert_eq!(sim.tokens_issued(), 2, "{which}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_token_is_refreshed_once_and_the_call_retried_on_both_databases() {
    for db in all_databases().await {
        let which = db.name;
        let (sim, base) = simulator(Duration::from_secs(7200)).await;
        let processes = [
            process(&db, &base, TokenEndpoint::Stable).await,
            process(&db, &base, TokenEndpoint::Stable).await,
        ];
        for p in &processes {
            assert!(matches!(menu_get(p).await, Err(ApiError::Wechat(e)) if e.errcode == 46003), "{which}");
        }
        assert_eq!(sim.tokens_issued(), 1, "{which}");
        // Someone called cgi-bin/token elsewhere: WeChat now rejects our token with 40001.
        sim.invalidate_tokens();
        // Many requests per process at once: some re-read the shared row while others refresh it.
        let calls = processes
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), 10))
            .map(|p| async move { menu_get(&p).await });
        for result in futures::future::join_all(calls).await {
            assert!(
                matches!(result, Err(ApiError::Wechat(ref e)) if e.errcode == 46003),
                "{which}: {result:?}"
            );
        }
        assert_eq!(
            sim.tokens_issued(),
            2,
            "{which}: exactly one refresh for twenty failing calls in two processes"
        );

        // The token expires early (42001): the same single refresh.
        sim.expire_tokens();
        let calls =
            processes.iter().flat_map(|p| [p.clone(), p.clone()]).map(|p| async move { menu_get(&p).await });
        for result in futures::future::join_all(calls).await {
            assert!(
                matches!(result, Err(ApiError::Wechat(ref e)) if e.errcode == 46003),
                "{which}: {result:?}"
            );
        }
        assert_eq!(sim.tokens_issued(), 3, "{which}: one refresh after expiry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_codes_work_once_and_bad_codes_are_wechat_errors() {
    let db = sqlite_database().await;
    let (sim, base) = simulator(Duration::from_secs(7200)).await;
    let api = process(&db, &base, TokenEndpoint::Stable).await;

    let code = sim.oauth_code("alice", "snsapi_userinfo");
    let user = api.oauth_login(&code, soon()).await.unwrap();
    assert_eq!(user.openid, wxhost::sim::openid_of("alice"));
    assert_eq!(user.scope, "snsapi_userinfo");
    assert_eq!(user.nickname.as_deref(), Some("alice 🌟"));
    assert!(user.avatar_url.unwrap().starts_with("https://"));

    let reused = api.oauth_login(&code, soon()).await;
    assert!(matches!(reused, Err(ApiError::Wechat(ref e)) if e.errcode == 40163), "{reused:?}");
    let invalid = api.oauth_login("no-such-code", soon()).await;
    assert!(matches!(invalid, Err(ApiError::Wechat(ref e)) if e.errcode == 40029), "{invalid:?}");

    let base_scope = api.oauth_login(&sim.oauth_code("bob", "snsapi_base"), soon()).await.unwrap();
    assert_eq!((base_scope.scope.as_str(), base_scope.nickname), ("snsapi_base", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_may_call_only_its_allowed_paths_and_never_sees_the_token() {
    let db = sqlite_database().await;
    let (sim, base) = simulator(Duration::from_secs(7200)).await;
    let api = process(&db, &base, TokenEndpoint::Stable).await;
    let allowed = vec!["cgi-bin/menu/create".to_string(), "cgi-bin/menu/get".to_string()];
    let mut view = WechatApiView { ctx: Some(&api), allowed_paths: &allowed, deadline_at: soon() };

    let menu = r#"{"button":[{"type":"click","name":"帮助","key":"MENU_HELP"}]}"#;
    let created =
        plain(view.call(Method::Post, "/cgi-bin/menu/create".into(), vec![], Some(menu.into())).await);
    assert_eq!(created.unwrap(), r#"{"errcode":0,"errmsg":"ok"}"#);
    assert_eq!(sim.menu().unwrap()["button"][0]["name"], "帮助");
    let got = plain(view.call(Method::Get, "cgi-bin/menu/get".into(), vec![], None).await).unwrap();
    assert!(got.contains("帮助") && !got.contains("ACCESS_TOKEN"), "{got}");

    let refused =
        plain(view.call(Method::Post, "cgi-bin/qrcode/create".into(), vec![], Some("{}".into())).await);
    assert!(matches!(refused, Err(ApiError::NotAllowed(_))), "{refused:?}");
    let sneaky = plain(view.call(Method::Get, "cgi-bin/menu/get/../../token".into(), vec![], None).await);
    assert!(matches!(sneaky, Err(ApiError::NotAllowed(_))), "{sneaky:?}");
    for key in ["access_token", "ACCESS_TOKEN", "appid", "secret"] {
        let own = vec![(key.to_string(), "x".to_string())];
        let refused = plain(view.call(Method::Get, "cgi-bin/menu/get".into(), own, None).await);
        assert!(matches!(&refused, Err(ApiError::NotAllowed(m)) if m.contains(key)), "{key}: {refused:?}");
    }
    assert_eq!(view.appid().await.unwrap(), APPID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wechat_down_or_slow_is_a_clear_error_within_the_deadline() {
    let db = sqlite_database().await;
    let (sim, base) = simulator(Duration::from_secs(7200)).await;
    let api = process(&db, &base, TokenEndpoint::Stable).await;
    assert!(matches!(menu_get(&api).await, Err(ApiError::Wechat(e)) if e.errcode == 46003));

    sim.set_down(true);
    assert!(matches!(menu_get(&api).await, Err(ApiError::Wechat(e)) if e.errcode == -1));
    sim.set_down(false);

    sim.set_latency(Duration::from_secs(10));
    let started = Instant::now();
    let slow = api
        .call(Method::Get, "cgi-bin/menu/get", &[], None, Instant::now() + Duration::from_millis(700))
        .await;
    assert!(matches!(slow, Err(ApiError::Timeout)), "{slow:?}");
    // The simulator answers after 10 s: the 0.7 s deadline cut the call short.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    sim.set_latency(Duration::ZERO);

    // Nothing listens there: unavailable, and the error names no URL or secret.
    let nowhere = WechatApi::new(
        Some("http://127.0.0.1:9"),
        None,
        APPID.into(),
        SECRET.to_string().into(),
        TokenEndpoint::Stable,
        database::connect(&db.url, &Default::default()).await.unwrap(),
    )
    .unwrap();
    let down = menu_get(&nowhere).await;
    let text = format!("{down:?}");
    assert!(matches!(down, Err(ApiError::Unavailable(_))), "{text}");
    assert!(!text.contains(SECRET) && !text.contains("127.0.0.1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jssdk_ticket_is_fetched_once_for_every_process_and_signs_the_page_url_as_sent_on_both_databases()
{
    use sha1::Digest as _;
    for db in all_databases().await {
        let which = db.name;
        let (sim, base) = simulator(Duration::from_secs(7200)).await;
        let (first, second) = (
            process(&db, &base, TokenEndpoint::Stable).await,
            process(&db, &base, TokenEndpoint::Stable).await,
        );
        let allowed = vec![wxhost::caps::wechat_api::JSAPI_TICKET_PATH.to_string()];
        let page = "https://shop.example.com/member.html?from=menu&x=%E4%B8%AD";
        let mut configs = Vec::new();
        for api in [&first, &first, &second] {
            let mut view = WechatApiView { ctx: Some(api), allowed_paths: &allowed, deadline_at: soon() };
            configs.push(plain(view.sign_jssdk_url(format!("{page}#section")).await).unwrap());
        }
        assert_eq!(sim.tickets_issued(), 1, "{which}: one ticket for both processes");
        let ticket = sim.jsapi_ticket().unwrap();
        for c in &configs {
            assert_eq!(c.app_id, APPID, "{which}");
            // Signed over the URL as the browser sent it, without its `#` part.
            let text = format!(
                "jsapi_ticket={ticket}&noncestr={}&timestamp={}&url={page}",
                c.nonce_str, c.timestamp
            );
            assert_eq!(c.signature, hex::encode(sha1::Sha1::digest(text.as_bytes())), "{which}");
            assert!((c.timestamp - wxhost::wechat::unix_now()).abs() < 60, "{which}");
        }
        assert_ne!(configs[0].nonce_str, configs[1].nonce_str, "{which}: a fresh nonce each time");

        // The ticket is never handed to a plugin, and only a plugin allowed getticket may have it signed.
        let mut view = WechatApiView { ctx: Some(&first), allowed_paths: &allowed, deadline_at: soon() };
        let query = vec![("type".to_string(), "jsapi".to_string())];
        let raw = plain(view.call(Method::Get, "cgi-bin/ticket/getticket".into(), query, None).await);
        assert!(matches!(raw, Err(ApiError::NotAllowed(_))), "{which}: {raw:?}");
        for bad in ["/member.html", "javascript:alert(1)", "ftp://example.com/"] {
            let refused = plain(view.sign_jssdk_url(bad.into()).await);
            assert!(matches!(refused, Err(ApiError::NotAllowed(_))), "{which}: {bad}: {refused:?}");
        }
        let none: Vec<String> = vec![];
        let mut other = WechatApiView { ctx: Some(&first), allowed_paths: &none, deadline_at: soon() };
        assert!(
            matches!(plain(other.sign_jssdk_url(page.into()).await), Err(ApiError::NotAllowed(_))),
            "{which}"
        );
    }
}
