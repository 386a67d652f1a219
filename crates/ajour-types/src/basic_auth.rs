//! HTTP Basic credentials (RFC 7617), as devices send them to the device endpoints and tools
//! send the API token: `Basic base64(user:password)`. Parsed here once for every endpoint.

use base64::Engine;

/// `(user, password)` from the value of an `Authorization` header (or CoAP's option 4209), when
/// it is well-formed Basic credentials: scheme `Basic` in any case, standard base64, UTF-8, and a
/// `:` (the password may contain more).
pub fn parse(header_value: &str) -> Option<(String, String)> {
    let (scheme, encoded) = header_value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The header value for `user` and `password`.
pub fn encode(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        assert_eq!(
            parse(&encode("dev@app", "pa:ss")),
            Some(("dev@app".to_string(), "pa:ss".to_string()))
        );
        assert_eq!(parse("basic ZGV2OnB3"), Some(("dev".into(), "pw".into())));
        assert_eq!(parse("Bearer abc"), None);
        assert_eq!(parse("Basic !!!"), None);
        // No ':' in the decoded text.
        assert_eq!(parse("Basic ZGV2"), None);
        // Not UTF-8.
        assert_eq!(parse("Basic //79"), None);
        assert_eq!(parse("Basic"), None);
    }
}
