//! Firmware names used as file names: parsed once, so no path built from one can escape the store.

use std::fmt;

/// A firmware name that is safe as a single path component: 1 to 128 of `A-Z a-z 0-9 . _ -`, not
/// starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FirmwareName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid firmware name '{name}': {reason}")]
pub struct InvalidName {
    pub name: String,
    pub reason: &'static str,
}

impl FirmwareName {
    pub const MAX_LEN: usize = 128;

    pub fn parse(name: &str) -> Result<Self, InvalidName> {
        let invalid = |reason| InvalidName {
            name: name.chars().take(Self::MAX_LEN + 8).collect(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("it is empty"));
        }
        if name.len() > Self::MAX_LEN {
            return Err(invalid("it is longer than 128 characters"));
        }
        if name.starts_with('.') {
            return Err(invalid("it starts with a dot"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(invalid("only letters, digits, '.', '_' and '-' are allowed"));
        }
        Ok(Self(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for FirmwareName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused() {
        for name in [
            "",
            "../../etc/passwd",
            "..",
            ".hidden",
            "a/b",
            "a\\b",
            "a\0b",
            "ä",
            &"x".repeat(129),
        ] {
            assert!(FirmwareName::parse(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn ordinary_names_are_accepted() {
        for name in ["app", "my-fw_1.2.3", "A", &"x".repeat(128)] {
            assert_eq!(FirmwareName::parse(name).unwrap().as_str(), name);
        }
    }
}
