//! WeChat Pay APIv2: XML messages signed with the APIv2 key (MD5 or
//! HMAC-SHA256 over the sorted fields), times in China Standard Time, and
//! its error codes under their APIv3 names.

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

    #[test]
    fn times_read_back_in_china_standard_time() {
        assert_eq!(parse_time("20141030133525"), Some(1_414_647_325));
        assert_eq!(format_time(1_414_647_325), "20141030133525");
        assert_eq!(parse_time("2014-10-30"), None);
    }
}
