//! The two roles of the seed architecture. A leaf: configuration, settings
//! and the capabilities all speak of roles, and none of them is below another
//! because of it.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// What WeChat calls: server verification, message push, payment notify. No database.
    Web,
    /// Business and frontend APIs, the database, outbound WeChat calls, internal endpoints.
    App,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Web, Role::App];

    pub fn name(self) -> &'static str {
        match self {
            Role::Web => "web",
            Role::App => "app",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// A request's deadline unless plugins.toml sets one: well under WeChat's
    /// 5 s for the web role.
    pub fn default_deadline_ms(self) -> u64 {
        match self {
            Role::Web => 2_000,
            Role::App => 10_000,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
