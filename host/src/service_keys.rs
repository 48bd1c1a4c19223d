//! The business services' keys (WXHOST_SERVICE_KEYS): comma-separated
//! `name=key` pairs, each key at least 32 bytes. A name may have several keys
//! at once (the old and the new one during a rotation). A plugin's
//! `service_routes` are answered only for a request whose
//! `Authorization: Bearer` is one of them; the host checks it before the
//! plugin runs and passes the plugin the service's name, never the key.

use secrecy::{ExposeSecret as _, SecretString};
use subtle::ConstantTimeEq as _;

/// The shortest key accepted.
pub const MIN_KEY_BYTES: usize = 32;

#[derive(Clone)]
pub struct ServiceKeys {
    keys: Vec<(String, SecretString)>,
}

impl std::fmt::Debug for ServiceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("ServiceKeys").field("names", &names).finish_non_exhaustive()
    }
}

impl ServiceKeys {
    /// Parses WXHOST_SERVICE_KEYS; every problem is named at once, no key shown.
    pub fn parse(text: &str) -> anyhow::Result<ServiceKeys> {
        let mut keys: Vec<(String, SecretString)> = Vec::new();
        let mut problems = Vec::new();
        for (i, pair) in text.split(',').map(str::trim).enumerate() {
            let at = i + 1;
            let Some((name, key)) = pair.split_once('=') else {
                problems.push(format!("entry {at} is not name=key"));
                continue;
            };
            let (name, key) = (name.trim(), key.trim());
            let name_ok = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
            if !name_ok {
                problems.push(format!("entry {at}: the name must be 1-64 of a-z, 0-9, _ and -"));
            }
            if key.len() < MIN_KEY_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(format!(
                    "entry {at} ({name}): the key must be at least {MIN_KEY_BYTES} visible ASCII characters"
                ));
            }
            if keys.iter().any(|(_, k)| k.expose_secret() == key) {
                problems.push(format!("entry {at} ({name}): the same key is listed twice"));
            }
            keys.push((name.to_string(), SecretString::from(key.to_string())));
        }
        if !problems.is_empty() {
            anyhow::bail!("WXHOST_SERVICE_KEYS: {}", problems.join("; "));
        }
        Ok(ServiceKeys { keys })
    }

    /// The service `credential` belongs to, compared in constant time with every key.
    pub fn authenticate(&self, credential: &str) -> Option<&str> {
        let mut found = None;
        for (name, key) in &self.keys {
            if bool::from(key.expose_secret().as_bytes().ct_eq(credential.as_bytes())) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "k-billing-0123456789abcdef0123456789abcdef";
    const B: &str = "k-billing-NEW-0123456789abcdef0123456789ab";
    const C: &str = "k-classifier-0123456789abcdef0123456789abc";

    #[test]
    fn a_key_names_its_service_and_a_name_may_hold_an_old_and_a_new_key() {
        let keys = ServiceKeys::parse(&format!("billing={A}, billing={B},classifier={C}")).unwrap();
        assert_eq!(keys.authenticate(A), Some("billing"));
        assert_eq!(keys.authenticate(B), Some("billing"));
        assert_eq!(keys.authenticate(C), Some("classifier"));
        assert_eq!(keys.authenticate(""), None);
        assert_eq!(keys.authenticate(&A[..A.len() - 1]), None);
        assert_eq!(keys.authenticate(&format!("{A}x")), None);
        assert!(!format!("{keys:?}").contains(A), "no key in Debug");
    }

    #[test]
    fn every_bad_entry_is_named_and_no_key_is_shown() {
        let e = ServiceKeys::parse(&format!("billing=short,Bad Name={A},nokey,dup={C},dup2={C}"))
            .unwrap_err()
            .to_string();
        for part in [
            "entry 1 (billing): the key must be at least 32",
            "entry 2: the name",
            "entry 3 is not name=key",
            "entry 5 (dup2): the same key",
        ] {
            assert!(e.contains(part), "{part} missing from: {e}");
        }
        assert!(!e.contains(A) && !e.contains(C) && !e.contains("short"), "{e}");
    }
}
