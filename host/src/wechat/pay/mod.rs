//! WeChat Pay's protocol: APIv2 ([`v2`]), APIv3 ([`v3`]), the checks of
//! the notifies both send ([`notify`]) and the daily trade bill ([`bill`]).

pub mod bill;
pub mod certificates;
pub mod notify;
pub mod v2;
pub mod v3;

pub use notify::PayNotifyKeys;
pub use v2::V2SignType;
pub use v3::{LiveKeys, PlatformKeys, RsaSigner, SignatureError, SignatureHeaders};

/// China Standard Time, in which WeChat Pay writes times.
pub const CST: time::UtcOffset = time::macros::offset!(+8);

/// A Unix time as APIv3 writes it: RFC 3339 in China Standard Time.
pub fn rfc3339_cst(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(CST)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// An RFC 3339 time (APIv3) as a Unix time.
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// WeChat Pay's `yyyy-MM-dd HH:mm:ss` in China Standard Time (bills, APIv2
/// refund notifies and queries) as a Unix time.
pub fn parse_cst_datetime(t: &str) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::PrimitiveDateTime::parse(t, format).ok().map(|t| t.assume_offset(CST).unix_timestamp())
}

/// A Unix time as [`parse_cst_datetime`] reads it.
pub fn format_cst_datetime(unix: i64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp(unix)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(CST)
        .format(&format)
        .unwrap_or_default()
}

/// A day as WeChat Pay's bills name it (`YYYY-MM-DD`, China Standard Time).
pub fn parse_day(day: &str) -> Option<time::Date> {
    time::Date::parse(day, time::macros::format_description!("[year]-[month]-[day]")).ok()
}

/// The name of `day` as [`parse_day`] reads it.
pub fn day_name(day: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", day.year(), u8::from(day.month()), day.day())
}

/// Today in China Standard Time.
pub fn today_cst() -> time::Date {
    time::OffsetDateTime::now_utc().to_offset(CST).date()
}

/// `[start, end)` of `day` in Unix seconds.
pub fn day_bounds(day: time::Date) -> (i64, i64) {
    let start = day.midnight().assume_offset(CST).unix_timestamp();
    (start, start + 86_400)
}

/// Random upper-case letters and digits: nonces (`nonce_str`, `Wechatpay-Nonce`).
pub fn random_token(len: usize) -> String {
    use rand::Rng as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// Whether an `out_trade_no` (or `out_refund_no`) is one WeChat Pay accepts:
/// 6-32 letters, digits or `_-|*`.
pub fn is_merchant_order_no(no: &str) -> bool {
    (6..=32).contains(&no.len()) && no.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-|*".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apiv3_times_are_written_in_china_standard_time_and_read_back() {
        assert_eq!(rfc3339_cst(1_414_647_325), "2014-10-30T13:35:25+08:00");
        assert_eq!(parse_rfc3339("2014-10-30T13:35:25+08:00"), Some(1_414_647_325));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn a_bills_day_is_named_read_and_bounded_in_china_standard_time() {
        let day = parse_day("2019-02-19").unwrap();
        assert_eq!(day_name(day), "2019-02-19");
        // 2019-02-19 00:00 +08:00 is 2019-02-18 16:00 UTC.
        assert_eq!(day_bounds(day), (1_550_505_600, 1_550_592_000));
        assert_eq!(parse_cst_datetime("2019-02-19 05:01:46"), Some(1_550_523_706));
        assert_eq!(format_cst_datetime(1_550_523_706), "2019-02-19 05:01:46");
        for bad in ["20190219", "2019-2-19", "2019-02-30", ""] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn merchant_order_numbers_are_6_to_32_safe_characters() {
        assert!(is_merchant_order_no("WX20241201_ab-c|*"));
        for bad in ["short", &"x".repeat(33), "has space", "中文订单号码"] {
            assert!(!is_merchant_order_no(bad), "{bad}");
        }
    }
}
