//! Image references from specs, parsed once: a spec names an image relative to the configured
//! registry prefix, and nothing it says can reach outside that prefix.

use std::fmt;

/// The part of an image reference a spec may give when a registry prefix is configured:
/// `path/to/repo[:tag][@sha256:hex]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `registry/path/repo`, with the prefix applied.
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference '{image}': {reason}")]
pub struct InvalidImageRef {
    pub image: String,
    pub reason: &'static str,
}

/// Longest reference accepted, prefix included (distribution limits names to 255 characters).
const MAX_LEN: usize = 512;

impl ImageRef {
    /// Parse `image` (as written in a spec) under `prefix` (e.g. `registry.example.com/fw/`; empty
    /// when specs give full references). The tag defaults to `latest` when neither tag nor digest
    /// is given.
    pub fn parse(prefix: &str, image: &str) -> Result<Self, InvalidImageRef> {
        let invalid = |reason| InvalidImageRef {
            image: image.chars().take(MAX_LEN).collect(),
            reason,
        };
        if image.is_empty() {
            return Err(invalid("it is empty"));
        }
        if prefix.len() + image.len() > MAX_LEN {
            return Err(invalid("it is too long"));
        }
        if !image.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("only printable ASCII without spaces is allowed"));
        }
        let (rest, digest) = match image.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (image, None),
        };
        if let Some(digest) = digest {
            if !is_sha256_digest(digest) {
                return Err(invalid(
                    "the digest must be 'sha256:' and 64 lower-case hex digits",
                ));
            }
        }
        // A ':' after the last '/' starts the tag; one before it belongs to a registry host.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(colon) => (&rest[..last_slash + colon], Some(&rest[last_slash + colon + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            if !is_tag(tag) {
                return Err(invalid(
                    "a tag is 1 to 128 of 'A-Z a-z 0-9 _ . -', not starting with '.' or '-'",
                ));
            }
        }
        let prefix = prefix.trim_end_matches('/');
        let repository = if prefix.is_empty() {
            // A full reference: the first component may be a registry host (with a port).
            let (host, path) = match path.split_once('/') {
                Some((host, path)) if host.contains(['.', ':']) || host == "localhost" => (Some(host), path),
                _ => (None, path),
            };
            if let Some(host) = host {
                if !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
                {
                    return Err(invalid(
                        "the registry host has characters a host name cannot have",
                    ));
                }
            }
            check_path(path).map_err(invalid)?;
            path_with_host(host, path)
        } else {
            check_path(path).map_err(invalid)?;
            format!("{prefix}/{path}")
        };
        Ok(Self {
            repository,
            tag: match (tag, digest) {
                (None, None) => Some("latest".to_string()),
                (tag, _) => tag.map(str::to_string),
            },
            digest: digest.map(str::to_string),
        })
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// The same repository and tag, pinned to `digest`: fetched by the digest, while the tag
    /// still names the version of a raw layer.
    pub fn pinned_to(&self, digest: &str) -> Self {
        Self {
            repository: self.repository.clone(),
            tag: self.tag.clone(),
            digest: Some(digest.to_string()),
        }
    }

    /// The reference as the OCI client takes it.
    pub(crate) fn to_client_reference(&self) -> Result<oci_client::Reference, InvalidImageRef> {
        self.to_string().parse().map_err(|_| InvalidImageRef {
            image: self.to_string(),
            reason: "not a reference the registry client accepts (is the registry prefix valid?)",
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn path_with_host(host: Option<&str>, path: &str) -> String {
    match host {
        Some(host) => format!("{host}/{path}"),
        None => path.to_string(),
    }
}

/// Repository path components as distribution defines them: lower-case letters and digits,
/// separated by single `.`/`_`, `__` or runs of `-`. This excludes `..`, empty components and
/// leading or trailing separators, so a path cannot climb out of the prefix.
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the repository name is empty");
    }
    for component in path.split('/') {
        if component.is_empty() {
            return Err("the repository path has an empty component");
        }
        if !component
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err("a repository name has only lower-case letters, digits, '.', '_', '-' and '/'");
        }
        if !is_path_component(component) {
            return Err(
                "each repository path component is letters and digits joined by single '.', '_', '__' or runs of '-'",
            );
        }
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, distribution's path component, without a regex engine.
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let run = bytes[i..].iter().take_while(|b| alphanumeric(b)).count();
        if run == 0 {
            return false;
        }
        i += run;
        if i == bytes.len() {
            return true;
        }
        let separator = &component[i..i + bytes[i..].iter().take_while(|b| !alphanumeric(b)).count()];
        if !matches!(separator, "." | "_" | "__") && !separator.bytes().all(|b| b == b'-') {
            return false;
        }
        i += separator.len();
    }
}

