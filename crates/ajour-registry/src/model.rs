//! The objects: Drogue's `metadata`/`spec`/`status` shape, and the names that address them.

use crate::RegistryError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;

/// Metadata of an application or a device, as Drogue writes it. Unknown fields are refused, as
/// Drogue refuses them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    /// The owning application; set on devices only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub generation: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resource_version: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Accepted for compatibility with Drogue clients that send them; not acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

/// An application or a device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: Map<String, Value>,
    #[serde(default)]
    pub status: Map<String, Value>,
}

/// An application name: a DNS label (1-63 of `a-z 0-9 -`, not starting or ending with `-`), as
/// Drogue requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppName(String);

/// A device name: 1-253 of `A-Z a-z 0-9 . _ : -`. No `@` (it separates device and application in
/// credentials) and no `/` (it separates path segments and topics).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl AppName {
    pub fn parse(name: &str) -> Result<Self, RegistryError> {
        let valid = (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if valid {
            Ok(Self(name.to_string()))
        } else {
            Err(RegistryError::Invalid(format!(
                "invalid application name '{}': use 1-63 lower-case letters, digits and '-', not starting or ending with '-'",
                truncate(name)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl DeviceName {
    pub fn parse(name: &str) -> Result<Self, RegistryError> {
        let valid = (1..=253).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if valid {
            Ok(Self(name.to_string()))
        } else {
            Err(RegistryError::Invalid(format!(
                "invalid device name '{}': use 1-253 letters, digits, '.', '_', ':' and '-'",
                truncate(name)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn truncate(name: &str) -> String {
    name.chars().take(80).collect()
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    App(AppName),
    Device(AppName, DeviceName),
}

impl Key {
    pub fn app(&self) -> &AppName {
        match self {
            Key::App(app) | Key::Device(app, _) => app,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::App(app) => write!(f, "application '{app}'"),
            Key::Device(app, device) => write!(f, "device '{device}' of application '{app}'"),
        }
    }
}

/// Which objects to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Apps,
    Devices(AppName),
}

/// Query parameters of a list, as Drogue takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ListParams {
    /// A label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated (all must hold).
    #[serde(default)]
    pub labels: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub offset: Option<usize>,
}
