//! `wxhost:plugin/log`: plugin log lines in the host log, tagged with the plugin.

use super::{CapabilitySpec, PluginState};
use crate::role::Role;
use wasmtime::component::{HasData, Linker};

use super::PluginIdentity;
use crate::bindings::wxhost::plugin::log::{self, Level};

/// Longest message kept; the rest is cut so a plugin cannot flood the log.
const MAX_MESSAGE: usize = 8 * 1024;

/// Grantable by both roles; no context of its own.
pub const SPEC: CapabilitySpec =
    CapabilitySpec { name: "log", roles: &[Role::Web, Role::App], open: super::no_context, link };

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| LogView { plugin: &s.plugin, request_id: &s.request_id })
}

pub struct LogView<'a> {
    pub plugin: &'a PluginIdentity,
    /// Every line of a request carries its id.
    pub request_id: &'a str,
}

struct HasLog;

impl HasData for HasLog {
    type Data<'a> = LogView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> LogView<'_>,
) -> wasmtime::Result<()> {
    log::add_to_linker::<T, HasLog>(linker, get)
}

impl log::Host for LogView<'_> {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let mut end = message.len().min(MAX_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let (name, version, request_id) = (&*self.plugin.name, &*self.plugin.version, self.request_id);
        match level {
            Level::Trace => {
                tracing::trace!(target: "wxhost::plugin", plugin = name, version, request_id, "{message}")
            }
            Level::Debug => {
                tracing::debug!(target: "wxhost::plugin", plugin = name, version, request_id, "{message}")
            }
            Level::Info => {
                tracing::info!(target: "wxhost::plugin", plugin = name, version, request_id, "{message}")
            }
            Level::Warn => {
                tracing::warn!(target: "wxhost::plugin", plugin = name, version, request_id, "{message}")
            }
            Level::Error => {
                tracing::error!(target: "wxhost::plugin", plugin = name, version, request_id, "{message}")
            }
        }
        Ok(())
    }
}
