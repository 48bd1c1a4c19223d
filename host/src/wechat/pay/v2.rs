//! WeChat Pay APIv2: XML messages signed with the APIv2 key (MD5 or
//! HMAC-SHA256 over the sorted fields), the refund notify's `req_info`
//! (AES-256-ECB under the MD5 of the APIv2 key), times in China Standard
//! Time, and its error codes under their APIv3 names.

use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha2::Sha256;

use super::CST;

/// How an APIv2 message is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2SignType {
    Md5,
    HmacSha256,
}

impl V2SignType {
    /// The name in `sign_type`.
    pub fn name(self) -> &'static str {
        match self {
            V2SignType::Md5 => "MD5",
            V2SignType::HmacSha256 => "HMAC-SHA256",
        }
    }

    pub fn parse(s: Option<&str>) -> Option<V2SignType> {
        match s {
            None | Some("MD5") | Some("") => Some(V2SignType::Md5),
            Some("HMAC-SHA256") => Some(V2SignType::HmacSha256),
            _ => None,
        }
    }
}

/// APIv2 `sign`: sort the fields, drop empty values and `sign` itself, join
/// `k=v` with `&`, append `&key=API_KEY`, digest, upper-case hex.
pub fn v2_sign(fields: &[(String, String)], api_key: &str, sign_type: V2SignType) -> String {
    let mut pairs: Vec<&(String, String)> =
        fields.iter().filter(|(k, v)| k != "sign" && !v.is_empty()).collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut text = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
    text.push_str("&key=");
    text.push_str(api_key);
    let digest = match sign_type {
        V2SignType::Md5 => Md5::digest(text.as_bytes()).to_vec(),
        V2SignType::HmacSha256 => {
            let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(api_key.as_bytes()).expect("any key length");
            mac.update(text.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
    };
    hex::encode_upper(digest)
}

/// Whether `given` (any case) is the `sign` of `fields`, compared in constant time.
pub fn sign_matches(fields: &[(String, String)], api_key: &str, sign_type: V2SignType, given: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let expected = v2_sign(fields, api_key, sign_type);
    expected.as_bytes().ct_eq(given.to_ascii_uppercase().as_bytes()).into()
}

/// Why a refund notify's `req_info` did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReqInfoError {
    #[error("req_info is not base64")]
    Base64,
    #[error("req_info does not decrypt with the APIv2 key (tampered, or another key)")]
    Decrypt,
}

/// The AES-256 key of `req_info`: the MD5 of the APIv2 key, as its 32 lowercase hex digits.
fn req_info_key(api_key: &str) -> [u8; 32] {
    let digest = hex::encode(Md5::digest(api_key.as_bytes()));
    digest.as_bytes().try_into().expect("an MD5 is 32 hex digits")
}

/// Opens an APIv2 refund notify's `req_info` (base64 of AES-256-ECB,
/// PKCS#7): the `<root>` XML inside. It carries no signature: only the
/// merchant and WeChat Pay hold the key, and what does not decrypt (its
/// padding and its XML) is refused.
pub fn open_req_info(req_info: &str, api_key: &str) -> Result<String, ReqInfoError> {
    use aes::cipher::{BlockDecryptMut as _, KeyInit as _, block_padding::Pkcs7};
    use base64::Engine as _;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(req_info.trim())
        .map_err(|_| ReqInfoError::Base64)?;
    let plain = ecb::Decryptor::<aes::Aes256>::new(&req_info_key(api_key).into())
        .decrypt_padded_vec_mut::<Pkcs7>(&sealed)
        .map_err(|_| ReqInfoError::Decrypt)?;
    String::from_utf8(plain).map_err(|_| ReqInfoError::Decrypt)
}

/// Seals `xml` as WeChat Pay seals `req_info` (the simulator plays it with this).
pub fn seal_req_info(xml: &str, api_key: &str) -> String {
    use aes::cipher::{BlockEncryptMut as _, KeyInit as _, block_padding::Pkcs7};
    use base64::Engine as _;
    let sealed = ecb::Encryptor::<aes::Aes256>::new(&req_info_key(api_key).into())
        .encrypt_padded_vec_mut::<Pkcs7>(xml.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sealed)
}

/// A refund's status (`refund_status`) under its APIv3 name.
pub fn v3_refund_status_of(v2_status: &str) -> Option<&'static str> {
    Some(match v2_status {
        "SUCCESS" => "SUCCESS",
        "PROCESSING" => "PROCESSING",
        "REFUNDCLOSE" => "CLOSED",
        "CHANGE" => "ABNORMAL",
        _ => return None,
    })
}

