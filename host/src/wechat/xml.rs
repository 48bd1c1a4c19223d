//! The XML of WeChat's pushes and of WeChat Pay's APIv2: flat or shallow
//! `<xml>` documents of text fields. DOCTYPE and entity declarations are
//! refused outright, so no XXE or entity expansion can happen.

/// Most fields accepted in one message.
const MAX_FIELDS: usize = 100;

/// The fields of a flat `<xml>` message (APIv2): nothing nested.
pub fn flat_xml(xml: &str) -> Result<Vec<(String, String)>, String> {
    leaves(xml, 2)
}

/// The fields of a pushed message: the leaf elements, a few events nesting
/// one level deeper (`<xml><ScanCodeInfo><ScanType>` is 3).
pub fn push_xml(xml: &str) -> Result<Vec<(String, String)>, String> {
    leaves(xml, 4)
}

/// An APIv2 body: `<xml><field>value</field>…</xml>`, values escaped.
pub fn to_xml(fields: &[(String, String)]) -> String {
    let mut xml = String::from("<xml>");
    for (k, v) in fields {
        xml.push_str(&format!("<{k}>{}</{k}>", quick_xml::escape::escape(v.as_str())));
    }
    xml.push_str("</xml>");
    xml
}

/// The value of the first field called `name`.
pub fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// The leaf elements of one `<xml>` root, in document order, nested at most
/// `max_depth` deep.
fn leaves(xml: &str, max_depth: usize) -> Result<Vec<(String, String)>, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    // Open elements, and whether each has child elements (only leaves are fields).
    let mut open: Vec<(String, bool)> = Vec::new();
    let (mut fields, mut text, mut roots) = (Vec::new(), String::new(), 0);
    let name_of = |e: &quick_xml::events::BytesStart<'_>| e.local_name().into_inner().to_string();
    loop {
        match reader.read_event().map_err(|e| format!("malformed XML: {e}"))? {
            Event::DocType(_) => return Err("DOCTYPE and entity declarations are not accepted".into()),
            Event::Start(e) => {
                if open.is_empty() {
                    roots += 1;
                }
                if open.len() >= max_depth {
                    return Err("XML nested too deeply".into());
                }
                if let Some(parent) = open.last_mut() {
                    parent.1 = true;
                }
                open.push((name_of(&e), false));
                text.clear();
            }
            Event::Empty(e) => {
                if open.is_empty() {
                    roots += 1;
                } else {
                    fields.push((name_of(&e), String::new()));
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
    if fields.is_empty() {
        return Err("expected <xml> with fields".into());
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_with_cdata_entities_and_nesting_parses() {
        let f = push_xml(
            "<?xml version=\"1.0\"?><xml><ToUserName><![CDATA[gh_1]]></ToUserName><Content>a &amp; b &#x4f60;</Content>\
             <CreateTime>123</CreateTime><ScanCodeInfo><ScanType><![CDATA[qrcode]]></ScanType></ScanCodeInfo></xml>",
        )
        .unwrap();
        let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ToUserName"), Some("gh_1"));
        assert_eq!(get("Content"), Some("a & b 你"));
        assert_eq!(get("CreateTime"), Some("123"));
        assert_eq!(get("ScanType"), Some("qrcode"));
        assert!(
            flat_xml("<xml><ScanCodeInfo><ScanType>x</ScanType></ScanCodeInfo></xml>").is_err(),
            "APIv2 is flat"
        );
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
            assert!(push_xml(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn written_fields_read_back_with_their_special_characters() {
        let fields =
            vec![("body".to_string(), "a<b & \"c\"".to_string()), ("n".to_string(), "1".to_string())];
        assert_eq!(flat_xml(&to_xml(&fields)).unwrap(), fields);
    }
}
