//! `wxhost:plugin/internal-call`: web role → app role calls, signed by the
//! host with INTERNAL_SECRET (which the plugin never sees), carrying the
//! request id so one WeChat push can be followed across both roles.

use futures::future::BoxFuture;

use super::{CapabilitySpec, Context, PluginState, ServiceInputs};
use crate::role::Role;
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, Linker};

use crate::bindings::wxhost::plugin::internal_call::{self as wit, CallError, InternalResponse};
use crate::internal_auth::{INTERNAL_PREFIX, InternalAuth, SIGNATURE_HEADER, TIMESTAMP_HEADER, unix_now};

/// Largest answer taken from the app role.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// Time kept back from the plugin's deadline so it can still answer WeChat.
const ANSWER_MARGIN: Duration = Duration::from_millis(200);

/// How often a call that failed before any answer is sent again. A pooled
/// connection the other side has just closed (an nginx reload, an app process
/// stopping) fails that way. Internal calls are idempotent (the app role
/// applies each event and each payment once), so resending cannot apply
/// anything twice; it only spares WeChat a retry.
const RESENDS: usize = 2;

/// The owned context: the app role's base URL, the signer and an HTTP client.
pub struct InternalClient {
    base: String,
    auth: InternalAuth,
    http: reqwest::Client,
}

impl InternalClient {
    pub fn new(app_internal_url: &str, auth: InternalAuth) -> anyhow::Result<Self> {
        let base = app_internal_url.trim_end_matches('/').to_string();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "APP_INTERNAL_URL must be an http:// or https:// URL"
        );
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        Ok(InternalClient { base, auth, http })
    }

    /// Sends one signed call, bounded by `timeout`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        request_id: &str,
        timeout: Duration,
    ) -> Result<InternalResponse, CallError> {
        if !path.starts_with(INTERNAL_PREFIX) || path.contains("..") || path.contains("//") {
            return Err(CallError::NotAllowed(format!("{path} is not under {INTERNAL_PREFIX}")));
        }
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| CallError::NotAllowed(format!("`{method}` is not an HTTP method")))?;
        let timestamp = unix_now().to_string();
        let signature = self.auth.sign(method.as_str(), path, &timestamp, &body);
        let request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .header("x-request-id", request_id)
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature)
            .body(body);
        let deadline = Instant::now() + timeout;
        let mut resends = 0;
        let response = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = request.try_clone().expect("a byte body clones").timeout(left);
            match attempt.send().await {
                Ok(response) => break response,
                Err(e) if !e.is_timeout() && resends < RESENDS && !left.is_zero() => {
                    resends += 1;
                    tracing::info!(
                        path,
                        request_id,
                        "internal call sent again after it failed unanswered: {e}"
                    );
                }
                Err(e) => return Err(classify(e)),
            }
        };
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(classify)?;
        if body.len() > MAX_RESPONSE_BYTES {
            return Err(CallError::Unavailable("the app role's answer is too large".into()));
        }
        Ok(InternalResponse { status, body: body.to_vec() })
    }
}

fn classify(e: reqwest::Error) -> CallError {
    if e.is_timeout() {
        CallError::Timeout
    } else if e.is_connect() {
        CallError::Unavailable("the app role refused the connection".into())
    } else {
        CallError::Unavailable("the app role did not answer".into())
    }
}

/// The web role's way to the app role.
pub const SPEC: CapabilitySpec = CapabilitySpec { name: "internal-call", roles: &[Role::Web], open, link };

fn open<'a>(inputs: &'a ServiceInputs<'a>) -> BoxFuture<'a, anyhow::Result<Option<Context>>> {
    Box::pin(async move {
        if !inputs.roles.contains(&Role::Web) {
            return Ok(None);
        }
        let s = inputs.settings;
        match (&s.app_internal_url, &s.internal_secret) {
            (Some(url), Some(secret)) => {
                Ok(Some(Box::new(InternalClient::new(url, InternalAuth::new(secret.clone()))?) as Context))
            }
            _ => {
                tracing::warn!(
                    "APP_INTERNAL_URL or INTERNAL_SECRET is not set: the web role cannot reach the app role"
                );
                Ok(None)
            }
        }
    })
}

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| InternalCallView {
        ctx: s.services.get(),
        request_id: &s.request_id,
        deadline_at: s.deadline_at,
    })
}

pub struct InternalCallView<'a> {
    pub ctx: Option<&'a InternalClient>,
    pub request_id: &'a str,
    pub deadline_at: Instant,
}

struct HasInternalCall;

impl HasData for HasInternalCall {
    type Data<'a> = InternalCallView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> InternalCallView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasInternalCall>(linker, get)
}

/// A capability call's error: a [`CallError`] for the plugin, or a trap.
pub type CallFailure = crate::bindings::CapabilityError<CallError>;

impl wit::Host for InternalCallView<'_> {
    fn convert_call_error(&mut self, err: CallFailure) -> wasmtime::Result<CallError> {
        err.downcast()
    }

    async fn call(
        &mut self,
        method: String,
        path: String,
        body: Vec<u8>,
    ) -> Result<InternalResponse, CallFailure> {
        let client = self.ctx.ok_or_else(|| {
            CallError::NotConfigured("APP_INTERNAL_URL and INTERNAL_SECRET are not set".into())
        })?;
        let left = self.deadline_at.saturating_duration_since(Instant::now()).saturating_sub(ANSWER_MARGIN);
        if left.is_zero() {
            return Err(CallError::Timeout.into());
        }
        let request_id = self.request_id.to_string();
        Ok(client.call(&method, &path, body, &request_id, left).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An app role stand-in that reads each request and, for the first
    /// `drop_first` connections, closes without answering.
    async fn flaky_app(drop_first: usize) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = vec![0u8; 8192];
                let _ = socket.read(&mut buf).await;
                if n >= drop_first {
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                        .await;
                }
                drop(socket);
            }
        });
        (format!("http://{addr}"), seen)
    }

    fn client(base: &str) -> InternalClient {
        InternalClient::new(base, InternalAuth::new("test-internal-secret".to_string().into())).unwrap()
    }

    #[tokio::test]
    async fn a_call_closed_unanswered_is_sent_again_and_answered() {
        let (base, seen) = flaky_app(2).await;
        let answer = client(&base)
            .call("POST", "/api/v1/internal/x", b"{}".to_vec(), "r1", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!((answer.status, answer.body), (200, b"{}".to_vec()));
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3, "two resends");
    }

    #[tokio::test]
    async fn a_call_closed_unanswered_every_time_is_unavailable_after_two_resends() {
        let (base, seen) = flaky_app(usize::MAX).await;
        let failed = client(&base)
            .call("POST", "/api/v1/internal/x", b"{}".to_vec(), "r2", Duration::from_secs(2))
            .await;
        assert!(matches!(failed, Err(CallError::Unavailable(_))), "{failed:?}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
