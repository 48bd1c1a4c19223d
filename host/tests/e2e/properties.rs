//! Property tests (generated inputs) for everything that parses what the
//! outside world sends: the safe-mode decryptor, the XML of pushes and APIv2
//! notifies, the APIv3 notify, and plugins.toml. Whatever the input: no panic,
//! no hang, and a rejection is a clean error; valid inputs round-trip.
//!
//! A short run is part of the test command (`PROPTEST_CASES`, default 256 per
//! property here); a longer one: `PROPTEST_CASES=20000 cargo test --test e2e properties --release`.

use std::path::Path;

use proptest::prelude::*;
use wxhost::wechat::pay::v3::{public_key_from_pem, signed_message, v3_encrypt};
use wxhost::wechat::pay::{PayNotifyKeys, PlatformKeys, RsaSigner, SignatureHeaders, V2SignType};
use wxhost::wechat::xml::{flat_xml, push_xml};
use wxhost::wechat::{CallbackKeys, VerifyError, sorted_sha1, unix_now};

const TOKEN: &str = "test";
const APPID: &str = "wxb11529c136998cb6";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const APIV3_KEY: &[u8; 32] = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
const KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";

fn fixture(f: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(f)).unwrap()
}

fn crypto() -> CallbackKeys {
    CallbackKeys::new(
        Some(TOKEN.to_string().into()),
        Some(&AES_KEY.to_string().into()),
        Some(APPID.into()),
        None,
    )
    .unwrap()
}

fn pay_keys() -> PayNotifyKeys {
    let mut platform = PlatformKeys::default();
    platform.insert(KEY_ID, public_key_from_pem(&fixture("wechatpay_platform_test_pub.pem")).unwrap());
    PayNotifyKeys {
        apiv3_key: Some(secrecy::SecretBox::new(Box::new(*APIV3_KEY))),
        platform: wxhost::wechat::pay::LiveKeys::new(platform),
        apiv2_key: Some("192006250b4c09247ec02edce69f6a2d".to_string().into()),
        apiv2_sign_type: V2SignType::HmacSha256,
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

/// XML-ish text: tags, CDATA, entities and DOCTYPE fragments mixed with noise.
fn xmlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<xml>".to_string()),
        Just("</xml>".to_string()),
        Just("<![CDATA[".to_string()),
        Just("]]>".to_string()),
        Just("<!DOCTYPE x [<!ENTITY e \"v\">]>".to_string()),
        Just("&e;".to_string()),
        Just("&amp;".to_string()),
        "<[A-Za-z_]{1,8}>".prop_map(|s| s),
        "</[A-Za-z_]{1,8}>".prop_map(|s| s),
        "[^<&]{0,12}".prop_map(|s| s),
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_xml_flattens_or_is_a_clean_error(text in xmlish()) {
        let _ = flat_xml(&text);
        let _ = push_xml(&text);
    }

    #[test]
    fn any_correctly_signed_ciphertext_decrypts_or_is_a_clean_error(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        use base64::Engine as _;
        let c = crypto();
        let encrypt = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let signature = sorted_sha1(&[TOKEN, "1409304348", "xxxxxx", &encrypt]);
        match c.decrypt_message(&signature, "1409304348", "xxxxxx", &encrypt) {
            Ok(_) | Err(VerifyError::Malformed(_)) | Err(VerifyError::WrongAppid) => {}
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
        // A forged signature never gets as far as decrypting.
        prop_assert!(matches!(
            c.decrypt_message("0000", "1409304348", "xxxxxx", &encrypt),
            Err(VerifyError::BadSignature)
        ));
    }

    #[test]
    fn any_message_survives_the_safe_mode_round_trip(message in any::<String>()) {
        let c = crypto();
        let sealed = c.encrypt(&message, "1409304348", "nonce").unwrap();
        let opened = c.decrypt_message(&sealed.msg_signature, "1409304348", "nonce", &sealed.encrypt).unwrap();
        prop_assert_eq!(opened, message);
    }

    #[test]
    fn any_apiv2_notify_body_is_verified_or_refused_cleanly(text in xmlish()) {
        let _ = pay_keys().verify_v2(&text);
    }

    #[test]
    fn any_plugins_toml_is_a_config_or_a_list_of_problems(text in any::<String>()) {
        if let Err(e) = wxhost::config::parse(&text, Path::new("/nonexistent/plugins.toml")) {
            prop_assert!(!e.problems.is_empty());
        }
    }

    #[test]
    fn any_mutation_of_the_shipped_plugins_toml_is_a_config_or_a_list_of_problems(
        cut in any::<prop::sample::Index>(),
        len in 0usize..400,
        insert in prop_oneof![Just(""), Just("\n[[plugins]]\n"), Just("\"]"), Just("= 1\n"), Just("[roles.web]\n")],
    ) {
        let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins.toml")).unwrap();
        let start = cut.index(shipped.len());
        let start = (0..=start).rev().find(|i| shipped.is_char_boundary(*i)).unwrap_or(0);
        let end = (start + len).min(shipped.len());
        let end = (end..=shipped.len()).find(|i| shipped.is_char_boundary(*i)).unwrap_or(shipped.len());
        let mutated = format!("{}{insert}{}", &shipped[..start], &shipped[end..]);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins.toml");
        if let Err(e) = wxhost::config::parse(&mutated, &path) {
            prop_assert!(!e.problems.is_empty());
        }
    }
}

proptest! {
    // Each case signs with RSA: fewer cases.
    #![proptest_config(ProptestConfig { cases: config().cases / 4 + 1, ..config() })]

    #[test]
    fn any_signed_apiv3_notify_body_decrypts_or_is_refused_cleanly(
        body in prop_oneof![
            any::<String>(),
            // Shaped like a notify, with an arbitrary resource.
            (any::<String>(), any::<String>(), "[a-zA-Z0-9]{0,16}").prop_map(|(plain, aad, nonce)| {
                let ciphertext = v3_encrypt(APIV3_KEY, &format!("{nonce:0<12}")[..12], &aad, plain.as_bytes()).unwrap();
                serde_json::json!({
                    "event_type": "TRANSACTION.SUCCESS",
                    "resource": { "algorithm": "AEAD_AES_256_GCM", "ciphertext": ciphertext, "associated_data": aad, "nonce": nonce },
                })
                .to_string()
            }),
        ]
    ) {
        let signer = RsaSigner::from_pem(&fixture("wechatpay_platform_test_key.pem")).unwrap();
        let timestamp = unix_now().to_string();
        let headers = SignatureHeaders {
            signature: signer.sign(&signed_message(&timestamp, "N", body.as_bytes())),
            timestamp,
            nonce: "N".into(),
            serial: KEY_ID.into(),
        };
        match pay_keys().verify_v3(&headers, body.as_bytes(), unix_now()) {
            Ok(_) | Err(VerifyError::Malformed(_)) => {}
            Err(other) => prop_assert!(false, "a signed notify is only ever malformed, not {other:?}"),
        }
    }
}
