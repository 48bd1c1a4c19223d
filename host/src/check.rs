//! `wxhost check`: loads every plugin of a configuration against its role's
//! grants, prints what each imports and whether it is granted.

use std::io::Write;

use crate::config::Config;
use crate::plugin;

/// Checks every plugin; writes a report; returns whether all were accepted.
pub fn run(config: &Config, out: &mut impl Write) -> anyhow::Result<bool> {
    let engine = crate::engine::new(1, true)?;
    let mut all_ok = true;
    for spec in &config.plugins {
        let role = &config.roles[&spec.role];
        let bytes = std::fs::read(&spec.wasm)?;
        let version = plugin::version_of(&bytes);
        writeln!(
            out,
            "plugin {} (role {}, version {version}, {})",
            spec.name,
            spec.role,
            spec.wasm.display()
        )?;
        let component = match plugin::compile(&engine, spec, &bytes) {
            Ok(c) => c,
            Err(e) => {
                all_ok = false;
                writeln!(out, "  REFUSED: {e}")?;
                continue;
            }
        };
        for import in plugin::check_imports(&engine, &component, spec, role) {
            let verdict = if import.granted { "granted" } else { "REFUSED" };
            writeln!(out, "  {verdict:8} {}  ({})", import.name, import.note)?;
        }
        match plugin::prepare(&engine, spec, role, &component, version, 0) {
            Ok(_) => writeln!(out, "  ok")?,
            Err(e) => {
                all_ok = false;
                writeln!(out, "  REFUSED: {e}")?;
            }
        }
    }
    for role in config.roles.keys() {
        writeln!(out, "role {role} reads: {}", crate::settings::secrets_read_by(*role).join(", "))?;
    }
    writeln!(out, "{}", if all_ok { "all plugins accepted" } else { "some plugins were refused" })?;
    Ok(all_ok)
}
