//! End to end: WeChat server verification through the real `verify` plugin,
//! with the signature checked by the host's callback-crypto capability.

use crate::common::*;
use wxhost::config::Role;

fn vector() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/wechat_vectors.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["server_signature"][0].clone()
}

#[test]
fn the_signature_rule_tests_sign_with_matches_the_sdk_vector() {
    let v = vector();
    let s = |k: &str| v[k].as_str().unwrap().to_string();
    assert_eq!(TOKEN, s("token"));
    let ours = wxhost::wechat::sorted_sha1(&[&s("token"), &s("timestamp"), &s("nonce")]);
    assert_eq!(ours, s("signature"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_verification_echoes_echostr_only_for_a_valid_signature() {
    let config = verify_only_config();
    let server = start(&config, &[Role::Web], None, false).await;
    let client = reqwest::Client::new();
    let get = |q: String| client.get(url(&server, Role::Web, &q)).send();

    let ok = get(verify_query("5188563426541789870")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.text().await.unwrap(), "5188563426541789870");

    let ts = unix_now().to_string();
    let good = wxhost::wechat::sorted_sha1(&[TOKEN, &ts, "n"]);
    // The right signature with its last digit changed.
    let forged = format!("{}{}", &good[..39], if good.ends_with('0') { '1' } else { '0' });
    let cases = [
        (format!("signature={forged}&timestamp={ts}&nonce=n&echostr=e"), 401, "bad_signature"),
        // Signed over another nonce than the one sent.
        (format!("signature={good}&timestamp={ts}&nonce=m&echostr=e"), 401, "bad_signature"),
        (format!("signature=&timestamp={ts}&nonce=n&echostr=e"), 400, "missing_parameter"),
        (format!("timestamp={ts}&nonce=n&echostr=e"), 400, "missing_parameter"),
        (format!("signature={good}&timestamp={ts}&nonce=n"), 400, "missing_parameter"),
        ("".to_string(), 400, "missing_parameter"),
        (format!("signature={}&timestamp={ts}&nonce=n&echostr=e", "z".repeat(5000)), 401, "bad_signature"),
    ];
    for (query, status, code) in cases {
        let r = get(format!("/api/v1/auth/wechat/verify?{query}")).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{query}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{query}");
    }

    // The SDK vector's signature is valid but its 2014 timestamp is stale.
    let v = vector();
    let q = format!(
        "/api/v1/auth/wechat/verify?signature={}&timestamp={}&nonce={}&echostr=e",
        v["signature"].as_str().unwrap(),
        v["timestamp"].as_str().unwrap(),
        v["nonce"].as_str().unwrap()
    );
    let r = get(q).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"]["code"], "stale_timestamp");

    // Other methods: a JSON 405, never a panic.
    let r =
        client.put(url(&server, Role::Web, "/api/v1/auth/wechat/verify")).body("<xml>").send().await.unwrap();
    assert_eq!(r.status(), 405);
    server.shutdown();
    server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_without_a_configured_token_is_a_clear_503() {
    let config = verify_only_config();
    init_logging();
    let mut settings = settings(None);
    settings.wechat_token = None;
    let server = wxhost::server::start(wxhost::server::ServeOptions {
        config_path: config.path(),
        roles: vec![Role::Web],
        settings,
        watch: false,
    })
    .await
    .unwrap();
    let r = reqwest::get(url(&server, Role::Web, &verify_query("e"))).await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("not_configured") && !body.contains("WECHAT_TOKEN"), "{body}");
    server.shutdown();
    server.wait().await;
}
