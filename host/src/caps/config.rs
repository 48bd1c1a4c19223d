//! `wxhost:plugin/config`: the plugin's own `[plugins.config]` table (never secrets).

use wasmtime::component::{HasData, Linker};

use crate::bindings::wxhost::plugin::config;
use crate::plugin::PluginIdentity;

pub struct ConfigView<'a> {
    pub plugin: &'a PluginIdentity,
}

struct HasConfig;

impl HasData for HasConfig {
    type Data<'a> = ConfigView<'a>;
}

pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> ConfigView<'_>,
) -> wasmtime::Result<()> {
    config::add_to_linker::<T, HasConfig>(linker, get)
}

impl config::Host for ConfigView<'_> {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.plugin.config.get(&key).map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }))
    }

    fn get_all_json(&mut self) -> wasmtime::Result<String> {
        Ok(serde_json::Value::Object(self.plugin.config.clone()).to_string())
    }
}
