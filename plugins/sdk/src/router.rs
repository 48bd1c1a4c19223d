//! Dispatch on the route the host matched (plugins.toml's pattern, passed in
//! the request), not on the path: the routes are written once, in plugins.toml
//! and in the plugin's router, and a path is never matched twice.

use crate::{Error, Request, Response, Result};

/// A request handler.
pub type Handler = fn(&Request) -> Result<Response>;

/// The plugin's handlers by method and route pattern.
#[derive(Default)]
pub struct Router {
    routes: Vec<(&'static str, &'static str, Handler)>,
    headers: Vec<(&'static str, &'static str)>,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// `handler` for `method` on `route`, written exactly as in plugins.toml.
    pub fn route(mut self, method: &'static str, route: &'static str, handler: Handler) -> Router {
        self.routes.push((method, route, handler));
        self
    }

    pub fn get(self, route: &'static str, handler: Handler) -> Router {
        self.route("GET", route, handler)
    }

    pub fn post(self, route: &'static str, handler: Handler) -> Router {
        self.route("POST", route, handler)
    }

    pub fn put(self, route: &'static str, handler: Handler) -> Router {
        self.route("PUT", route, handler)
    }

    pub fn delete(self, route: &'static str, handler: Handler) -> Router {
        self.route("DELETE", route, handler)
    }

    /// A header added to every answer (errors included).
    pub fn default_header(mut self, name: &'static str, value: &'static str) -> Router {
        self.headers.push((name, value));
        self
    }

    /// The routes this router serves, as `METHOD /pattern` (plugins.toml's spelling).
    pub fn routes(&self) -> impl Iterator<Item = String> + '_ {
        self.routes.iter().map(|(m, r, _)| format!("{m} {r}"))
    }

    /// Answers one request: its handler's response, or the error it returned
    /// rendered as the JSON error contract.
    pub fn serve(&self, request: Request) -> Response {
        let handler = self
            .routes
            .iter()
            .find(|(m, r, _)| *m == request.method && *r == request.route)
            .map(|(_, _, h)| *h);
        let mut response = match handler {
            Some(handler) => handler(&request).unwrap_or_else(|e| e.to_response()),
            // plugins.toml routes here a route this plugin does not serve.
            None => {
                Error::not_found(&format!("this plugin does not serve {} {}", request.method, request.route))
                    .to_response()
            }
        };
        for (name, value) in &self.headers {
            response.headers.push(((*name).into(), (*value).into()));
        }
        response
    }
}
