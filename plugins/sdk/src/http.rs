//! Requests and responses as the host passes them, with the helpers a
//! handler needs (parameters, headers, query, JSON, bearer token).

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::bindings::wxhost::plugin::types::{Request, Response};
use crate::{Error, Result};

const JSON: &str = "application/json; charset=utf-8";

impl Request {
    /// A path parameter of the matched route (`scene` of `/qrcode/{scene}`).
    /// The host only routes a request whose parameters are all there, so a
    /// missing one is a route written differently in plugins.toml: 404.
    pub fn param(&self, name: &str) -> Result<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| Error::not_found(&format!("the route has no `{name}` parameter")))
    }

    /// A request header (names are lower case), the first if repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// A decoded query parameter, the first if repeated; an empty one is absent.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty())
    }

    /// Several decoded query parameters from one pass over the query (each
    /// [`Self::query_param`] parses it all again), each as `query_param` would
    /// give it: the first if repeated; an empty one is absent.
    pub fn query_params<const N: usize>(&self, names: [&str; N]) -> [Option<String>; N] {
        let mut found: [Option<String>; N] = std::array::from_fn(|_| None);
        let mut seen = [false; N];
        for (key, value) in form_urlencoded::parse(self.query.as_bytes()) {
            if let Some(i) = names.iter().position(|n| *n == key)
                && !seen[i]
            {
                seen[i] = true;
                found[i] = Some(value.into_owned()).filter(|v| !v.is_empty());
            }
        }
        found
    }

    /// The body as JSON of type `T`; anything else is a 400 `invalid_body`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body)
            .map_err(|e| Error::new(400, "invalid_body", &format!("invalid JSON body: {e}")))
    }

    /// The body as UTF-8 text; anything else is a 400 `malformed`.
    pub fn text(&self) -> Result<&str> {
        std::str::from_utf8(&self.body).map_err(|_| Error::new(400, "malformed", "the body is not UTF-8"))
    }

    /// The token of `Authorization: Bearer <token>`, if any.
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    }

    /// The client's address, as the host determined it: the peer, or what a
    /// trusted proxy saw (`[host] trusted_proxies`). A client cannot set it
    /// with a header of its own.
    pub fn client_ip(&self) -> Option<&str> {
        self.client_ip.as_deref()
    }

    /// The business service that called a service route (its name in
    /// WXHOST_SERVICE_KEYS, key checked by the host); a 401 anywhere else.
    pub fn service(&self) -> Result<&str> {
        self.service.as_deref().ok_or_else(|| Error::unauthorized("a business service's key is required"))
    }
}

impl Response {
    /// `value` as JSON.
    pub fn json(status: u16, value: &impl Serialize) -> Response {
        // Serialising a `serde_json::Value` or a derived type cannot fail.
        let body = serde_json::to_vec(value).unwrap_or_default();
        Response::with_body(status, JSON, body)
    }

    /// A JSON body already written (e.g. WeChat's answer passed through).
    pub fn raw_json(status: u16, json: String) -> Response {
        Response::with_body(status, JSON, json.into_bytes())
    }

    pub fn text(status: u16, text: &str) -> Response {
        Response::with_body(status, "text/plain; charset=utf-8", text.as_bytes().to_vec())
    }

    pub fn xml(status: u16, xml: String) -> Response {
        Response::with_body(status, "application/xml; charset=utf-8", xml.into_bytes())
    }

    /// No body.
    pub fn empty(status: u16) -> Response {
        Response { status, headers: vec![], body: vec![], outcome: None }
    }

    pub fn with_body(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response { status, headers: vec![("content-type".into(), content_type.into())], body, outcome: None }
    }

    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// What the request did (`applied`, `duplicate`, …), counted by the host
    /// in `wxhost_plugin_outcomes_total` and never sent to the client.
    pub fn outcome(mut self, outcome: &str) -> Response {
        self.outcome = Some(outcome.into());
        self
    }
}

/// Requests for a plugin's own unit tests (`routes().serve(request)`).
impl Request {
    /// A request the host would route to `route` (the path is the route as written).
    pub fn for_test(method: &str, route: &str) -> Request {
        Request {
            method: method.into(),
            route: route.into(),
            path: route.into(),
            query: String::new(),
            params: vec![],
            headers: vec![],
            body: vec![],
            request_id: "test".into(),
            client_ip: None,
            service: None,
        }
    }

    pub fn with_query(mut self, query: &str) -> Request {
        self.query = query.into();
        self
    }

    pub fn with_param(mut self, name: &str, value: &str) -> Request {
        self.params.push((name.into(), value.into()));
        self
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// As the host passes a service route's request: `name` called it.
    pub fn with_service(mut self, name: &str) -> Request {
        self.service = Some(name.into());
        self
    }

    pub fn with_client_ip(mut self, ip: &str) -> Request {
        self.client_ip = Some(ip.into());
        self
    }

    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(query: &str) -> Request {
        Request {
            method: "GET".into(),
            route: "/".into(),
            path: "/".into(),
            query: query.into(),
            params: vec![],
            headers: vec![],
            body: vec![],
            request_id: "t".into(),
            client_ip: None,
            service: None,
        }
    }

    #[test]
    fn several_query_parameters_read_in_one_pass_are_what_query_param_reads_one_by_one() {
        for query in ["a=1&b=%E4%B8%AD&c=", "b=2&a=&a=3", "c=x+y&a=%2B&b=1&b=2", ""] {
            let r = request(query);
            let names = ["a", "b", "c", "d"];
            assert_eq!(r.query_params(names), names.map(|n| r.query_param(n)), "{query}");
        }
    }
}
