//! Hot swap under load: new versions of verify.wasm written over the running
//! one and swapped in with `Host::reload` (what `POST /admin/reload`, SIGHUP
//! and the file watcher do), while requests keep coming.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wxhost::config::Role;
use wxhost::host::Host;

/// `wasm` with one more custom section: the same code, another content hash,
/// so the host sees (and compiles) a new version.
pub fn with_custom_section(wasm: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut contents = Vec::new();
    leb128(name.len(), &mut contents);
    contents.extend_from_slice(name.as_bytes());
    contents.extend_from_slice(payload);
    let mut out = wasm.to_vec();
    out.push(0); // custom section
    leb128(contents.len(), &mut out);
    out.extend_from_slice(&contents);
    out
}

/// What the swapper did.
#[derive(Default, Debug)]
pub struct Swaps {
    /// Reloads that succeeded and put another verify version in service.
    pub done: u64,
    /// Reloads refused, or that left the same version serving.
    pub failed: u64,
    pub first_error: Option<String>,
    /// How long each reload took (read, hash, compile if never seen, check, swap).
    pub reload_times: Vec<Duration>,
}

fn verify_version(host: &Host) -> Option<String> {
    host.runtime(Role::Web)
        .plugins
        .iter()
        .find(|p| p.identity.name == "verify")
        .map(|p| p.identity.version.clone())
}

/// Replaces verify.wasm of a running web role with other versions of it.
pub struct Swapper {
    host: Arc<Host>,
    path: PathBuf,
    original: Vec<u8>,
    run: String,
    /// Every swap a never-seen version (compiled during the load), or else
    /// alternate between the original and one variant compiled beforehand.
    fresh: bool,
    variant: Vec<u8>,
}

impl Swapper {
    pub fn new(host: Arc<Host>, path: PathBuf, fresh: bool) -> anyhow::Result<Swapper> {
        let original = std::fs::read(&path)?;
        let run = format!("{}-{}", std::process::id(), crate::traffic::unix_now());
        let variant = with_custom_section(&original, "wxhost-bench-swap", format!("{run}-0").as_bytes());
        Ok(Swapper { host, path, original, run, fresh, variant })
    }

    /// Writes `bytes` the way a deploy does (beside the file, renamed over it)
    /// and reloads; whether another version now serves, and how long it took.
    async fn swap_to(&self, bytes: &[u8], swaps: &mut Swaps) {
        let before = verify_version(&self.host);
        let tmp = self.path.with_extension("wasm.tmp");
        std::fs::write(&tmp, bytes).expect("writing the new version");
        std::fs::rename(&tmp, &self.path).expect("renaming the new version over the old");
        let started = Instant::now();
        let status = self.host.reload("bench").await;
        swaps.reload_times.push(started.elapsed());
        let after = verify_version(&self.host);
        if status.ok && after.is_some() && after != before {
            swaps.done += 1;
        } else {
            swaps.failed += 1;
            swaps.first_error.get_or_insert_with(|| format!("{:?}", status.errors));
        }
    }

    /// Before the load: swaps to the variant (a never-seen version, so this
    /// reload compiles it) and back; the time of that first reload.
    pub async fn prepare(&self) -> anyhow::Result<Duration> {
        let mut swaps = Swaps::default();
        self.swap_to(&self.variant, &mut swaps).await;
        self.swap_to(&self.original, &mut swaps).await;
        anyhow::ensure!(
            swaps.failed == 0,
            "the prepared swap failed: {}",
            swaps.first_error.unwrap_or_default()
        );
        Ok(swaps.reload_times[0])
    }

    /// Swaps in the odd windows of a timeline of `window`-long windows from
    /// `start` to `end` (the even ones stay quiet, for comparison): another
    /// version every `interval` (at once if a reload overran).
    pub async fn swap_in_windows(
        &self,
        start: Instant,
        end: Instant,
        window: Duration,
        interval: Duration,
    ) -> Swaps {
        let mut swaps = Swaps::default();
        let mut i = 0u64;
        let mut window_start = start + window;
        while window_start < end {
            let window_end = (window_start + window).min(end);
            let mut at = window_start;
            while at < window_end {
                tokio::time::sleep_until(at.into()).await;
                i += 1;
                let fresh;
                let bytes: &[u8] = if self.fresh {
                    fresh = with_custom_section(
                        &self.original,
                        "wxhost-bench-swap",
                        format!("{}-{i}", self.run).as_bytes(),
                    );
                    &fresh
                } else if i % 2 == 1 {
                    &self.variant
                } else {
                    &self.original
                };
                self.swap_to(bytes, &mut swaps).await;
                at += interval;
            }
            window_start += window * 2;
        }
        swaps
    }

    /// Leaves the original serving.
    pub async fn restore(&self) {
        let mut swaps = Swaps::default();
        if verify_version(&self.host).as_deref() != Some(wxhost::plugin::version_of(&self.original).as_str())
        {
            self.swap_to(&self.original, &mut swaps).await;
        }
    }
}
