//! Devices' aliases, in Drogue's form: `spec.alias`, a list of strings, each another name the
//! device is found by within its application, and unique there. Ajour looks a device up by one
//! when it signs in with a client certificate whose whole subject DN is listed
//! ([`crate::Registry::device_by_alias`]); the SQL registry keeps an index of them.

use crate::RegistryError;
use serde_json::{Map, Value};

/// The most aliases one device may list: enough for a certificate per key rotation and a few
/// other names, few enough that a device write stays a handful of index rows.
pub const MAX_ALIASES: usize = 64;

/// The longest alias, in bytes: a subject DN of many attributes fits, a stray blob does not.
pub const MAX_ALIAS_BYTES: usize = 1024;

/// The aliases in a device's `spec`, each once, in the order listed. `spec.alias` absent or
/// `null` is none; anything but a list of at most [`MAX_ALIASES`] non-empty strings of at most
/// [`MAX_ALIAS_BYTES`] bytes is [`RegistryError::Invalid`], saying what is wrong, so a device
/// write is refused (400) before anything is stored.
pub fn device_aliases(spec: &Map<String, Value>) -> Result<Vec<String>, RegistryError> {
    let invalid = |what: String| Err(RegistryError::Invalid(format!("spec.alias: {what}")));
    let list = match spec.get("alias") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return invalid("must be a list of strings".into()),
    };
    if list.len() > MAX_ALIASES {
        return invalid(format!(
            "{} aliases listed, at most {MAX_ALIASES} are allowed",
            list.len()
        ));
    }
    let mut aliases: Vec<String> = Vec::with_capacity(list.len());
    for (index, alias) in list.iter().enumerate() {
        let Some(alias) = alias.as_str() else {
            return invalid(format!("entry {index} is not a string"));
        };
        if alias.is_empty() {
            return invalid(format!("entry {index} is empty"));
        }
        if alias.len() > MAX_ALIAS_BYTES {
            return invalid(format!(
                "entry {index} is {} bytes long, at most {MAX_ALIAS_BYTES} are allowed",
                alias.len()
            ));
        }
        // Listed twice, found once: a list of names, not a multiset.
        if !aliases.iter().any(|seen| seen == alias) {
            aliases.push(alias.to_string());
        }
    }
    Ok(aliases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn aliases(spec: Value) -> Result<Vec<String>, String> {
        device_aliases(spec.as_object().unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_list_of_strings_is_taken_each_once_in_order() {
        assert_eq!(aliases(json!({})), Ok(vec![]));
        assert_eq!(aliases(json!({"alias": null})), Ok(vec![]));
        assert_eq!(aliases(json!({"alias": []})), Ok(vec![]));
        assert_eq!(
            aliases(json!({"alias": ["O=Drogue IoT, OU=Cloud, CN=Device 1", "b", "b", "a"]})),
            Ok(vec![
                "O=Drogue IoT, OU=Cloud, CN=Device 1".to_string(),
                "b".into(),
                "a".into()
            ])
        );
        let longest = "x".repeat(MAX_ALIAS_BYTES);
        let most: Vec<String> = (0..MAX_ALIASES).map(|i| format!("{i}")).collect();
        assert_eq!(aliases(json!({"alias": [longest]})).unwrap().len(), 1);
        assert_eq!(aliases(json!({"alias": most})).unwrap().len(), MAX_ALIASES);
    }

    #[test]
    fn anything_else_is_refused_saying_what_is_wrong() {
        let too_many: Vec<String> = (0..=MAX_ALIASES).map(|i| format!("{i}")).collect();
        let cases = [
            (json!({"alias": "a"}), "spec.alias: must be a list of strings"),
            (
                json!({"alias": {"a": 1}}),
                "spec.alias: must be a list of strings",
            ),
            (json!({"alias": ["a", 7]}), "spec.alias: entry 1 is not a string"),
            (json!({"alias": [null]}), "spec.alias: entry 0 is not a string"),
            (json!({"alias": ["a", ""]}), "spec.alias: entry 1 is empty"),
            (
                json!({"alias": ["x".repeat(MAX_ALIAS_BYTES + 1)]}),
                "spec.alias: entry 0 is 1025 bytes long, at most 1024 are allowed",
            ),
            (
                json!({"alias": too_many}),
                "spec.alias: 65 aliases listed, at most 64 are allowed",
            ),
        ];
        for (spec, expected) in cases {
            assert_eq!(aliases(spec.clone()), Err(expected.to_string()), "{spec}");
        }
        // Multi-byte characters count as the bytes they take.
        let wide = "é".repeat(MAX_ALIAS_BYTES / 2 + 1);
        assert!(aliases(json!({"alias": [wide]})).is_err());
    }
}
