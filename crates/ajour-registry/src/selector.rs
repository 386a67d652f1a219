//! Kubernetes-style equality label selectors, as Drogue's list endpoints take them.

use crate::RegistryError;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A parsed selector; every requirement must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else if part.contains(' ') || part.contains('(') {
                return Err(RegistryError::Invalid(format!(
                    "unsupported label selector '{part}': only k=v, k==v, k!=v, k and !k are supported"
                )));
            } else {
                Requirement::Exists(part.into())
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_equality_and_existence() {
        let labels: BTreeMap<_, _> = [
            ("env".to_string(), "prod".to_string()),
            ("zone".into(), "a".into()),
        ]
        .into();
        for (selector, expected) in [
            ("", true),
            ("env=prod", true),
            ("env==prod", true),
            ("env!=prod", false),
            ("env=dev", false),
            ("zone", true),
            ("!zone", false),
            ("!missing,env=prod", true),
            ("env=prod, zone=b", false),
        ] {
            assert_eq!(
                LabelSelector::parse(selector).unwrap().matches(&labels),
                expected,
                "{selector}"
            );
        }
        assert!(LabelSelector::parse("env in (a,b)").is_err());
    }
}