fn is_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `sha256:` and 64 lower-case hex digits: the only digest algorithm this store checks.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn images_are_placed_under_the_prefix() {
        let image = ImageRef::parse("registry.example.com/fw/", "app").unwrap();
        assert_eq!(image.to_string(), "registry.example.com/fw/app:latest");
        let image = ImageRef::parse("127.0.0.1:5000/fw", "team/app:1.0.1").unwrap();
        assert_eq!(image.to_string(), "127.0.0.1:5000/fw/team/app:1.0.1");
        assert_eq!(image.tag(), Some("1.0.1"));
        let digest = format!("sha256:{}", "ab".repeat(32));
        let image = ImageRef::parse("r.io/fw/", &format!("app@{digest}")).unwrap();
        assert_eq!((image.tag(), image.digest()), (None, Some(digest.as_str())));
        assert!(image.to_client_reference().is_ok());
    }

    #[test]
    fn full_references_without_a_prefix() {
        let image = ImageRef::parse("", "127.0.0.1:5000/fw/app:2").unwrap();
        assert_eq!(image.to_string(), "127.0.0.1:5000/fw/app:2");
        let reference = image.to_client_reference().unwrap();
        assert_eq!(reference.registry(), "127.0.0.1:5000");
        assert_eq!(reference.repository(), "fw/app");
        assert_eq!(reference.tag(), Some("2"));
    }

    /// A piece of an image name for the property below: its text, and whether the grammar allows it.
    type Piece = (String, bool);

    fn piece(valid: &'static str, invalid: &'static [&'static str]) -> impl Strategy<Value = Piece> {
        prop_oneof![
            4 => valid.prop_map(|text| (text, true)),
            1 => proptest::sample::select(invalid).prop_map(|text| (text.to_string(), false)),
        ]
    }

    /// `component(/component)*[:tag][@digest]`, each part well-formed or hostile.
    fn image_name() -> impl Strategy<Value = (Vec<Piece>, Option<Piece>, Option<Piece>)> {
        let component = piece(
            "[a-z0-9]{1,6}(([._]|__|-{1,3})[a-z0-9]{1,6}){0,2}",
            &["..", ".", "", "UPPER", "a b", "-a", "a-", "a..b", "a___b", "_a"],
        );
        let tag = piece(
            "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
            &["", ".x", "-x", "a b", "../x"],
        );
        let digest = piece(
            "sha256:[0-9a-f]{64}",
            &["sha256:short", "md5:0123", "sha256:", ""],
        );
        (
            proptest::collection::vec(component, 1..4),
            proptest::option::of(tag),
            proptest::option::of(digest),
        )
    }

    proptest::proptest! {
        /// A name is accepted exactly when every part of it is well-formed, and then it stays
        /// under the prefix, keeps its parts, and is something the registry client takes.
        #[test]
        fn a_name_is_accepted_when_well_formed_and_then_stays_under_the_prefix(
            (components, tag, digest) in image_name()
        ) {
            let mut image = components.iter().map(|(text, _)| text.as_str()).collect::<Vec<_>>().join("/");
            if let Some((tag, _)) = &tag {
                image = format!("{image}:{tag}");
            }
            if let Some((digest, _)) = &digest {
                image = format!("{image}@{digest}");
            }
            let well_formed = components.iter().chain(&tag).chain(&digest).all(|(_, ok)| *ok);
            let parsed = ImageRef::parse("r.io/fw/", &image);
            proptest::prop_assert_eq!(parsed.is_ok(), well_formed, "{}: {:?}", image, parsed);
            let Ok(parsed) = parsed else { return Ok(()) };
            let path = components.iter().map(|(text, _)| text.as_str()).collect::<Vec<_>>().join("/");
            let reference = parsed.to_client_reference();
            proptest::prop_assert!(reference.is_ok(), "{}", image);
            let reference = reference.unwrap();
            proptest::prop_assert_eq!(reference.registry(), "r.io");
            proptest::prop_assert_eq!(reference.repository(), format!("fw/{path}"));
            let expected_tag = match (&tag, &digest) {
                (Some((tag, _)), _) => Some(tag.as_str()),
                (None, None) => Some("latest"),
                (None, Some(_)) => None,
            };
            proptest::prop_assert_eq!(parsed.tag(), expected_tag);
            proptest::prop_assert_eq!(parsed.digest(), digest.as_ref().map(|(d, _)| d.as_str()));
        }
    }

    #[test]
    fn path_components_follow_the_distribution_grammar() {
        for good in ["a", "fw", "a.b", "a_b", "a__b", "a-b", "a---b", "0a.b-c__d"] {
            assert!(is_path_component(good), "{good}");
        }
        for bad in ["0_-a", "a-_b", "a._b", "a..b", "a___b", "_a", "a-", ".", "-"] {
            assert!(!is_path_component(bad), "{bad}");
        }
    }

    #[test]
    fn hostile_and_malformed_references_are_refused() {
        for bad in [
            "",
            "../../x",
            "fw/../../etc",
            "/abs",
            "a//b",
            "a/",
            "UPPER",
            "a b",
            "a:",
            "a:-x",
            "a:../x",
            "evil.com:443/x",
            "a@sha256:short",
            "a@md5:0123",
            "a\nb",
            "a:1/b",
            "..",
            ".",
            "a/./b",
            "ünïcode",
        ] {
            assert!(ImageRef::parse("r.io/fw/", bad).is_err(), "{bad:?}");
        }
        assert!(ImageRef::parse("r.io/fw/", &"a".repeat(600)).is_err());
    }
}
