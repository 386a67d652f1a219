//! Device credentials in `spec.authentication.credentials` (legacy: `spec.credentials.credentials`).
//!
//! Passwords given in plain text (`{"pass":"x"}`, `{"pass":{"plain":"x"}}`, and the `password` of a
//! `user` credential) are replaced by a bcrypt hash before anything is stored. Hashes already in
//! Drogue's forms (`bcrypt`, `sha512` crypt) are kept as they are.

use serde_json::{Map, Value};

/// The result of checking a password against a device's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    Valid,
    Invalid,
}

/// Replace every plain-text password in `spec` by its bcrypt hash at `cost`.
/// Hashing happens where objects are stored, so only with the SQL registry.
#[cfg(feature = "sql")]
pub(crate) fn hash_plain_passwords(
    spec: &mut Map<String, Value>,
    cost: u32,
) -> Result<(), crate::RegistryError> {
    use crate::RegistryError;
    for credentials in credential_lists_mut(spec) {
        let Some(list) = credentials.as_array_mut() else {
            return Err(RegistryError::Invalid("credentials must be a list".into()));
        };
        for credential in list {
            let password = match credential {
                Value::Object(c) if c.contains_key("pass") => c.get_mut("pass"),
                Value::Object(c) if c.contains_key("user") => c
                    .get_mut("user")
                    .and_then(Value::as_object_mut)
                    .and_then(|u| u.get_mut("password")),
                _ => None,
            };
            if let Some(password) = password {
                if let Some(plain) = plain_text(password) {
                    let hash =
                        bcrypt::hash(plain, cost).map_err(|e| RegistryError::Hashing(e.to_string()))?;
                    *password = serde_json::json!({ "bcrypt": hash });
                }
            }
        }
    }
    Ok(())
}

/// Check `password`, presented for user `username`, against the credentials in `spec`. `pass`
/// credentials apply to every presented user name (the device's own); `user` credentials apply
/// when their `username` is the one presented. This may be slow (bcrypt): callers cache the result.
pub fn verify_password(spec: &Map<String, Value>, username: &str, password: &str) -> PasswordCheck {
    let found = credential_lists(spec)
        .flat_map(|list| list.as_array().into_iter().flatten())
        .filter_map(|credential| {
            let credential = credential.as_object()?;
            if let Some(pass) = credential.get("pass") {
                return Some(pass);
            }
            let user = credential.get("user")?.as_object()?;
            (user.get("username")?.as_str()? == username).then(|| user.get("password"))?
        })
        .any(|stored| password_matches(stored, password));
    if found {
        PasswordCheck::Valid
    } else {
        PasswordCheck::Invalid
    }
}

fn password_matches(stored: &Value, password: &str) -> bool {
    if let Some(plain) = plain_text(stored) {
        // Only objects stored before hashing existed (or written straight to the database) get here.
        return constant_time_eq(plain.as_bytes(), password.as_bytes());
    }
    let Some(object) = stored.as_object() else {
        return false;
    };
    if let Some(hash) = object.get("bcrypt").and_then(Value::as_str) {
        return bcrypt::verify(password, hash).unwrap_or(false);
    }
    if let Some(hash) = object.get("sha512").and_then(Value::as_str) {
        return sha_crypt::sha512_check(password, hash).is_ok();
    }
    false
}

fn plain_text(password: &Value) -> Option<&str> {
    match password {
        Value::String(plain) => Some(plain),
        Value::Object(o) => o.get("plain").and_then(Value::as_str),
        _ => None,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn credential_lists(spec: &Map<String, Value>) -> impl Iterator<Item = &Value> {
    let current = spec.get("authentication").and_then(|a| a.get("credentials"));
    let legacy = spec.get("credentials").and_then(|c| c.get("credentials"));
    current.into_iter().chain(legacy)
}

#[cfg(feature = "sql")]
fn credential_lists_mut(spec: &mut Map<String, Value>) -> impl Iterator<Item = &mut Value> {
    spec.iter_mut()
        .filter(|(section, _)| matches!(section.as_str(), "authentication" | "credentials"))
        .filter_map(|(_, section)| section.get_mut("credentials"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn plain_passwords_are_hashed_and_still_verify() {
        let mut s = spec(json!({"authentication": {"credentials": [
            {"pass": "hey-rodney"},
            {"pass": {"plain": "second"}},
            {"user": {"username": "alice", "password": "wonderland", "unique": false}},
            {"psk": {"key": "abc"}}
        ]}}));
        hash_plain_passwords(&mut s, 4).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        for secret in ["hey-rodney", "second", "wonderland"] {
            assert!(!text.contains(secret), "{secret} stored in plain text: {text}");
        }
        assert_eq!(verify_password(&s, "dev1", "hey-rodney"), PasswordCheck::Valid);
        assert_eq!(verify_password(&s, "dev1", "second"), PasswordCheck::Valid);
        assert_eq!(verify_password(&s, "alice", "wonderland"), PasswordCheck::Valid);
        assert_eq!(verify_password(&s, "bob", "wonderland"), PasswordCheck::Invalid);
        assert_eq!(verify_password(&s, "dev1", "wrong"), PasswordCheck::Invalid);
        assert_eq!(verify_password(&s, "dev1", ""), PasswordCheck::Invalid);
    }

    #[test]
    fn legacy_credentials_and_existing_hashes_are_understood() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let mut s =
            spec(json!({"credentials": {"credentials": [{"pass": {"bcrypt": hash}}, {"pass": "legacy"}]}}));
        hash_plain_passwords(&mut s, 4).unwrap();
        assert_eq!(verify_password(&s, "d", "pw"), PasswordCheck::Valid);
        assert_eq!(verify_password(&s, "d", "legacy"), PasswordCheck::Valid);
        assert_eq!(verify_password(&Map::new(), "d", "pw"), PasswordCheck::Invalid);
    }
}
