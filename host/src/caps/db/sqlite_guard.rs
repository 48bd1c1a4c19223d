//! SQLite's own authorizer on the connections plugin SQL runs on: the engine,
//! as it compiles each statement, refuses what a plugin must not do. A parser
//! in front of it would have to agree with SQLite on every byte; the
//! authorizer sees the tables and operations the statement really uses, after
//! comments, quoting, case and schema prefixes are resolved.
//!
//! Plugins get data manipulation over the plugin tables and nothing else:
//! no host table (read, write, or as the target of DDL), no schema changes
//! at all (the schema is the migrations'), no ATTACH/DETACH (hence no
//! `VACUUM INTO`), no PRAGMA but a few read-only ones, no virtual tables, no
//! extension loading. Triggers, views and foreign keys reaching a host table
//! cannot be created because no CREATE is allowed.

// The one place the host calls SQLite's C API: sqlx has no authorizer.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char, c_int, c_void};

use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;

use crate::database::is_host_table;

/// PRAGMAs that only read the schema of a table (never change state).
const READ_ONLY_PRAGMAS: [&str; 6] =
    ["table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"];

/// SQL functions that reach outside the database or into the engine's memory.
const DENIED_FUNCTIONS: [&str; 2] = ["load_extension", "fts3_tokenizer"];

/// Installs the authorizer and turns on SQLite's defensive mode on a plugin
/// connection (no `writable_schema`, no writes to shadow tables, no
/// functions with side effects in the schema), and allows no attached database.
pub fn confine(handle: &mut LockedSqliteHandle<'_>) -> Result<(), String> {
    let db = handle.as_raw_handle().as_ptr();
    // SAFETY: the locked handle keeps sqlx's worker thread off the connection
    // for the call; the callback is a plain function of its arguments and
    // needs no user data.
    unsafe {
        let rc = ffi::sqlite3_set_authorizer(db, Some(authorize), std::ptr::null_mut());
        if rc != ffi::SQLITE_OK {
            return Err(format!("sqlite3_set_authorizer failed ({rc})"));
        }
        for (option, value) in [
            (ffi::SQLITE_DBCONFIG_DEFENSIVE, 1),
            (ffi::SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0),
            (ffi::SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0),
        ] {
            let rc = ffi::sqlite3_db_config(db, option, value, std::ptr::null_mut::<c_int>());
            if rc != ffi::SQLITE_OK {
                return Err(format!("sqlite3_db_config({option}) failed ({rc})"));
            }
        }
        ffi::sqlite3_limit(db, ffi::SQLITE_LIMIT_ATTACHED, 0);
    }
    Ok(())
}

/// The message SQLite gives for a statement the authorizer refused.
pub const REFUSED_MESSAGE: &str = "not authorized";

/// Whether a plugin connection is inside a transaction (a plugin's own
/// `BEGIN` outside `db.begin`, which must not go back to the pool open).
pub fn in_transaction(handle: &mut LockedSqliteHandle<'_>) -> bool {
    // SAFETY: as in `confine`.
    unsafe { ffi::sqlite3_get_autocommit(handle.as_raw_handle().as_ptr()) == 0 }
}

unsafe extern "C" fn authorize(
    _user: *mut c_void,
    action: c_int,
    first: *const c_char,
    second: *const c_char,
    _database: *const c_char,
    _trigger_or_view: *const c_char,
) -> c_int {
    // SAFETY: SQLite passes NUL-terminated strings or null.
    let text = |p: *const c_char| if p.is_null() { None } else { unsafe { CStr::from_ptr(p) }.to_str().ok() };
    if permitted(action, text(first), text(second)) { ffi::SQLITE_OK } else { ffi::SQLITE_DENY }
}

