//! WeChat's push XML: the fields of a message (the host parses what WeChat
//! sent, as it verifies it) and the passive replies this plugin builds.

#[cfg(test)]
use quick_xml::Reader;
use quick_xml::Writer;
use quick_xml::events::{BytesCData, BytesEnd, BytesStart, Event};

/// The leaf elements of a message, in document order.
#[derive(Debug, Default)]
pub struct Fields(Vec<(String, String)>);

/// The fields the host read from a verified push (`callback-crypto.verify-push`).
impl From<Vec<(String, String)>> for Fields {
    fn from(fields: Vec<(String, String)>) -> Self {
        Fields(fields)
    }
}

impl Fields {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
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

    /// The text of element `name` as an XML reader sees it (CDATA pieces joined).
    fn text_of(xml: &str, name: &str) -> Option<String> {
        let mut reader = Reader::from_str(xml);
        let (mut inside, mut text) = (false, None::<String>);
        loop {
            match reader.read_event().expect("well-formed") {
                Event::Start(e) if e.local_name().as_ref() == name => inside = true,
                Event::End(e) if e.local_name().as_ref() == name => inside = false,
                Event::CData(c) if inside => text.get_or_insert_default().push_str(&c.xml10_content()),
                Event::Text(t) if inside => text.get_or_insert_default().push_str(&t.xml10_content()),
                Event::Eof => return text,
                _ => {}
            }
        }
    }

    #[test]
    fn replies_round_trip_even_with_cdata_terminators() {
        let xml = build(&[("Content", Value::Text("x]]>y <b>")), ("CreateTime", Value::Number(7))]);
        assert_eq!(text_of(&xml, "Content").as_deref(), Some("x]]>y <b>"));
        assert_eq!(text_of(&xml, "CreateTime").as_deref(), Some("7"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(512),
            failure_persistence: None,
            ..Default::default()
        })]

        /// Any reply text survives building and reading unchanged.
        #[test]
        fn any_reply_text_round_trips(content in "\\PC{0,200}", time in proptest::prelude::any::<i64>()) {
            let xml = build(&[("Content", Value::Text(&content)), ("CreateTime", Value::Number(time))]);
            let time_text = time.to_string();
            proptest::prop_assert_eq!(text_of(&xml, "Content"), Some(content.clone()));
            proptest::prop_assert_eq!(text_of(&xml, "CreateTime"), Some(time_text));
        }
    }
}