/// The inverse of [`v3_refund_status_of`].
pub fn v2_refund_status_of(v3_status: &str) -> &'static str {
    match v3_status {
        "SUCCESS" => "SUCCESS",
        "CLOSED" => "REFUNDCLOSE",
        "ABNORMAL" => "CHANGE",
        _ => "PROCESSING",
    }
}

/// APIv2's `yyyyMMddHHmmss`, China Standard Time.
pub fn parse_time(t: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year][month][day][hour][minute][second]");
    time::PrimitiveDateTime::parse(t, format).ok().map(|t| t.assume_offset(CST).unix_timestamp())
}

/// A Unix time as APIv2 writes it.
pub fn format_time(unix: i64) -> String {
    let format = time::macros::format_description!("[year][month][day][hour][minute][second]");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(CST)
        .format(&format)
        .unwrap_or_default()
}

/// APIv2 error codes under their APIv3 names, so plugins handle one vocabulary.
pub fn v3_code_of(v2_code: &str) -> String {
    match v2_code {
        "ORDERNOTEXIST" => "ORDER_NOT_EXIST",
        "ORDERCLOSED" => "ORDER_CLOSED",
        "SYSTEMERROR" => "SYSTEM_ERROR",
        "REFUNDNOTEXIST" => "RESOURCE_NOT_EXISTS",
        other => other,
    }
    .to_string()
}

