//! WASI for plugins: clocks, random, and stdout/stderr into the host log. No
//! preopened directories, no environment, no arguments, no stdin, and no
//! sockets: `wasi:sockets` is not even linked, so a plugin importing it is
//! refused at load time.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime::component::Linker;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream, WasiCli, WasiCliView as _};
use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView as _};
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random};
use wasmtime_wasi::random::WasiRandom;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiView};

use super::PluginIdentity;

/// WASI interfaces linked for every plugin (names without version).
pub const LINKED: &[&str] = &[
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:cli/exit",
    "wasi:cli/environment",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
];

/// Whether a component import names one of the WASI interfaces we link.
pub fn is_linked(import: &str) -> bool {
    let name = import.split('@').next().unwrap_or(import);
    LINKED.contains(&name)
}

/// `wasi:io` host functions operate on the resource table alone.
struct HasIo;

impl wasmtime::component::HasData for HasIo {
    type Data<'a> = &'a mut wasmtime::component::ResourceTable;
}

pub fn add_to_linker<T: WasiView + 'static>(l: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi_io::bindings::wasi::io;
    io::error::add_to_linker::<T, HasIo>(l, |t| t.ctx().table)?;
    io::poll::add_to_linker::<T, HasIo>(l, |t| t.ctx().table)?;
    io::streams::add_to_linker::<T, HasIo>(l, |t| t.ctx().table)?;
    clocks::wall_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    clocks::monotonic_clock::add_to_linker::<T, WasiClocks>(l, T::clocks)?;
    random::random::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    random::insecure::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    random::insecure_seed::add_to_linker::<T, WasiRandom>(l, |t| t.ctx().ctx.random())?;
    cli::exit::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::environment::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_input::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_output::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdin::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stdout::add_to_linker::<T, WasiCli>(l, T::cli)?;
    cli::terminal_stderr::add_to_linker::<T, WasiCli>(l, T::cli)?;
    filesystem::types::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    filesystem::preopens::add_to_linker::<T, WasiFilesystem>(l, T::filesystem)?;
    Ok(())
}

/// The WASI context of one request: nothing from the host but clocks, random
/// and the plugin's output streams, which go to the log tagged with the plugin.
pub fn plugin_ctx(plugin: &Arc<PluginIdentity>, request: &CurrentRequest) -> WasiCtx {
    let output = |stream| PluginOutput { plugin: plugin.clone(), request: request.clone(), stream };
    WasiCtxBuilder::new().stdout(output("stdout")).stderr(output("stderr")).build()
}

/// The request an instance is serving now, shared with its output streams
/// (which write from tasks of their own): a kept instance serves several.
#[derive(Clone, Default)]
pub struct CurrentRequest(Arc<std::sync::Mutex<Arc<str>>>);

impl CurrentRequest {
    pub fn set(&self, request_id: &str) {
        *self.0.lock().expect("current request lock") = Arc::from(request_id);
    }

    pub fn get(&self) -> Arc<str> {
        self.0.lock().expect("current request lock").clone()
    }
}

/// A plugin's stdout or stderr, logged a line at a time.
struct PluginOutput {
    plugin: Arc<PluginIdentity>,
    request: CurrentRequest,
    stream: &'static str,
}

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            plugin: self.plugin.clone(),
            request: self.request.clone(),
            stream: self.stream,
            pending: Vec::new(),
        })
    }
}

/// Longest line kept before it is logged in pieces: a plugin cannot grow host memory.
const MAX_LINE: usize = 4096;

struct LineLogger {
    plugin: Arc<PluginIdentity>,
    request: CurrentRequest,
    stream: &'static str,
    pending: Vec<u8>,
}

impl LineLogger {
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::info!(
            target: "wxhost::plugin_output",
            plugin = %self.plugin.name,
            version = %self.plugin.version,
            request_id = %self.request.get(),
            stream = self.stream,
            "{text}"
        );
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.pending.extend_from_slice(buf);
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line);
        }
        if self.pending.len() >= MAX_LINE {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
    }
}
