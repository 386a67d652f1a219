//! The firmware section of a spec (`spec.firmware`), as Drogue Cloud and the original Ajour write it.

use serde::Deserialize;
use serde_json::Value;

/// Which firmware a device should run and where it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FirmwareSpec {
    /// An image in an OCI registry (`container`, written `oci` before 2022-08).
    Container {
        image: String,
        pull_policy: ImagePullPolicy,
    },
    /// A Hawkbit controller id.
    Hawkbit { controller: String },
    /// Files `{name}.json` and `{name}.bin` in the server's firmware directory.
    File { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
pub enum ImagePullPolicy {
    /// Resolve a tag once, then reuse what it resolved to.
    #[default]
    IfNotPresent,
    /// Resolve the tag again (at most once per configured interval).
    Always,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid spec.firmware: {0}")]
pub struct SpecError(String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ContainerSection {
    image: String,
    #[serde(default)]
    image_pull_policy: ImagePullPolicy,
    // The build section is for the builder, not for serving.
    #[serde(default)]
    #[allow(dead_code)]
    build: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HawkbitSection {
    controller: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSection {
    name: String,
}

impl FirmwareSpec {
    /// Parse `spec.firmware`. Exactly one of `container`/`oci`, `hawkbit`, `file` must be set.
    pub fn from_json(section: &Value) -> Result<Self, SpecError> {
        let object = section
            .as_object()
            .ok_or_else(|| SpecError("expected an object".into()))?;
        let mut kinds = object
            .keys()
            .filter(|k| matches!(k.as_str(), "container" | "oci" | "hawkbit" | "file"));
        let kind = match (kinds.next(), kinds.next()) {
            (Some(kind), None) => kind.as_str(),
            (None, _) => {
                return Err(SpecError(
                    "expected one of 'container' (or 'oci'), 'hawkbit', 'file'".into(),
                ))
            }
            (Some(a), Some(b)) => return Err(SpecError(format!("both '{a}' and '{b}' are set; choose one"))),
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !matches!(k.as_str(), "container" | "oci" | "hawkbit" | "file"))
        {
            return Err(SpecError(format!("unknown field '{unknown}'")));
        }
        let body = object[kind].clone();
        let parse_error = |e: serde_json::Error| SpecError(format!("{kind}: {e}"));
        Ok(match kind {
            "container" | "oci" => {
                let section: ContainerSection = serde_json::from_value(body).map_err(parse_error)?;
                FirmwareSpec::Container {
                    image: section.image,
                    pull_policy: section.image_pull_policy,
                }
            }
            "hawkbit" => {
                let section: HawkbitSection = serde_json::from_value(body).map_err(parse_error)?;
                FirmwareSpec::Hawkbit {
                    controller: section.controller,
                }
            }
            _ => {
                let section: FileSection = serde_json::from_value(body).map_err(parse_error)?;
                FirmwareSpec::File { name: section.name }
            }
        })
    }

    /// A short description for logs and status messages.
    pub fn describe(&self) -> String {
        match self {
            FirmwareSpec::Container { image, .. } => format!("container image '{image}'"),
            FirmwareSpec::Hawkbit { controller } => format!("hawkbit controller '{controller}'"),
            FirmwareSpec::File { name } => format!("file '{name}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_kind_and_the_oci_alias() {
        assert_eq!(
            FirmwareSpec::from_json(&json!({"container": {"image": "fw:1", "imagePullPolicy": "Always"}}))
                .unwrap(),
            FirmwareSpec::Container {
                image: "fw:1".into(),
                pull_policy: ImagePullPolicy::Always
            }
        );
        assert_eq!(
            FirmwareSpec::from_json(&json!({"oci": {"image": "fw:1"}})).unwrap(),
            FirmwareSpec::Container {
                image: "fw:1".into(),
                pull_policy: ImagePullPolicy::IfNotPresent
            }
        );
        assert_eq!(
            FirmwareSpec::from_json(&json!({"hawkbit": {"controller": "c1"}})).unwrap(),
            FirmwareSpec::Hawkbit {
                controller: "c1".into()
            }
        );
        assert_eq!(
            FirmwareSpec::from_json(&json!({"file": {"name": "app"}})).unwrap(),
            FirmwareSpec::File { name: "app".into() }
        );
    }

    #[test]
    fn refuses_ambiguous_or_malformed_sections() {
        for bad in [
            json!("file"),
            json!({}),
            json!({"file": {"name": "a"}, "oci": {"image": "b"}}),
            json!({"file": {}}),
            json!({"file": {"name": 3}}),
            json!({"file": {"name": "a", "extra": 1}}),
            json!({"container": {"image": "a", "imagePullPolicy": "Sometimes"}}),
            json!({"file": {"name": "a"}, "bogus": 1}),
        ] {
            assert!(FirmwareSpec::from_json(&bad).is_err(), "{bad}");
        }
    }
}
