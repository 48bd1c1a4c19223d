//! Per-client rate limits on routes that spend WeChat's API quota without a
//! login (QR-code creation), checked in the host before any plugin runs.
//! `[rate_limits]` in plugins.toml names the routes; the client is the peer's
//! address, or the address a configured proxy (`[host] trusted_proxies`)
//! puts in `X-Forwarded-For`. Limits are per process: with N app processes
//! behind nginx, nginx's own `limit_req` (deploy/nginx) bounds the total.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::{Config, RateLimit};

/// Keyed limiters forget clients idle long enough to be full again once
/// their number passes this.
const MAX_TRACKED_CLIENTS: usize = 10_000;

pub struct ClientLimits {
    trusted_proxies: Vec<IpAddr>,
    /// `METHOD /pattern` → the limiter of that route.
    routes: HashMap<String, DefaultKeyedRateLimiter<IpAddr>>,
}

impl ClientLimits {
    pub fn new(config: &Config) -> ClientLimits {
        let routes = config
            .rate_limits
            .iter()
            .map(|(route, limit)| (route.to_string(), DefaultKeyedRateLimiter::keyed(quota(limit))))
            .collect();
        ClientLimits { trusted_proxies: config.trusted_proxies.clone(), routes }
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The client a request comes from: the peer, unless the peer is a trusted
    /// proxy, then the right-most `X-Forwarded-For` entry that is not one
    /// (what the proxy saw; entries further left are the client's own word).
    pub fn client_of(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer?;
        if !self.trusted_proxies.contains(&peer) {
            return Some(peer);
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        Some(forwarded.into_iter().rev().find(|a| !self.trusted_proxies.contains(a)).unwrap_or(peer))
    }

    /// `Err(wait)` if `client` is over the limit of `method` `pattern`.
    pub fn check(&self, method: &str, pattern: &str, client: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = self.routes.get(&format!("{method} {pattern}")) else { return Ok(()) };
        let result = limiter.check_key(&client);
        if limiter.len() > MAX_TRACKED_CLIENTS {
            limiter.retain_recent();
        }
        result.map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

fn quota(limit: &RateLimit) -> Quota {
    let per_minute = NonZeroU32::new(limit.per_minute).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limit.burst).unwrap_or(per_minute);
    Quota::per_minute(per_minute).allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(trusted: &[&str]) -> ClientLimits {
        ClientLimits {
            trusted_proxies: trusted.iter().map(|a| a.parse().unwrap()).collect(),
            routes: [(
                "POST /qr".to_string(),
                DefaultKeyedRateLimiter::keyed(quota(&RateLimit { per_minute: 2, burst: 2 })),
            )]
            .into(),
        }
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "198.51.100.7, 203.0.113.9".parse().unwrap());
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(limits(&[]).client_of(Some(proxy), &headers), Some(proxy), "not trusted: the peer");
        assert_eq!(
            limits(&["127.0.0.1"]).client_of(Some(proxy), &headers),
            Some("203.0.113.9".parse().unwrap()),
            "the address the proxy saw, not what the client wrote before it"
        );
        assert_eq!(limits(&["127.0.0.1"]).client_of(Some(proxy), &HeaderMap::new()), Some(proxy));
    }

    #[test]
    fn each_client_has_its_own_budget_and_other_routes_none() {
        let l = limits(&[]);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert!(l.check("POST", "/qr", a).is_ok() && l.check("POST", "/qr", a).is_ok());
        let wait = l.check("POST", "/qr", a).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(30), "{wait:?}");
        assert!(l.check("POST", "/qr", b).is_ok(), "another client");
        assert!(l.check("GET", "/qr", a).is_ok(), "another route");
    }
}