/// The policy, apart from the FFI so it can be read and tested plainly.
fn permitted(action: c_int, first: Option<&str>, second: Option<&str>) -> bool {
    let plugin_table = |table: Option<&str>| match table {
        Some(t) => !is_host_table(t) && !t.to_ascii_lowercase().starts_with("sqlite_"),
        None => false,
    };
    match action {
        ffi::SQLITE_SELECT | ffi::SQLITE_RECURSIVE => true,
        // The schema table may be read (it holds names and DDL, no data).
        ffi::SQLITE_READ => {
            plugin_table(first)
                || first.is_some_and(|t| {
                    ["sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"]
                        .iter()
                        .any(|s| t.eq_ignore_ascii_case(s))
                })
                // pragma_table_info() and friends are read as tables of that name.
                || first.is_some_and(|t| {
                    READ_ONLY_PRAGMAS.iter().any(|p| t.eq_ignore_ascii_case(&format!("pragma_{p}")))
                })
        }
        ffi::SQLITE_INSERT | ffi::SQLITE_UPDATE | ffi::SQLITE_DELETE => plugin_table(first),
        ffi::SQLITE_FUNCTION => {
            !second.is_some_and(|f| DENIED_FUNCTIONS.iter().any(|d| f.eq_ignore_ascii_case(d)))
        }
        ffi::SQLITE_PRAGMA => {
            first.is_some_and(|p| READ_ONLY_PRAGMAS.iter().any(|r| p.eq_ignore_ascii_case(r)))
                && second.is_none_or(|t| !is_host_table(t))
        }
        // sqlx's own BEGIN/COMMIT/ROLLBACK and savepoints run here too; a
        // plugin's stray BEGIN is caught after its statement (`in_transaction`).
        ffi::SQLITE_TRANSACTION | ffi::SQLITE_SAVEPOINT => true,
        // Every CREATE, DROP, ALTER, REINDEX, ANALYZE, ATTACH, DETACH and
        // virtual table: the schema belongs to the migrations.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_tables_may_be_read_and_written_host_tables_never() {
        for action in [ffi::SQLITE_READ, ffi::SQLITE_INSERT, ffi::SQLITE_UPDATE, ffi::SQLITE_DELETE] {
            assert!(permitted(action, Some("users"), Some("openid")), "{action}");
            for host in ["token_cache", "HOST_KEYS", "Sessions", "_sqlx_migrations", "sqlite_sequence"] {
                assert!(!permitted(action, Some(host), None), "{action} {host}");
            }
        }
        assert!(!permitted(ffi::SQLITE_INSERT, Some("sqlite_master"), None));
    }

    #[test]
    fn schema_changes_attachments_and_extensions_are_refused() {
        for action in [
            ffi::SQLITE_CREATE_TABLE,
            ffi::SQLITE_CREATE_INDEX,
            ffi::SQLITE_CREATE_TRIGGER,
            ffi::SQLITE_CREATE_VIEW,
            ffi::SQLITE_CREATE_TEMP_TABLE,
            ffi::SQLITE_DROP_TABLE,
            ffi::SQLITE_DROP_INDEX,
            ffi::SQLITE_ALTER_TABLE,
            ffi::SQLITE_ATTACH,
            ffi::SQLITE_DETACH,
            ffi::SQLITE_CREATE_VTABLE,
            ffi::SQLITE_REINDEX,
            ffi::SQLITE_ANALYZE,
        ] {
            assert!(!permitted(action, Some("users"), Some("users")), "{action}");
        }
        assert!(!permitted(ffi::SQLITE_FUNCTION, None, Some("LOAD_EXTENSION")));
        assert!(permitted(ffi::SQLITE_FUNCTION, None, Some("coalesce")));
        assert!(!permitted(ffi::SQLITE_PRAGMA, Some("journal_mode"), None));
        assert!(!permitted(ffi::SQLITE_PRAGMA, Some("writable_schema"), Some("1")));
        assert!(permitted(ffi::SQLITE_PRAGMA, Some("table_info"), Some("users")));
        assert!(!permitted(ffi::SQLITE_PRAGMA, Some("table_info"), Some("sessions")));
    }
}
