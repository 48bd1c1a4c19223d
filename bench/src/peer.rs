//! The closest peer, measured beside wxhost: `wasmtime serve` (wasmtime's own
//! wasi:http proxy handler, at the wasmtime version wxhost uses) running the
//! same verify as a plain wasi:http component
//! (`plugins/fixtures/peer-verify`). `bench/run` builds it from crates.io into
//! a cache folder once and names it in `WXHOST_BENCH_PEER`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running `wasmtime serve`; stopped when dropped.
pub struct Peer {
    child: Child,
    pub addr: SocketAddr,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `wasmtime` binary of `WXHOST_BENCH_PEER`, if `bench/run` built one.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("WXHOST_BENCH_PEER").map(PathBuf::from).filter(|p| p.is_file())
}

/// `wasmtime serve` of `component` with its defaults (a fresh instance per
/// request for a WASIp2 component), or reusing each instance for up to
/// `reuse` requests; ready once `probe` answers 200.
pub fn start(wasmtime: &Path, component: &Path, reuse: Option<u32>, probe: &str) -> anyhow::Result<Peer> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut command = Command::new(wasmtime);
    // -Scli: the WASI CLI interfaces a Rust std component imports (environment, exit, ...).
    command.arg("serve").arg("--addr").arg(addr.to_string()).arg("-Scli");
    if let Some(n) = reuse {
        command.arg("--max-instance-reuse-count").arg(n.to_string());
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(super::log_path())?;
    let child = command
        .arg(component)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {} serve", wasmtime.display()))?;
    let peer = Peer { child, addr };
    let started = Instant::now();
    loop {
        if status_of(addr, probe) == Some(200) {
            return Ok(peer);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "wasmtime serve did not answer 200 within a minute (see {})",
            super::log_path().display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status of `GET path` at `addr`, if it answers.
fn status_of(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split_whitespace().nth(1)?.parse().ok()
}
