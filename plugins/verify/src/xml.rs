//! WeChat's push XML: a flat `<xml>` of named fields (a few events nest one
//! level deeper). Parsed with quick-xml; DOCTYPE and entity declarations are
//! refused outright, so no XXE or entity expansion can happen.

use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesCData, BytesEnd, BytesStart, Event};

/// Deepest nesting accepted (`<xml><ScanCodeInfo><ScanType>` is 3).
const MAX_DEPTH: usize = 4;
/// Most fields accepted in one message.
const MAX_FIELDS: usize = 64;

/// The leaf elements of a message, in document order.
#[derive(Debug, Default)]
pub struct Fields(Vec<(String, String)>);

impl Fields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

pub fn parse(xml: &str) -> Result<Fields, String> {
    let reader = &mut Reader::from_str(xml);
    // Open elements, and whether each has child elements (only leaves are fields).
    let mut open: Vec<(String, bool)> = Vec::new();
    let mut fields = Vec::new();
    let mut text = String::new();
    let mut roots = 0;
    loop {
        let event = reader.read_event().map_err(|e| format!("malformed XML: {e}"))?;
        match event {
            Event::DocType(_) => return Err("DOCTYPE and entity declarations are not accepted".into()),
            Event::Start(e) => {
                if open.is_empty() {
                    roots += 1;
                }
                if open.len() >= MAX_DEPTH {
                    return Err("XML nested too deeply".into());
                }
                if let Some(parent) = open.last_mut() {
                    parent.1 = true;
                }
                open.push((name_of(&e)?, false));
                text.clear();
            }
            Event::Empty(e) => {
                if open.is_empty() {
                    roots += 1;
                } else {
                    fields.push((name_of(&e)?, String::new()));
                }
            }
            Event::End(_) => {
                let (name, has_children) = open.pop().ok_or("unbalanced end tag")?;
                if !open.is_empty() && !has_children {
                    fields.push((name, std::mem::take(&mut text)));
                }
                text.clear();
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::CData(c) => text.push_str(&c.xml10_content()),
            Event::GeneralRef(r) => match r.resolve_char_ref() {
                Ok(Some(c)) => text.push(c),
                Ok(None) => text.push_str(match &*r.into_inner() {
                    "lt" => "<",
                    "gt" => ">",
                    "amp" => "&",
                    "apos" => "'",
                    "quot" => "\"",
                    other => return Err(format!("unknown entity &{other};")),
                }),
                Err(e) => return Err(format!("bad character reference: {e}")),
            },
            Event::Eof => break,
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
        }
        if fields.len() > MAX_FIELDS {
            return Err("too many fields".into());
        }
    }
    if roots != 1 || !open.is_empty() {
        return Err("expected exactly one root element".into());
    }
    Ok(Fields(fields))
}

fn name_of(e: &BytesStart<'_>) -> Result<String, String> {
    Ok(e.local_name().into_inner().to_string())
}

/// `<xml>` with each field as a CDATA (or, for numbers, text) child.
pub fn build(fields: &[(&str, Value<'_>)]) -> String {
    let mut writer = Writer::new(Vec::new());
    let write = |w: &mut Writer<Vec<u8>>| -> std::io::Result<()> {
        w.write_event(Event::Start(BytesStart::new("xml")))?;
        for (name, value) in fields {
            w.write_event(Event::Start(BytesStart::new(*name)))?;
            match value {
                Value::Text(s) => {
                    for piece in BytesCData::escaped(s) {
                        w.write_event(Event::CData(piece))?;
                    }
                }
                Value::Number(n) => {
                    w.write_event(Event::Text(quick_xml::events::BytesText::new(&n.to_string())))?
                }
            }
            w.write_event(Event::End(BytesEnd::new(*name)))?;
        }
        w.write_event(Event::End(BytesEnd::new("xml")))
    };
    write(&mut writer).expect("writing to a Vec cannot fail");
    String::from_utf8(writer.into_inner()).expect("the writer writes UTF-8")
}

pub enum Value<'a> {
    Text(&'a str),
    Number(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_with_cdata_entities_and_nesting_parses() {
        let f = parse(
            "<?xml version=\"1.0\"?><xml><ToUserName><![CDATA[gh_1]]></ToUserName><Content>a &amp; b &#x4f60;</Content>\
             <CreateTime>123</CreateTime><ScanCodeInfo><ScanType><![CDATA[qrcode]]></ScanType></ScanCodeInfo></xml>",
        )
        .unwrap();
        assert_eq!(f.get("ToUserName"), Some("gh_1"));
        assert_eq!(f.get("Content"), Some("a & b 你"));
        assert_eq!(f.get("CreateTime"), Some("123"));
        assert_eq!(f.get("ScanType"), Some("qrcode"));
    }

    #[test]
    fn doctype_entities_and_broken_xml_are_refused() {
        for bad in [
            "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\">]><xml><C>&a;</C></xml>",
            "<!DOCTYPE xml SYSTEM \"file:///etc/passwd\"><xml/>",
            "<xml><C>&xxe;</C></xml>",
            "<xml><C>unclosed</xml>",
            "<xml></xml><xml></xml>",
            "",
            "not xml at all",
            "<a><b><c><d><e>deep</e></d></c></b></a>",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_round_trip_even_with_cdata_terminators() {
        let xml = build(&[("Content", Value::Text("x]]>y <b>")), ("CreateTime", Value::Number(7))]);
        let f = parse(&xml).unwrap();
        assert_eq!(f.get("Content"), Some("x]]>y <b>"));
        assert_eq!(f.get("CreateTime"), Some("7"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
            failure_persistence: None,
            ..Default::default()
        })]

        /// Whatever WeChat (or anyone) posts: fields or a clean error, never a panic.
        #[test]
        fn any_text_parses_or_is_refused_cleanly(text in "(<xml>|</xml>|<[A-Za-z]{1,6}>|</[A-Za-z]{1,6}>|<!\\[CDATA\\[|\\]\\]>|&[a-z#0-9]{0,6};|<!DOCTYPE|[^<&]{0,10}){0,30}") {
            let _ = parse(&text);
        }

        /// Any reply text survives building and parsing unchanged.
        #[test]
        fn any_reply_text_round_trips(content in "\\PC{0,200}", time in proptest::prelude::any::<i64>()) {
            let xml = build(&[("Content", Value::Text(&content)), ("CreateTime", Value::Number(time))]);
            let f = parse(&xml).unwrap();
            let time_text = time.to_string();
            proptest::prop_assert_eq!(f.get("Content"), Some(content.as_str()));
            proptest::prop_assert_eq!(f.get("CreateTime"), Some(time_text.as_str()));
        }
    }
}