/// The inverse of [`v3_code_of`] (the simulator answers APIv2 merchants with it).
pub fn v2_code_of(v3_code: &str) -> String {
    match v3_code {
        "ORDER_NOT_EXIST" => "ORDERNOTEXIST",
        "ORDER_CLOSED" => "ORDERCLOSED",
        "SYSTEM_ERROR" => "SYSTEMERROR",
        "RESOURCE_NOT_EXISTS" => "REFUNDNOTEXIST",
        other => other,
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wechat::test_support::vectors;

    #[test]
    fn v2_signatures_match_the_sdk_vectors() {
        for v in vectors()["pay_v2_sign"].as_array().unwrap() {
            let key = v["api_key"].as_str().unwrap();
            let fields: Vec<(String, String)> = v["params"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            assert_eq!(v2_sign(&fields, key, V2SignType::Md5), v["md5"].as_str().unwrap());
            assert_eq!(v2_sign(&fields, key, V2SignType::HmacSha256), v["hmac_sha256"].as_str().unwrap());
            // Empty values and a `sign` field do not count.
            let mut more = fields.clone();
            more.push(("attach".into(), String::new()));
            more.push(("sign".into(), "WHATEVER".into()));
            assert_eq!(v2_sign(&more, key, V2SignType::Md5), v["md5"].as_str().unwrap());
        }
    }

    /// go-pay/gopay `wechat/notify_test.go` `TestDecryptRefundNotifyReqInfo`
    /// (also silenceper/wechat `pay/notify/refund_test.go`): a refund notify's
    /// `req_info` and the APIv2 key it was sealed under.
    const GOPAY_KEY: &str = "ziR0QKsTUfMOuochC9RfCdmfHECorQAP";
    const GOPAY_REQ_INFO: &str = "YYwp8C48th0wnQzTqeI+41pflB26v+smFj9z6h9RPBgxTyZyxc+4YNEz7QEgZNWj/6rIb2MfyWMZmCc41CfjKSssoSZPXxOhUayb6KvNSZ1p6frOX1PDWzhyruXK7ouNND+gDsG4yZ0XXzsL4/pYNwLLba/71QrnkJ/BHcByk4EXnglju5DLup9pJQSnTxjomI9Rxu57m9jg5lLQFxMWXyeASZJNvof0ulnHlWJswS4OxKOkmW7VEyKyLGV6npoOm03Qsx2wkRxLsSa9gPpg4hdaReeUqh1FMbm7aWjyrVYT/MEZWg98p4GomEIYvz34XfDncTezX4bf/ZiSLXt79aE1/YTZrYfymXeCrGjlbe0rg/T2ezJHAC870u2vsVbY1/KcE2A443N+DEnAziXlBQ1AeWq3Rqk/O6/TMM0lomzgctAOiAMg+bh5+Gu1ubA9O3E+vehULydD5qx2o6i3+qA9ORbH415NyRrQdeFq5vmCiRikp5xYptWiGZA0tkoaLKMPQ4ndE5gWHqiBbGPfULZWokI+QjjhhBmwgbd6J0VqpRorwOuzC/BHdkP72DCdNcm7IDUpggnzBIy0+seWIkcHEryKjge3YDHpJeQCqrAH0CgxXHDt1xtbQbST1VqFyuhPhUjDXMXrknrGPN/oE1t0rLRq+78cI+k8xe5E6seeUXQsEe8r3358mpcDYSmXWSXVZxK6er9EF98APqHwcndyEJD2YyCh/mMVhERuX+7kjlRXSiNUWa/Cv/XAKFQuvUYA5ea2eYWtPRHa4DpyuF1SNsaqVKfgqKXZrJHfAgslVpSVqUpX4zkKszHF4kwMZO3M7J1P94Mxa7Tm9mTOJePOoHPXeEB+m9rX6pSfoi3mJDQ5inJ+Vc4gOkg/Wd/lqiy6TTyP/dHDN6/v+AuJx5AXBo/2NDD3fWhHjkqEKIuARr2ClZt9ZRQO4HkXdZo7CN06sGCHk48Tg8PmxnxKcMZm7Aoquv5yMIM2gWSWIRJhwJ8cUpafIHc+GesDlbF6Zbt+/KXkafJAQq2RklEN+WvZ/zFz113EPgWPjp16TwBoziq96MMekvWKY/vdhjol8VFtGH9F61Oy1Xwf6DJtPw==";

    #[test]
    fn a_refund_notifys_req_info_opens_as_the_sdk_vector_says_and_only_with_its_key() {
        let xml = open_req_info(GOPAY_REQ_INFO, GOPAY_KEY).unwrap();
        let fields = crate::wechat::xml::flat_xml(&xml).unwrap();
        let get = |k: &str| crate::wechat::xml::field(&fields, k).unwrap();
        assert_eq!(get("out_refund_no"), "50fd012ed1b311e7af7800163e32c503");
        assert_eq!(get("out_trade_no"), "4893e76d8c8b434cb64e9cd536338e33");
        assert_eq!(get("refund_id"), "50000404922017112502468056157");
        assert_eq!(get("transaction_id"), "4200000015201711256947025404");
        assert_eq!((get("refund_status").as_str(), get("refund_fee").as_str()), ("SUCCESS", "6"));
        assert_eq!(get("refund_recv_accout"), "支付用户零钱");
        assert_eq!(super::super::parse_cst_datetime(&get("success_time")), Some(1_511_595_377));
        assert_eq!(super::super::format_cst_datetime(1_511_595_377), "2017-11-25 15:36:17");

        assert_eq!(
            open_req_info(GOPAY_REQ_INFO, "another APIv2 key of 32 letters!"),
            Err(ReqInfoError::Decrypt)
        );
        assert_eq!(open_req_info("not base64 at all!", GOPAY_KEY), Err(ReqInfoError::Base64));
        let mut flipped =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, GOPAY_REQ_INFO).unwrap();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let flipped = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, flipped);
        assert_eq!(open_req_info(&flipped, GOPAY_KEY), Err(ReqInfoError::Decrypt), "the padding breaks");
        // Sealing is the inverse.
        assert_eq!(seal_req_info(&xml, GOPAY_KEY), GOPAY_REQ_INFO);
    }

    #[test]
    fn times_read_back_in_china_standard_time() {
        assert_eq!(parse_time("20141030133525"), Some(1_414_647_325));
        assert_eq!(format_time(1_414_647_325), "20141030133525");
        assert_eq!(parse_time("2014-10-30"), None);
    }
}
