//! `wxhost:plugin/config`: the plugin's own `[plugins.config]` table (never secrets).

use super::{CapabilitySpec, PluginState};
use crate::role::Role;
use wasmtime::component::{HasData, Linker};

use super::PluginIdentity;
use crate::bindings::wxhost::plugin::config;

/// Grantable by both roles; no context of its own.
pub const SPEC: CapabilitySpec =
    CapabilitySpec { name: "config", roles: &[Role::Web, Role::App], open: super::no_context, link };

fn link(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    add_to_linker(linker, |s| ConfigView { plugin: &s.plugin })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use config::Host as _;

    #[test]
    fn strings_come_back_as_is_and_other_values_as_json() {
        let table: toml::Table =
            toml::from_str("welcome = \"欢迎关注\"\nretries = 3\n[keywords]\nhelp = \"帮助\"\n").unwrap();
        let serde_json::Value::Object(config) = serde_json::to_value(&table).unwrap() else { unreachable!() };
        let plugin = PluginIdentity { name: "p".into(), version: "v".into(), config, wechat_api: vec![] };
        let mut view = ConfigView { plugin: &plugin };
        assert_eq!(view.get("welcome".into()).unwrap().as_deref(), Some("欢迎关注"));
        assert_eq!(view.get("retries".into()).unwrap().as_deref(), Some("3"));
        assert_eq!(view.get("keywords".into()).unwrap().as_deref(), Some(r#"{"help":"帮助"}"#));
        assert_eq!(view.get("missing".into()).unwrap(), None);
        let all: serde_json::Value = serde_json::from_str(&view.get_all_json().unwrap()).unwrap();
        assert_eq!(all["keywords"]["help"], "帮助");
    }
}
