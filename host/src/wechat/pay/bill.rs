//! WeChat Pay's trade bill (交易账单) of one day, `bill_type=ALL`: the file
//! APIv3's `tradebill` points at and APIv2's `downloadbill` answers with.
//!
//! A header line of Chinese column names, one line per payment or refund
//! whose every field starts with a backtick (so spreadsheets keep long
//! numbers as text), then a summary header (`总交易单数,…`) and its line.
//! Amounts are yuan (`0.01`, also `45.0`). A refund's line is dated when the
//! refund was asked for and carries its state as of the bill (a refund still
//! on its way is PROCESSING there for good). Columns are found by name, so a
//! bill with columns added or moved, or in the older layout (`总金额`), still
//! reads. The summary must agree with the lines: a bill cut short is refused.

use sha1::Digest as _;

/// One line of the bill: a payment, or a refund of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillLine {
    /// Unix seconds (the bill writes China Standard Time).
    pub trade_time: i64,
    pub appid: String,
    pub mchid: String,
    pub transaction_id: String,
    pub out_trade_no: String,
    pub openid: String,
    pub trade_type: String,
    /// SUCCESS, REFUND, REVOKED, ...
    pub trade_state: String,
    /// The order's total (订单金额; 应结订单金额 in bills without it), in
    /// fen; 0 on a refund's line.
    pub amount_fen: i64,
    pub refund: Option<BillRefund>,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillRefund {
    pub refund_id: String,
    pub out_refund_no: String,
    /// What was asked back (申请退款金额; 退款金额 in bills without it), in fen.
    pub amount_fen: i64,
    /// SUCCESS, PROCESSING, CHANGE, ...
    pub status: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BillError {
    #[error("the bill has no header line")]
    NoHeader,
    #[error("the bill has no `{0}` column")]
    MissingColumn(&'static str),
    #[error("line {line}: {why}")]
    BadLine { line: usize, why: String },
    #[error("the bill ends before its summary (cut short?)")]
    NoSummary,
    #[error("the summary says {0}, the lines do not")]
    SummaryDisagrees(String),
}

/// Whether `body` is the file a signed answer's `hash_value` names (SHA-1,
/// hex in either case), compared in constant time.
pub fn sha1_matches(body: &[u8], hash_hex: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let Ok(expected) = hex::decode(hash_hex.trim()) else { return false };
    let actual = sha1::Sha1::digest(body);
    expected.len() == actual.len() && bool::from(expected.ct_eq(&actual))
}

/// The header of the columns this reads and [`write`] writes, as WeChat Pay
/// writes it for `bill_type=ALL`.
pub const HEADER: [&str; 27] = [
    "交易时间",
    "公众账号ID",
    "商户号",
    "特约商户号",
    "设备号",
    "微信订单号",
    "商户订单号",
    "用户标识",
    "交易类型",
    "交易状态",
    "付款银行",
    "货币种类",
    "应结订单金额",
    "代金券金额",
    "微信退款单号",
    "商户退款单号",
    "退款金额",
    "充值券退款金额",
    "退款类型",
    "退款状态",
    "商品名称",
    "商户数据包",
    "手续费",
    "费率",
    "订单金额",
    "申请退款金额",
    "费率备注",
];

const SUMMARY_HEADER: &str = "总交易单数";

/// Reads a bill's payment and refund lines.
pub fn parse(text: &str) -> Result<Vec<BillLine>, BillError> {
    let mut lines =
        text.trim_start_matches('\u{feff}').lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or(BillError::NoHeader)?;
    let names: Vec<&str> = header.split(',').map(|n| n.trim().trim_start_matches('`')).collect();
    let column = |name: &'static str| names.iter().position(|n| *n == name);
    let need = |name: &'static str| column(name).ok_or(BillError::MissingColumn(name));
    let at = Columns {
        time: need("交易时间")?,
        appid: need("公众账号ID")?,
        mchid: need("商户号")?,
        transaction_id: need("微信订单号")?,
        out_trade_no: need("商户订单号")?,
        openid: column("用户标识"),
        trade_type: column("交易类型"),
        state: need("交易状态")?,
        total: column("订单金额").or_else(|| column("应结订单金额")).map_or_else(|| need("总金额"), Ok)?,
        refund_id: need("微信退款单号")?,
        out_refund_no: need("商户退款单号")?,
        refund_amount: column("申请退款金额").map_or_else(|| need("退款金额"), Ok)?,
        refund_status: need("退款状态")?,
        description: column("商品名称"),
    };
    let mut out = Vec::new();
    let mut summary = None;
    while let Some((index, line)) = lines.next() {
        let number = index + 1;
        if line.trim_start_matches('`').starts_with(SUMMARY_HEADER) {
            summary = Some((line, lines.next().map(|(_, l)| l).ok_or(BillError::NoSummary)?));
            break;
        }
        // Every field starts with a backtick, so ",`" separates fields even
        // where a product name holds a comma.
        let fields: Vec<&str> = line.trim_end_matches('\r').trim_start_matches('`').split(",`").collect();
        if fields.len() < names.len() {
            return Err(BillError::BadLine {
                line: number,
                why: format!("{} fields for {} columns", fields.len(), names.len()),
            });
        }
        out.push(at.read(&fields).map_err(|why| BillError::BadLine { line: number, why })?);
    }
    let (header, totals) = summary.ok_or(BillError::NoSummary)?;
    check_summary(header, totals, &out)?;
    Ok(out)
}

/// The summary's count and totals against the lines read (an APIv2 bill has
/// no hash: this is what tells a whole bill from a cut one).
fn check_summary(header: &str, totals: &str, lines: &[BillLine]) -> Result<(), BillError> {
    let names: Vec<&str> = header.split(',').map(|n| n.trim().trim_start_matches('`')).collect();
    let values: Vec<&str> = totals.split(',').map(|v| v.trim().trim_start_matches('`')).collect();
    let value = |name: &str| names.iter().position(|n| *n == name).and_then(|i| values.get(i).copied());
    let count = value(SUMMARY_HEADER).and_then(yuan_to_fen).filter(|c| c % 100 == 0).map(|c| c / 100);
    if count != Some(lines.len() as i64) {
        return Err(BillError::SummaryDisagrees(format!(
            "{:?} lines, there are {}",
            value(SUMMARY_HEADER),
            lines.len()
        )));
    }
    let sums = [
        ("订单总金额", lines.iter().map(|l| l.amount_fen).sum::<i64>()),
        ("申请退款总金额", lines.iter().filter_map(|l| l.refund.as_ref()).map(|r| r.amount_fen).sum()),
    ];
    for (name, sum) in sums {
        if let Some(total) = value(name).filter(|total| yuan_to_fen(total) != Some(sum)) {
            return Err(BillError::SummaryDisagrees(format!(
                "{name} {total}, the lines add up to {}",
                fen_to_yuan(sum)
            )));
        }
    }
    Ok(())
}

struct Columns {
    time: usize,
    appid: usize,
    mchid: usize,
    transaction_id: usize,
    out_trade_no: usize,
    openid: Option<usize>,
    trade_type: Option<usize>,
    state: usize,
    total: usize,
    refund_id: usize,
    out_refund_no: usize,
    refund_amount: usize,
    refund_status: usize,
    description: Option<usize>,
}

impl Columns {
    fn read(&self, f: &[&str]) -> Result<BillLine, String> {
        let text = |i: usize| f[i].trim().to_string();
        let maybe = |i: Option<usize>| i.map(text).unwrap_or_default();
        let trade_time = super::parse_cst_datetime(f[self.time].trim())
            .ok_or_else(|| format!("交易时间 `{}` is not a time", f[self.time]))?;
        let amount =
            |i: usize| yuan_to_fen(f[i].trim()).ok_or_else(|| format!("`{}` is not an amount in yuan", f[i]));
        let trade_state = text(self.state);
        let out_refund_no = text(self.out_refund_no);
        // Payment lines write 0 in the refund columns.
        let refund = if trade_state == "REFUND" || !(out_refund_no.is_empty() || out_refund_no == "0") {
            Some(BillRefund {
                refund_id: text(self.refund_id),
                out_refund_no,
                amount_fen: amount(self.refund_amount)?,
                status: text(self.refund_status),
            })
        } else {
            None
        };
        Ok(BillLine {
            trade_time,
            appid: text(self.appid),
            mchid: text(self.mchid),
            transaction_id: text(self.transaction_id),
            out_trade_no: text(self.out_trade_no),
            openid: maybe(self.openid),
            trade_type: maybe(self.trade_type),
            trade_state,
            amount_fen: amount(self.total)?,
            refund,
            description: maybe(self.description),
        })
    }
}

/// `12.30` yuan as 1230 fen, exactly (no floating point); at most two decimals.
pub fn yuan_to_fen(text: &str) -> Option<i64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || fraction.len() > 2 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let cents: i64 = format!("{fraction:0<2}").parse().ok()?;
    whole.parse::<i64>().ok()?.checked_mul(100)?.checked_add(cents)
}

fn fen_to_yuan(fen: i64) -> String {
    format!("{}.{:02}", fen / 100, fen % 100)
}

/// A bill as WeChat Pay writes it (the simulator serves this).
pub fn write(lines: &[BillLine]) -> String {
    let mut out = HEADER.join(",");
    out.push_str("\r\n");
    let (mut paid, mut refunded) = (0i64, 0i64);
    for l in lines {
        let (refund_id, out_refund_no, refund_fen, refund_status) = match &l.refund {
            Some(r) => (r.refund_id.as_str(), r.out_refund_no.as_str(), r.amount_fen, r.status.as_str()),
            None => ("0", "0", 0, ""),
        };
        let refund_type = if l.refund.is_some() { "ORIGINAL" } else { "" };
        // A refund's line has 0 in both order amounts.
        let settled = if l.refund.is_some() { 0 } else { l.amount_fen };
        paid += settled;
        refunded += refund_fen;
        let fields = [
            super::format_cst_datetime(l.trade_time),
            l.appid.clone(),
            l.mchid.clone(),
            "0".into(),
            String::new(),
            l.transaction_id.clone(),
            l.out_trade_no.clone(),
            l.openid.clone(),
            l.trade_type.clone(),
            l.trade_state.clone(),
            "OTHERS".into(),
            "CNY".into(),
            fen_to_yuan(settled),
            "0.00".into(),
            refund_id.into(),
            out_refund_no.into(),
            fen_to_yuan(refund_fen),
            "0.00".into(),
            refund_type.into(),
            refund_status.into(),
            l.description.clone(),
            String::new(),
            "0.00000".into(),
            "0.60%".into(),
            fen_to_yuan(settled),
            fen_to_yuan(refund_fen),
            String::new(),
        ];
        out.push('`');
        out.push_str(&fields.join(",`"));
        out.push_str("\r\n");
    }
    out.push_str(
        "总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\r\n",
    );
    let summary = [
        lines.len().to_string(),
        fen_to_yuan(paid),
        fen_to_yuan(refunded),
        "0.00".into(),
        "0.00000".into(),
        fen_to_yuan(lines.iter().map(|l| l.amount_fen).sum()),
        fen_to_yuan(refunded),
    ];
    out.push('`');
    out.push_str(&summary.join(",`"));
    out.push_str("\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuan_amounts_become_exact_fen_and_anything_else_is_refused() {
        assert_eq!(yuan_to_fen("0.01"), Some(1));
        assert_eq!(yuan_to_fen("12.3"), Some(1230));
        assert_eq!(yuan_to_fen("39.90"), Some(3990));
        assert_eq!(yuan_to_fen("100"), Some(10_000));
        for bad in ["", ".5", "1.234", "-1.00", "1,00", "abc", "1.x"] {
            assert_eq!(yuan_to_fen(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_files_sha1_is_checked_against_the_signed_hash_in_either_case() {
        // SHA-1 of "abc" (FIPS 180-1's test vector).
        assert!(sha1_matches(b"abc", "a9993e364706816aba3e25717850c26c9cd0d89d"));
        assert!(sha1_matches(b"abc", "A9993E364706816ABA3E25717850C26C9CD0D89D"));
        assert!(!sha1_matches(b"abd", "a9993e364706816aba3e25717850c26c9cd0d89d"));
        assert!(!sha1_matches(b"abc", "not hex"));
        assert!(!sha1_matches(b"abc", ""));
    }

    /// Two lines of wechatpay-apiv3/wechatpay-php `tests/fixtures/bill.ALL.csv`
    /// (its `DownloadbillTest`), a bill as WeChat Pay writes it: a BOM, CRLF,
    /// a refund line and a payment line; the summary is that file's, its
    /// figures recomputed for these two lines (`2.0` written as it writes `45.0`).
    const SDK_BILL: &str = "\u{feff}交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注\r\n\
`2019-02-19 05:01:46,`wxab8acd895ab1638a,`1921000401,`0,`harryma007,`4200000263201902167700134212,`autotest_20190216081946_82335,`oHkLxtx0vUqe-18p_AXTZ1innxkCY,`JSAPI,`REFUND,`OTHERS,`CNY,`0.00,`0.00,`50000709672019011908420787722,`REF4200000263201902167700963919,`0.01,`0.00,`ORIGINAL,`SUCCESS,`系统拨测-cheeryin-test_micropay_succ,`,`0.00000,`39.00%,`0.00,`0.01,`\r\n\
`2019-02-19 01:52:32,`wxab8acd895ab1638a,`1921000401,`0,`,`4200000263201902167700134902,`autotest_20190219015232_89201,`wxab8acb865bb1637e,`NATIVE,`SUCCESS,`OTHERS,`CNY,`0.03,`0.00,`0,`0,`0.00,`0.00,`,`,`autotest,`,`0.01000,`39.00%,`0.03,`0.00,`\r\n\
总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\r\n\
`2.0,`0.03,`0.01,`0.0,`0.01,`0.03,`0.01\r\n";

    #[test]
    fn a_bill_as_the_sdk_tests_have_it_reads_as_one_refund_and_one_payment() {
        let lines = parse(SDK_BILL).unwrap();
        assert_eq!(lines.len(), 2);
        let (refund, payment) = (&lines[0], &lines[1]);
        assert_eq!(refund.trade_time, 1_550_523_706, "2019-02-19 05:01:46 in China Standard Time");
        assert_eq!(
            (refund.appid.as_str(), refund.mchid.as_str(), refund.trade_state.as_str(), refund.amount_fen),
            ("wxab8acd895ab1638a", "1921000401", "REFUND", 0)
        );
        assert_eq!(refund.out_trade_no, "autotest_20190216081946_82335");
        assert_eq!(
            refund.refund,
            Some(BillRefund {
                refund_id: "50000709672019011908420787722".into(),
                out_refund_no: "REF4200000263201902167700963919".into(),
                amount_fen: 1,
                status: "SUCCESS".into(),
            })
        );
        assert_eq!(payment.trade_time, 1_550_512_352);
        assert_eq!(
            (payment.transaction_id.as_str(), payment.out_trade_no.as_str()),
            ("4200000263201902167700134902", "autotest_20190219015232_89201")
        );
        assert_eq!((payment.trade_type.as_str(), payment.trade_state.as_str()), ("NATIVE", "SUCCESS"));
        assert_eq!((payment.amount_fen, &payment.refund), (3, &None));
        // The same bill with LF line ends and no BOM reads the same.
        assert_eq!(parse(&SDK_BILL.replace("\r\n", "\n").replace('\u{feff}', "")).unwrap(), lines);
    }

    #[test]
    fn what_the_simulator_writes_reads_back_line_for_line() {
        let payment = BillLine {
            trade_time: 1_733_500_000,
            appid: "wx8888888888888888".into(),
            mchid: "1900000109".into(),
            transaction_id: "4200000001202412061234567890".into(),
            out_trade_no: "1733499990abcdef01".into(),
            openid: "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o".into(),
            trade_type: "JSAPI".into(),
            trade_state: "SUCCESS".into(),
            amount_fen: 3990,
            refund: None,
            description: "50 次识别, 月卡".into(),
        };
        let refund = BillLine {
            trade_time: 1_733_503_600,
            trade_state: "REFUND".into(),
            amount_fen: 0,
            refund: Some(BillRefund {
                refund_id: "50000000382019052709732678859".into(),
                out_refund_no: "R1733503600a".into(),
                amount_fen: 1000,
                status: "SUCCESS".into(),
            }),
            ..payment.clone()
        };
        let lines = vec![payment, refund];
        assert_eq!(parse(&write(&lines)).unwrap(), lines);
        assert_eq!(parse(&write(&[])).unwrap(), []);
    }

    #[test]
    fn a_bill_cut_short_or_whose_summary_disagrees_is_refused_and_the_older_layout_reads() {
        let (body, summary) = SDK_BILL.split_at(SDK_BILL.find("总交易单数").unwrap());
        assert_eq!(parse(body), Err(BillError::NoSummary));
        assert_eq!(parse(&format!("{body}{}", summary.lines().next().unwrap())), Err(BillError::NoSummary));
        let one_line_less = SDK_BILL.replacen(SDK_BILL.lines().nth(2).unwrap(), "", 1);
        assert!(matches!(parse(&one_line_less), Err(BillError::SummaryDisagrees(_))), "{one_line_less}");
        let other_total = SDK_BILL.replace("`0.03,`0.01\r\n", "`0.04,`0.01\r\n");
        assert!(
            matches!(parse(&other_total), Err(BillError::SummaryDisagrees(why)) if why.contains("订单总金额"))
        );
        // Merchants still on the older layout: `总金额` is the order's total.
        let older = "交易时间,公众账号ID,商户号,子商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,总金额,代金券或立减优惠金额,微信退款单号,商户退款单号,退款金额,代金券或立减优惠退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率\n\
`2014-11-10 16:33:45,`wx2421b1c4370ec43b,`10000100,`0,`1000,`1001690740201411100005734289,`1415640626,`085e9858e3ba5186aafcbaed1,`MICROPAY,`SUCCESS,`OTHERS,`CNY,`0.01,`0.0,`0,`0,`0,`0,`,`,`被扫支付测试,`订单额外描述,`0,`0.60%\n\
总交易单数,总交易额,总退款金额,总代金券或立减优惠退款金额,手续费总金额\n\
`1,`0.01,`0.0,`0.0,`0\n";
        let lines = parse(older).unwrap();
        assert_eq!((lines[0].amount_fen, lines[0].trade_type.as_str()), (1, "MICROPAY"));
    }

    #[test]
    fn a_bill_missing_a_column_or_with_a_broken_line_is_refused_by_line() {
        assert_eq!(parse(""), Err(BillError::NoHeader));
        assert_eq!(parse("交易时间,公众账号ID\r\n"), Err(BillError::MissingColumn("商户号")));
        let header = HEADER.join(",");
        let short = format!("{header}\r\n`2024-12-06 10:00:00,`wx1\r\n");
        assert!(matches!(parse(&short), Err(BillError::BadLine { line: 2, .. })));
        let mut fields = vec!["`0"; HEADER.len()];
        fields[0] = "`yesterday";
        let bad_time = format!("{header}\r\n{}\r\n", fields.join(","));
        assert!(
            matches!(parse(&bad_time), Err(BillError::BadLine { line: 2, ref why }) if why.contains("交易时间"))
        );
    }
}
