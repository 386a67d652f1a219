//! Names of applications and devices, and the key that addresses either.

use std::fmt;

/// A name that breaks the grammar; the message says what the grammar is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(String);

/// An application name: a DNS label (1-63 of `a-z 0-9 -`, not starting or ending with `-`), as
/// Drogue requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AppName(String);

/// A device name: 1-253 of `A-Z a-z 0-9 . _ : -`, and not `.` or `..`. No `@` (it separates
/// device and application in credentials) and no `/` (it separates path segments and topics);
/// `.` and `..` are refused because as a path segment they name another resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceName(String);

impl AppName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let valid = (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        if valid {
            Ok(Self(name.to_string()))
        } else {
            Err(NameError(format!(
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
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let valid = (1..=253).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if valid {
            Ok(Self(name.to_string()))
        } else {
            Err(NameError(format!(
                "invalid device name '{}': use 1-253 letters, digits, '.', '_', ':' and '-' (not '.' or '..')",
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

/// Which object: an application, or a device of one.
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

    /// The device a device endpoint's user name stands for: `device@app`, or `device` with the
    /// application given apart (Drogue's `?application=`). `Ok(None)`: no application anywhere.
    pub fn from_device_user(user: &str, application: Option<&str>) -> Result<Option<Key>, NameError> {
        let (device, app) = match user.split_once('@') {
            Some((device, app)) => (device, app),
            None => match application {
                Some(app) => (user, app),
                None => return Ok(None),
            },
        };
        Ok(Some(Key::Device(
            AppName::parse(app)?,
            DeviceName::parse(device)?,
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_are_dns_labels() {
        for good in ["a", "my-app", "a1", &"a".repeat(63)] {
            assert!(AppName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "../x", &"a".repeat(64)] {
            assert!(AppName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_names_cannot_name_another_resource() {
        for good in ["dev", "dev-0", "a.b", "...", "x:y_z", &"d".repeat(253)] {
            assert!(DeviceName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            "a@b",
            "a b",
            &"d".repeat(254),
        ] {
            let error = DeviceName::parse(bad).unwrap_err();
            assert!(
                error.to_string().contains("invalid device name"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn device_users() {
        let key =
            |app: &str, dev: &str| Key::Device(AppName::parse(app).unwrap(), DeviceName::parse(dev).unwrap());
        assert_eq!(
            Key::from_device_user("dev@app", None).unwrap(),
            Some(key("app", "dev"))
        );
        assert_eq!(
            Key::from_device_user("dev", Some("app")).unwrap(),
            Some(key("app", "dev"))
        );
        // The user's own application wins over the query's.
        assert_eq!(
            Key::from_device_user("dev@app", Some("other")).unwrap(),
            Some(key("app", "dev"))
        );
        assert_eq!(Key::from_device_user("dev", None).unwrap(), None);
        assert!(Key::from_device_user("..@app", None).is_err());
        assert!(Key::from_device_user("dev@App", None).is_err());
    }
}
