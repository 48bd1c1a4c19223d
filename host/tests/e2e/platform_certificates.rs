//! Platform certificates kept fresh, for merchants still on certificates, on
//! SQLite and MariaDB with the simulator playing WeChat Pay: the download
//! checked and stored sealed, shared through the database, a tampered row or
//! an expired certificate never trusted, a forged answer storing nothing;
//! end to end, a rotation picked up when a notify names the new serial.

use std::time::{Duration, Instant};

use crate::common::stack::*;
use crate::common::*;
use secrecy::SecretBox;
use serde_json::{Value, json};
use wxhost::caps::wechat_pay::WechatPay;
use wxhost::platform_certificates::{CertificateKeeper, load, store};
use wxhost::sim::PayRequest;
use wxhost::sim::pay::certificates::{CERTIFICATE_LIFETIME, self_signed_certificate};
use wxhost::wechat::pay::certificates::{CertificateError, SealedCertificate};
use wxhost::wechat::pay::v3::AeadError;
use wxhost::wechat::pay::{LiveKeys, PlatformKeys};
use wxhost::wechat::unix_now;

/// The serial of the SDK test certificate (`wechatpay_platform_test_cert.pem`).
const FIRST_SERIAL: &str = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";

fn apiv3_key() -> SecretBox<[u8; 32]> {
    SecretBox::new(Box::new(APIV3_KEY.as_bytes().try_into().unwrap()))
}

fn configured() -> PlatformKeys {
    PlatformKeys::from_pem(
        &std::fs::read_to_string(fixture("wechatpay_platform_test_cert.pem")).unwrap(),
        None,
    )
    .unwrap()
}

/// A keeper as a freshly started process has it: the configured certificate only.
fn fresh_keeper() -> CertificateKeeper {
    let configured = configured();
    CertificateKeeper::new(LiveKeys::new(configured.clone()), configured, apiv3_key())
}

