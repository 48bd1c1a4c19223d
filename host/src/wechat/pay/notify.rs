//! The checks of WeChat Pay's notifies: APIv3 (the signature over
//! `timestamp\nnonce\nbody\n` with the key `Wechatpay-Serial` names, then the
//! AEAD resource) and APIv2 (`sign` over every received field; a refund
//! notify's `req_info` sealed under the APIv2 key).

use secrecy::ExposeSecret as _;

use super::v2::{self, V2SignType};
use super::v3::{self, LiveKeys, SignatureError, SignatureHeaders};
use crate::wechat::VerifyError;
use crate::wechat::xml::{field, flat_xml};

/// What checking WeChat Pay's notifies takes: the APIv3 key, the platform's
/// public keys, and (for APIv2 merchants) the APIv2 key.
pub struct PayNotifyKeys {
    pub apiv3_key: Option<secrecy::SecretBox<[u8; 32]>>,
    /// Shared with the WeChat Pay capability, renewed in place.
    pub platform: LiveKeys,
    pub apiv2_key: Option<secrecy::SecretString>,
    /// The APIv2 sign type the merchant uses: a notify signed otherwise is
    /// refused (no downgrade from HMAC-SHA256 to MD5).
    pub apiv2_sign_type: V2SignType,
}

/// A verified APIv3 notify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V3Notify {
    pub event_type: String,
    /// The decrypted resource, a JSON document (a transaction, a refund).
    pub resource_json: String,
}

impl From<SignatureError> for VerifyError {
    fn from(e: SignatureError) -> Self {
        match e {
            SignatureError::Probe => VerifyError::SignatureProbe,
            SignatureError::Stale => VerifyError::StaleTimestamp,
            SignatureError::UnknownKey(id) => VerifyError::UnknownKey(id),
            SignatureError::Bad => VerifyError::BadSignature,
            SignatureError::Malformed(what) => VerifyError::Malformed(what.into()),
        }
    }
}

impl PayNotifyKeys {
    /// APIv3 notify: signature probe, clock skew, the key `serial` names, the
    /// SHA256-RSA signature, then the resource.
    pub fn verify_v3(
        &self,
        headers: &SignatureHeaders,
        body: &[u8],
        now_unix: i64,
    ) -> Result<V3Notify, VerifyError> {
        let apiv3_key = self.apiv3_key.as_ref().ok_or(VerifyError::NotConfigured(
            "WECHATPAY_APIV3_KEY and the platform public key are not set",
        ))?;
        self.platform.verify(headers, body, now_unix)?;
        let malformed = |what: &str| VerifyError::Malformed(what.to_string());
        let notify: serde_json::Value =
            serde_json::from_slice(body).map_err(|_| malformed("the body is not JSON"))?;
        let resource = &notify["resource"];
        if resource["algorithm"].as_str() != Some("AEAD_AES_256_GCM") {
            return Err(malformed("resource.algorithm must be AEAD_AES_256_GCM"));
        }
        let part = |name: &str| resource[name].as_str().ok_or_else(|| malformed(&format!("resource.{name}")));
        let plaintext = v3::v3_decrypt(
            apiv3_key.expose_secret(),
            part("nonce")?,
            resource["associated_data"].as_str().unwrap_or_default(),
            part("ciphertext")?,
        )
        .map_err(|e| malformed(&e.to_string()))?;
        let resource_json =
            String::from_utf8(plaintext).map_err(|_| malformed("the resource is not UTF-8"))?;
        Ok(V3Notify {
            event_type: notify["event_type"].as_str().unwrap_or_default().to_string(),
            resource_json,
        })
    }

