//! The load generator for the end-to-end rows: reqwest on its own tokio runtime
//! (one worker thread, like an external client process sharing the machine).
//!
//! - `closed`: N workers, each sending its next request as soon as the previous
//!   answer is in, for a fixed time: the saturation throughput.
//! - `open`: requests sent on a fixed timeline (request i at start + i/rate)
//!   whatever the answers do, each latency measured from the request's
//!   *scheduled* time, so a stalled server is charged for the requests it
//!   delayed (no coordinated omission).
//!
//! Every answer is read to the end and its status checked; anything but 2xx
//! is counted, never silently dropped from the latencies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Builds request `i` of a run; `None` when the source is exhausted.
pub type Source = Arc<dyn Fn(&reqwest::Client, u64) -> Option<reqwest::RequestBuilder> + Send + Sync>;

pub struct LoadGen {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

/// What one run saw.
#[derive(Default, Debug)]
pub struct Outcome {
    /// Answered 2xx.
    pub ok: u64,
    /// Answered, but not 2xx.
    pub non_2xx: u64,
    /// No answer (connection error, 10 s timeout).
    pub errors: u64,
    /// From the first send to the last answer.
    pub elapsed: Duration,
    /// Every answered request's latency (2xx or not), sorted.
    pub latencies: Vec<Duration>,
    /// The first failure seen, for the report.
    pub first_failure: Option<String>,
    /// Open loop: how late the generator itself sent the latest request.
    pub max_send_lag: Duration,
    /// Closed loop: the source ran dry before the time was up.
    pub exhausted: bool,
}

impl Outcome {
    pub fn answered(&self) -> u64 {
        self.ok + self.non_2xx
    }

    pub fn failed(&self) -> u64 {
        self.non_2xx + self.errors
    }

    /// 2xx answers per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((q * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1]
    }

    fn record(&mut self, result: Result<(u16, String), String>, latency: Duration) {
        match result {
            Ok((status, _)) if (200..300).contains(&status) => {
                self.ok += 1;
                self.latencies.push(latency);
            }
            Ok((status, body)) => {
                self.non_2xx += 1;
                self.latencies.push(latency);
                self.first_failure.get_or_insert_with(|| {
                    format!("HTTP {status}: {}", body.chars().take(200).collect::<String>())
                });
            }
            Err(e) => {
                self.errors += 1;
                self.first_failure.get_or_insert(e);
            }
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.latencies.extend(other.latencies);
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
        self.max_send_lag = self.max_send_lag.max(other.max_send_lag);
        self.exhausted |= other.exhausted;
    }

    fn finish(mut self, elapsed: Duration) -> Outcome {
        self.latencies.sort_unstable();
        self.elapsed = elapsed;
        self
    }
}

/// One request of an open-loop run.
pub struct Sample {
    /// When it was scheduled, from the run's start.
    pub at: Duration,
    result: Result<(u16, String), String>,
    /// From the scheduled time to the end of the answer.
    latency: Duration,
}

/// An open-loop run, request by request.
pub struct OpenRun {
    pub samples: Vec<Sample>,
    pub max_send_lag: Duration,
    pub exhausted: bool,
    pub elapsed: Duration,
}

impl OpenRun {
    /// The requests scheduled at a time `keep` accepts, as one outcome.
    pub fn outcome(&self, keep: impl Fn(Duration) -> bool) -> Outcome {
        let mut out =
            Outcome { max_send_lag: self.max_send_lag, exhausted: self.exhausted, ..Outcome::default() };
        for s in self.samples.iter().filter(|s| keep(s.at)) {
            out.record(s.result.clone(), s.latency);
        }
        out.finish(self.elapsed)
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<(u16, String), String> {
    let response = request.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = response.status().as_u16();
    // Read the whole body: the request is done when the answer is.
    let body = response.text().await.map_err(|e| format!("answer cut: {e}"))?;
    Ok((status, if (200..300).contains(&status) { String::new() } else { body }))
}

impl LoadGen {
    pub fn new() -> anyhow::Result<LoadGen> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-load")
            .enable_all()
            .build()?;
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(LoadGen { runtime, client })
    }

    /// `workers` closed-loop workers for `duration` (or until `source` runs dry).
    pub async fn closed(&self, source: Source, workers: usize, duration: Duration) -> Outcome {
        let client = self.client.clone();
        self.runtime
            .spawn(async move {
                let next = Arc::new(AtomicU64::new(0));
                let started = Instant::now();
                let deadline = started + duration;
                let tasks: Vec<_> = (0..workers)
                    .map(|_| {
                        let (client, source, next) = (client.clone(), source.clone(), next.clone());
                        tokio::spawn(async move {
                            let mut out = Outcome::default();
                            while Instant::now() < deadline {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                let Some(request) = source(&client, i) else {
                                    out.exhausted = true;
                                    break;
                                };
                                let sent = Instant::now();
                                let result = send(request).await;
                                out.record(result, sent.elapsed());
                            }
                            out
                        })
                    })
                    .collect();
                let mut total = Outcome::default();
                for t in tasks {
                    total.merge(t.await.expect("a load worker panicked"));
                }
                total.finish(started.elapsed())
            })
            .await
            .expect("the load generator panicked")
    }

    /// `rate` requests per second on a fixed timeline for `duration`, open loop.
    pub async fn open(&self, source: Source, rate: f64, duration: Duration) -> Outcome {
        self.open_from(source, rate, duration, Instant::now() + Duration::from_millis(5))
            .await
            .outcome(|_| true)
    }

    /// The same from `start` on, every request kept with its scheduled time.
    pub async fn open_from(&self, source: Source, rate: f64, duration: Duration, start: Instant) -> OpenRun {
        let client = self.client.clone();
        self.runtime
            .spawn(async move {
                let count = (rate * duration.as_secs_f64()).round() as u64;
                let mut tasks = Vec::with_capacity(count as usize);
                let mut lag = Duration::ZERO;
                let mut exhausted = false;
                for i in 0..count {
                    let offset = Duration::from_secs_f64(i as f64 / rate);
                    let at = start + offset;
                    tokio::time::sleep_until(at.into()).await;
                    let Some(request) = source(&client, i) else {
                        exhausted = true;
                        break;
                    };
                    lag = lag.max(Instant::now().saturating_duration_since(at));
                    tasks.push(tokio::spawn(async move {
                        let result = send(request).await;
                        // From the scheduled time, not from when it went out.
                        Sample { at: offset, result, latency: at.elapsed() }
                    }));
                }
                let mut samples = Vec::with_capacity(tasks.len());
                for t in tasks {
                    samples.push(t.await.expect("a load task panicked"));
                }
                OpenRun { samples, max_send_lag: lag, exhausted, elapsed: start.elapsed() }
            })
            .await
            .expect("the load generator panicked")
    }
}
