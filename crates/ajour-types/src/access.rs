//! Who may do what to an application, as Drogue Cloud has it: an application has an owner and
//! members, each member has a role, and a role allows a kind of request. Pure rules; the API
//! enforces them and the registry stores them (`ajour_registry::AccessStore`).
//!
//! - The owner may do everything, including changing members and handing the application over.
//! - `admin`: everything but handing the application over.
//! - `manager`: read and write (firmware, devices, credentials, rollouts), not members.
//! - `reader`: read only.
//! - Anyone else does not see the application at all: it answers as if it did not exist.
//!
//! User names are what access tokens are issued to: the same rules as application names, so a
//! name is safe in a path, a log line and a database key.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A member's role, spelled as Drogue spells it on the wire (`admin`, `manager`, `reader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    Reader,
    Manager,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Manager => "manager",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text.to_ascii_lowercase().as_str() {
            "reader" => Some(Role::Reader),
            "manager" => Some(Role::Manager),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether this role allows `need`.
    pub fn allows(self, need: Need) -> bool {
        match need {
            Need::Read => true,
            Need::Write => self >= Role::Manager,
            Need::Admin => self == Role::Admin,
        }
    }
}

/// What a request needs of the application it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Reading it, its devices, their histories, its rollouts.
    Read,
    /// Changing its firmware, devices, credentials; starting and steering rollouts.
    Write,
    /// Reading and changing its members; deleting it.
    Admin,
}

impl Need {
    /// What the refusal says the caller lacks.
    pub fn describe(self) -> &'static str {
        match self {
            Need::Read => "read access",
            Need::Write => "write access (role manager or admin)",
            Need::Admin => "the admin role",
        }
    }
}

/// An application's owner, members and pending transfer, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppAccess {
    /// `None`: created with the server's bootstrap token; only that token's holder and the
    /// members reach it.
    pub owner: Option<String>,
    pub members: BTreeMap<String, Role>,
    /// A user the owner offered the application to, who has not accepted yet.
    pub transfer_to: Option<String>,
    /// Changes with every write of the members: Drogue's `resourceVersion` for optimistic locking.
    pub revision: String,
}

impl AppAccess {
    /// The role `user` has: the owner's is admin; a user who is neither owner nor member has none.
    pub fn role_of(&self, user: &str) -> Option<Role> {
        if self.owner.as_deref() == Some(user) {
            return Some(Role::Admin);
        }
        self.members.get(user).copied()
    }

    pub fn is_owner(&self, user: &str) -> bool {
        self.owner.as_deref() == Some(user)
    }
}

/// Check a user name: 1 to 63 characters of lower-case letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit, so it can never be a path or hold a `:` of Basic credentials.
pub fn check_user_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid user name {name:?}: 1 to 63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_drogue_documents() {
        let table = [
            (Role::Reader, [true, false, false]),
            (Role::Manager, [true, true, false]),
            (Role::Admin, [true, true, true]),
        ];
        for (role, allowed) in table {
            for (need, expected) in [Need::Read, Need::Write, Need::Admin].into_iter().zip(allowed) {
                assert_eq!(role.allows(need), expected, "{role:?} {need:?}");
            }
        }
    }

    #[test]
    fn owner_is_admin_and_strangers_have_no_role() {
        let access = AppAccess {
            owner: Some("olga".into()),
            members: BTreeMap::from([("rita".to_string(), Role::Reader)]),
            ..Default::default()
        };
        assert_eq!(access.role_of("olga"), Some(Role::Admin));
        assert_eq!(access.role_of("rita"), Some(Role::Reader));
        assert_eq!(access.role_of("mallory"), None);
        assert_eq!(AppAccess::default().role_of("olga"), None);
    }

    #[test]
    fn roles_round_trip_drogue_spelling() {
        for role in [Role::Reader, Role::Manager, Role::Admin] {
            let json = serde_json::to_value(role).unwrap();
            assert_eq!(json, role.as_str());
            assert_eq!(serde_json::from_value::<Role>(json).unwrap(), role);
            assert_eq!(Role::parse(&role.as_str().to_uppercase()), Some(role));
        }
        assert_eq!(Role::parse("owner"), None);
    }

    #[test]
    fn hostile_user_names_are_refused() {
        for bad in [
            "",
            "../../etc/passwd",
            "a:b",
            "Alice",
            "-x",
            &"a".repeat(64),
            "a b",
            "ä",
        ] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
        for good in ["alice", "ci-bot", "j.doe", "0x"] {
            assert!(check_user_name(good).is_ok(), "{good:?}");
        }
    }
}