    /// APIv2 notify: the `sign` over every other received field, with the
    /// merchant's own sign type.
    pub fn verify_v2(&self, xml: &str) -> Result<Vec<(String, String)>, VerifyError> {
        let key =
            self.apiv2_key.as_ref().ok_or(VerifyError::NotConfigured("WECHATPAY_APIV2_KEY is not set"))?;
        let fields = flat_xml(xml).map_err(VerifyError::Malformed)?;
        let sign = field(&fields, "sign").ok_or(VerifyError::BadSignature)?;
        let sign_type = V2SignType::parse(field(&fields, "sign_type").as_deref())
            .ok_or_else(|| VerifyError::Malformed("unknown sign_type".into()))?;
        if sign_type != self.apiv2_sign_type
            || !v2::sign_matches(&fields, key.expose_secret(), sign_type, &sign)
        {
            return Err(VerifyError::BadSignature);
        }
        Ok(fields)
    }

    /// APIv2 refund notify: `return_code` SUCCESS and `req_info`, opened with
    /// the APIv2 key (it is not signed: only WeChat Pay and the merchant can
    /// seal it). Returns the outer fields (`appid`, `mch_id`, …) then the
    /// refund's, `req_info` itself left out.
    pub fn open_refund_v2(&self, xml: &str) -> Result<Vec<(String, String)>, VerifyError> {
        let key =
            self.apiv2_key.as_ref().ok_or(VerifyError::NotConfigured("WECHATPAY_APIV2_KEY is not set"))?;
        let outer = flat_xml(xml).map_err(VerifyError::Malformed)?;
        if field(&outer, "return_code").as_deref() != Some("SUCCESS") {
            return Err(VerifyError::Malformed("the refund notify does not report SUCCESS".into()));
        }
        let sealed =
            field(&outer, "req_info").ok_or_else(|| VerifyError::Malformed("req_info is missing".into()))?;
        let inner = v2::open_req_info(&sealed, key.expose_secret()).map_err(|_| VerifyError::BadSignature)?;
        let inner = flat_xml(&inner).map_err(|_| VerifyError::BadSignature)?;
        // Only the envelope's own fields from outside: the refund's are the sealed ones (the outer XML is not signed).
        const ENVELOPE: [&str; 5] = ["return_code", "return_msg", "appid", "mch_id", "nonce_str"];
        let mut fields: Vec<(String, String)> =
            outer.into_iter().filter(|(k, _)| ENVELOPE.contains(&k.as_str())).collect();
        fields.extend(inner);
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::pay::PlatformKeys;
    use crate::wechat::pay::v2::v2_sign;
    use crate::wechat::pay::v3::{private_key_from_pem, public_key_from_pem, rsa_sign, v3_encrypt};
    use crate::wechat::test_support::fixture;
    use crate::wechat::unix_now;
    use secrecy::SecretBox;

    const APIV3_KEY: &[u8; 32] = b"a7cde1ZJB1kG2e7VfTs3jQzaWizur8Gb";
    const KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000000";

    fn keys() -> PayNotifyKeys {
        let mut platform = PlatformKeys::default();
        platform.insert(KEY_ID, public_key_from_pem(&fixture("wechatpay_platform_test_pub.pem")).unwrap());
        PayNotifyKeys {
            apiv3_key: Some(SecretBox::new(Box::new(*APIV3_KEY))),
            platform: LiveKeys::new(platform),
            apiv2_key: Some("192006250b4c09247ec02edce69f6a2d".to_string().into()),
            apiv2_sign_type: V2SignType::Md5,
        }
    }

    /// A notify as WeChat Pay sends it: encrypted resource, signed body.
    fn notify(resource: &str, timestamp: i64, signer: &str) -> (SignatureHeaders, Vec<u8>) {
        let ciphertext = v3_encrypt(APIV3_KEY, "fdasflkja484", "transaction", resource.as_bytes()).unwrap();
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
        let headers = SignatureHeaders {
            timestamp: timestamp.to_string(),
            nonce: nonce.into(),
            signature: rsa_sign(&key, &v3::signed_message(&timestamp.to_string(), nonce, &body)),
            serial: KEY_ID.into(),
        };
        (headers, body)
    }

    #[test]
    fn a_signed_v3_notify_verifies_and_its_resource_decrypts() {
        let resource = r#"{"out_trade_no":"WX1","trade_state":"SUCCESS","amount":{"total":990}}"#;
        let (h, body) = notify(resource, unix_now(), "wechatpay_platform_test_key.pem");
        let out = keys().verify_v3(&h, &body, unix_now()).unwrap();
        assert_eq!((out.event_type.as_str(), out.resource_json.as_str()), ("TRANSACTION.SUCCESS", resource));
    }

    #[test]
    fn forged_stale_probing_and_unknown_key_notifies_are_refused() {
        let (c, now) = (keys(), unix_now());
        let (h, body) = notify("{}", now, "merchant_test_key.pem");
        assert_eq!(c.verify_v3(&h, &body, now), Err(VerifyError::BadSignature));

        let (h, mut body) = notify("{}", now, "wechatpay_platform_test_key.pem");
        body[5] ^= 1;
        assert_eq!(c.verify_v3(&h, &body, now), Err(VerifyError::BadSignature));

        let (h, body) = notify("{}", now - 300, "wechatpay_platform_test_key.pem");
        assert_eq!(c.verify_v3(&h, &body, now), Err(VerifyError::StaleTimestamp));
        let (h, body) = notify("{}", now + 400, "wechatpay_platform_test_key.pem");
        assert_eq!(c.verify_v3(&h, &body, now), Err(VerifyError::StaleTimestamp));

        let (mut h, body) = notify("{}", now, "wechatpay_platform_test_key.pem");
        h.signature = format!("WECHATPAY/SIGNTEST/{}", h.signature);
        assert_eq!(c.verify_v3(&h, &body, now), Err(VerifyError::SignatureProbe));

        let (mut h, body) = notify("{}", now, "wechatpay_platform_test_key.pem");
        h.serial = "PUB_KEY_ID_SOMEONE_ELSE".into();
        assert!(matches!(c.verify_v3(&h, &body, now), Err(VerifyError::UnknownKey(_))));

        let unconfigured = PayNotifyKeys { apiv3_key: None, ..keys() };
        assert!(matches!(unconfigured.verify_v3(&h, &body, now), Err(VerifyError::NotConfigured(_))));
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
            let inner: String = fields.iter().map(|(k, v)| format!("<{k}><![CDATA[{v}]]></{k}>")).collect();
            format!("<xml>{inner}</xml>")
        };
        let c = keys();
        let got = c.verify_v2(&xml(&fields)).unwrap();
        assert!(got.contains(&("total_fee".to_string(), "990".to_string())));

        let mut tampered = fields.clone();
        tampered[6].1 = "1".into();
        assert_eq!(c.verify_v2(&xml(&tampered)), Err(VerifyError::BadSignature));
        let mut extra = fields.clone();
        extra.insert(0, ("attach".into(), "x".into()));
        assert_eq!(c.verify_v2(&xml(&extra)), Err(VerifyError::BadSignature));
        // Correctly signed, but with another sign type than the merchant's.
        let mut other: Vec<(String, String)> = fields[..fields.len() - 1].to_vec();
        other.push(("sign_type".into(), "HMAC-SHA256".into()));
        let sign = v2_sign(&other, key, V2SignType::HmacSha256);
        other.push(("sign".into(), sign));
        assert_eq!(c.verify_v2(&xml(&other)), Err(VerifyError::BadSignature));
        let unsigned: Vec<_> = fields.iter().filter(|(k, _)| k != "sign").cloned().collect();
        assert_eq!(c.verify_v2(&xml(&unsigned)), Err(VerifyError::BadSignature));
        for bad in ["<xml><a>1</xml>", "<!DOCTYPE x [<!ENTITY e \"e\">]><xml><a>&e;</a></xml>", "nope"] {
            assert!(matches!(c.verify_v2(bad), Err(VerifyError::Malformed(_))), "{bad}");
        }
    }
}