/// The merchant on certificates, the simulator as its WeChat Pay, the
/// merchant's WeChat Pay client and a migrated database.
async fn merchant_on(db: &TestDatabase) -> (wxhost::sim::Sim, WechatPay, wxhost::database::Database) {
    let mut merchant = on_certificates(with_merchant(settings(Some(&db.url))));
    let (sim, addr) = pay_simulator(&merchant, 1.0).await;
    merchant.wechatpay_api_base = Some(format!("http://{addr}"));
    merchant.wechatpay_notify_url = Some("http://127.0.0.1:9/api/v1/payment/notify".into());
    let pay = WechatPay::from_settings(&merchant).unwrap().unwrap();
    let database = wxhost::database::connect(&db.url, &Default::default()).await.unwrap();
    wxhost::database::migrate(&database).await.unwrap();
    (sim, pay, database)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloaded_certificates_are_stored_sealed_and_a_process_started_later_trusts_them_from_the_database()
{
    for db in all_databases().await {
        let which = db.name;
        let (sim, pay, database) = merchant_on(&db).await;
        let keeper = fresh_keeper();
        let serials = keeper.download(&pay, &database).await.unwrap();
        assert_eq!(serials, vec![FIRST_SERIAL.to_string()], "{which}");

        // WeChat Pay rotates: the new certificate signs the answer, which lists old and new.
        let second = sim.rotate_platform_certificate(CERTIFICATE_LIFETIME).unwrap();
        assert!(!keeper.holds(&second), "{which}");
        let mut serials = keeper.download(&pay, &database).await.unwrap();
        serials.sort();
        let mut expected = vec![FIRST_SERIAL.to_string(), second.clone()];
        expected.sort();
        assert_eq!(serials, expected, "{which}: old and new both trusted while both are valid");
        assert_eq!(sim.certificate_downloads(), 2, "{which}");

        // Stored sealed, as WeChat Pay sent them: no certificate in the clear.
        let (rows, fetched_at) = load(&database).await.unwrap();
        assert_eq!(rows.len(), 2, "{which}");
        assert!(fetched_at.is_some_and(|at| unix_now() - at < 60), "{which}");
        let stored = db_count(
            &db.url,
            "SELECT COUNT(*) FROM platform_certificates WHERE sealed LIKE '%BEGIN CERTIFICATE%'",
        )
        .await;
        assert_eq!(stored, 0, "{which}");

        // Another process (the configured certificate only) trusts the new one from the database.
        let later = fresh_keeper();
        assert!(!later.holds(&second), "{which}");
        let mut in_use = later.install(rows, unix_now());
        in_use.sort();
        assert_eq!(in_use, expected, "{which}");
        assert!(later.holds(&second) && later.holds(FIRST_SERIAL), "{which}");
        assert_eq!(later.held().len(), 2, "{which}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_row_is_never_trusted_and_an_expired_certificate_stops_verifying() {
    for db in all_databases().await {
        let which = db.name;
        let (sim, pay, database) = merchant_on(&db).await;
        let second = sim.rotate_platform_certificate(CERTIFICATE_LIFETIME).unwrap();
        fresh_keeper().download(&pay, &database).await.unwrap();

        // Someone with write access to the table swaps the sealed certificate for another one's.
        db_exec(
            &db.url,
            "UPDATE platform_certificates SET sealed = (SELECT s FROM (SELECT sealed AS s FROM platform_certificates WHERE serial_no = ?) AS other) WHERE serial_no = ?",
            &[FIRST_SERIAL, &second],
        )
        .await;
        let keeper = fresh_keeper();
        let in_use = keeper.install(load(&database).await.unwrap().0, unix_now());
        assert_eq!(
            in_use,
            vec![FIRST_SERIAL.to_string()],
            "{which}: the swapped row does not open as {second}"
        );
        assert!(!keeper.holds(&second), "{which}");
        // Garbage instead of an envelope: ignored, the rest still trusted.
        db_exec(
            &db.url,
            "UPDATE platform_certificates SET sealed = ? WHERE serial_no = ?",
            &["{\"x\":1}", &second],
        )
        .await;
        assert_eq!(
            keeper.install(load(&database).await.unwrap().0, unix_now()),
            vec![FIRST_SERIAL.to_string()],
            "{which}"
        );
        // The next download mends the row (as after an APIv3 key reset, when
        // every stored envelope stops opening): the new envelope replaces it.
        fresh_keeper().download(&pay, &database).await.unwrap();
        let mut in_use = keeper.install(load(&database).await.unwrap().0, unix_now());
        in_use.sort();
        let mut both = vec![FIRST_SERIAL.to_string(), second.clone()];
        both.sort();
        assert_eq!(in_use, both, "{which}: the broken row was replaced by the download");
    }

    // An expired certificate is dropped; the valid one beside it stays.
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let expired_pem = self_signed_certificate(&key, "CN=expired", Duration::from_secs(30)).unwrap();
    let key: &[u8; 32] = APIV3_KEY.as_bytes().try_into().unwrap();
    let expired = SealedCertificate::seal(&expired_pem, key, "0123456789ab").unwrap();
    let valid = SealedCertificate::seal(
        &std::fs::read_to_string(fixture("wechatpay_platform_test_cert.pem")).unwrap(),
        key,
        "0123456789ab",
    )
    .unwrap();
    let keeper = fresh_keeper();
    assert_eq!(keeper.install(vec![expired.clone(), valid], unix_now()), vec![FIRST_SERIAL.to_string()]);
    assert!(!keeper.holds(&expired.serial_no));
    assert_eq!(keeper.held().len(), 1, "an expired certificate is not handed on either");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_certificates_answer_stores_nothing_and_changes_no_key() {
    for db in all_databases().await {
        let which = db.name;
        let (sim, pay, database) = merchant_on(&db).await;
        sim.forge_certificates(true);
        let keeper = fresh_keeper();
        let before: Vec<String> = keeper_ids(&keeper);
        let e = keeper.download(&pay, &database).await.unwrap_err();
        assert!(
            matches!(e.downcast_ref(), Some(CertificateError::Sealed(_, AeadError::Decrypt))),
            "{which}: refused as not sealed under the APIv3 key: {e:#}"
        );
        assert_eq!(load(&database).await.unwrap().0.len(), 0, "{which}: nothing stored");
        assert_eq!(keeper_ids(&keeper), before, "{which}: no key added");
        // The real answer afterwards is taken.
        sim.forge_certificates(false);
        assert_eq!(
            keeper.download(&pay, &database).await.unwrap(),
            vec![FIRST_SERIAL.to_string()],
            "{which}"
        );
        // Storing is an upsert: listing a certificate again adds no row.
        let (rows, _) = load(&database).await.unwrap();
        store(&database, rows.iter(), unix_now()).await.unwrap();
        assert_eq!(load(&database).await.unwrap().0.len(), 1, "{which}");
    }
}

fn keeper_ids(keeper: &CertificateKeeper) -> Vec<String> {
    let mut ids: Vec<String> = keeper.held().into_iter().map(|s| s.serial_no).collect();
    ids.sort();
    ids
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(started.elapsed() < Duration::from_secs(45), "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn paid_order(stack: &Stack, token: &str) -> (String, Value) {
    let (status, order) = stack
        .post("/api/v1/payment/create-order", Some(token), &json!({ "product_id": "p10" }).to_string())
        .await;
    assert_eq!(status, 200, "{order}");
    let no = order["out_trade_no"].as_str().unwrap().to_string();
    stack.sim.pay(&PayRequest { out_trade_no: Some(no.clone()), ..Default::default() }).await.unwrap();
    wait_for("the notify acknowledged", async || stack.sim.pay_order(&no).unwrap()["acknowledged"] == true)
        .await;
    let order = stack.sim.pay_order(&no).unwrap();
    (no, order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_fetched_when_a_notify_names_it_and_the_payment_is_credited_once_on_both_databases()
 {
    for db in all_databases().await {
        let which = db.name;
        let mut stack = Stack::start_with(&db.url, full_config(), PayApi::V3Certificates).await;
        // The app role downloads at start.
        wait_for("the first download", async || {
            db_count(&db.url, "SELECT COUNT(*) FROM platform_certificates").await == 1
        })
        .await;
        let alice = stack.login("alice").await;
        let (_, first) = paid_order(&stack, &alice).await;
        assert_eq!(first["deliveries"], json!([204]), "{which}: {first}");
        assert_eq!(stack.quota(&alice).await, 10, "{which}");

        // WeChat Pay signs with a new certificate neither role has seen.
        let second = stack.sim.rotate_platform_certificate(CERTIFICATE_LIFETIME).unwrap();
        let downloads = stack.sim.certificate_downloads();
        // Its first answer (the order placed) is waited for while the app role
        // downloads, not refused; its notify reaches the web role first.
        let (no, order) = paid_order(&stack, &alice).await;
        let deliveries: Vec<u64> =
            order["deliveries"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
        assert_eq!(deliveries.first(), Some(&401), "{which}: an unknown serial is refused first: {order}");
        assert_eq!(deliveries.last(), Some(&204), "{which}: WeChat Pay's retry is accepted: {order}");
        assert!(stack.sim.certificate_downloads() > downloads, "{which}: the app role asked WeChat Pay");
        assert!(
            stack.sim.certificate_downloads() - downloads <= 2,
            "{which}: one burst of notifies, not one download per delivery"
        );
        assert_eq!(stack.quota(&alice).await, 20, "{which}: credited once");
        assert_eq!(
            db_count(
                &db.url,
                &format!("SELECT COUNT(*) FROM orders WHERE out_trade_no = '{no}' AND status = 'paid'")
            )
            .await,
            1,
            "{which}"
        );
        let stored = db_count(
            &db.url,
            &format!("SELECT COUNT(*) FROM platform_certificates WHERE serial_no = '{second}'"),
        )
        .await;
        assert_eq!(stored, 1, "{which}: shared through the database");

        // A restarted app role trusts the new certificate from the database, without downloading.
        stack.restart_app().await;
        let downloads = stack.sim.certificate_downloads();
        let (_, third) = paid_order(&stack, &alice).await;
        assert_eq!(third["deliveries"], json!([204]), "{which}: the web role kept it: {third}");
        assert_eq!(stack.quota(&alice).await, 30, "{which}: the restarted app role re-verified it");
        assert_eq!(stack.sim.certificate_downloads(), downloads, "{which}: nothing downloaded again");
        stack.shutdown().await;
    }
}
