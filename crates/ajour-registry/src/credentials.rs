//! Device credentials in `spec.authentication.credentials` (legacy: `spec.credentials.credentials`),
//! and how a presented password is checked against them with one keyed hash.
//!
//! Design (docs/credentials.md has the threat model): a password the server sees in plain text
//! (`{"pass":"x"}`, `{"pass":{"plain":"x"}}`, the `password` of a `user` credential) is stored as
//! a *keyed verifier*, `{"keyed":{"key":ID,"mac":B64}}`: HMAC-SHA256 under a server secret that
//! lives outside the database ([`CredentialKeys`]), over the application, the device, the login
//! name and the password. A copy of the database alone then gives nothing to guess against; a
//! device is checked with one HMAC, on every instance and after every restart.
//!
//! Hashes imported in Drogue's forms (`bcrypt`, `sha512` crypt) are kept as they are and verified
//! the slow way once; the server then knows the password and stores a *derived verifier* (the same
//! keyed MAC, bound to the credential it was checked against) in `status.authentication`, so later
//! checks are fast too. The same happens when a password verifies under a previous key after the
//! secret was rotated: it is re-keyed under the current one.

use crate::model::{AppName, DeviceName};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use subtle::ConstantTimeEq;

/// The status section that holds derived verifiers.
pub const VERIFIERS_SECTION: &str = "authentication";
/// Derived verifiers kept per device: one per password credential is what is needed.
const MAX_DERIVED: usize = 8;

/// One server secret, named by an id derived from it (which says nothing about the secret).
#[derive(Clone)]
pub struct CredentialKey {
    id: String,
    secret: [u8; 32],
    /// HMAC keyed with `secret`, its key blocks already hashed: each verifier starts from a copy,
    /// which saves two of the SHA-256 blocks a device's every sign-in would hash.
    keyed: Hmac<Sha256>,
}

impl CredentialKey {
    pub fn new(secret: [u8; 32]) -> Self {
        let digest = Sha256::new_with_prefix(b"ajour credential key id\0")
            .chain_update(secret)
            .finalize();
        Self {
            id: hex::encode(&digest[..6]),
            secret,
            keyed: Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes any key length"),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The verifier of `password` presented as `login` by device `device` of `app`.
    fn mac(&self, app: &str, device: &str, login: &str, password: &str) -> [u8; 32] {
        let mut mac = self.keyed.clone();
        // Length-prefixed, so no two tuples feed the same bytes.
        for part in ["ajour-credential-v1", app, device, login, password] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialKey({}, secret redacted)", self.id)
    }
}

/// The server's credential secrets: the first is current (new verifiers use it), the others are
/// previous ones still accepted, so a rotation never locks a device out.
#[derive(Debug, Clone)]
pub struct CredentialKeys {
    keys: Vec<CredentialKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
}

impl CredentialKeys {
    /// One fresh random key (a new installation, or a test).
    pub fn generate() -> Self {
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        Self {
            keys: vec![CredentialKey::new(secret)],
        }
    }

    /// A random key made once per process and shared by every default ([`crate::SqlRegistryOptions`],
    /// the update service's configuration), so that parts built with defaults agree. A server
    /// passes the key it keeps instead: this one dies with the process.
    pub fn for_this_process() -> std::sync::Arc<Self> {
        static KEYS: std::sync::OnceLock<std::sync::Arc<CredentialKeys>> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| std::sync::Arc::new(Self::generate())).clone()
    }

    /// Keys written as base64 of 32 bytes, current first, one per line or separated by commas
    /// (the form for an environment variable); blank lines and lines starting with `#` are ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let lines = text.lines().enumerate().map(|(n, line)| (n, line.trim()));
        for (number, line) in lines.filter(|(_, line)| !line.starts_with('#')) {
            for key in line.split(',').map(str::trim).filter(|key| !key.is_empty()) {
                keys.push(Self::parse_key(key, number)?);
            }
        }
        if keys.is_empty() {
            return Err(KeyError::Invalid("no key in the credential secret".into()));
        }
        Ok(Self { keys })
    }

    fn parse_key(key: &str, number: usize) -> Result<CredentialKey, KeyError> {
        let invalid = |what: String| KeyError::Invalid(format!("line {}: {what}", number + 1));
        let bytes = B64.decode(key).map_err(|e| invalid(format!("not base64: {e}")))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|bytes: Vec<u8>| invalid(format!("a key is 32 bytes, this one is {}", bytes.len())))?;
        Ok(CredentialKey::new(secret))
    }

    /// The file form of these keys ([`Self::parse`] reads it back).
    pub fn to_text(&self) -> String {
        let mut text = String::from(
            "# Ajour's credential secret: device password verifiers are keyed with it.\n\
             # First line: current key. Lines below: previous keys, still accepted.\n\
             # Keep it apart from database backups; without it every stored password must be set again.\n",
        );
        for key in &self.keys {
            text.push_str(&B64.encode(key.secret));
            text.push('\n');
        }
        text
    }

    /// Read the keys in `path`; when the file is missing and `create` holds, write a new random
    /// key there (readable by its owner only). Returns the keys and whether they were created.
    pub fn load_or_create(path: &Path, create: bool) -> Result<(Self, bool), KeyError> {
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text)
                .map(|keys| (keys, false))
                .map_err(|e| KeyError::Invalid(format!("{}: {e}", path.display()))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && create => {
                let keys = Self::generate();
                write_owner_only(path, keys.to_text().as_bytes()).map_err(io)?;
                Ok((keys, true))
            }
            Err(error) => Err(io(error)),
        }
    }

    pub fn current(&self) -> &CredentialKey {
        &self.keys[0]
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(CredentialKey::id)
    }

    fn by_id(&self, id: &str) -> Option<&CredentialKey> {
        self.keys.iter().find(|key| key.id == id)
    }
}

#[cfg(unix)]
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// Replace every plain-text password in the spec of device `device` of `app` by its keyed
/// verifier under the current key. An empty password, a `user` credential without a user name
/// and a password in a form Ajour cannot verify are refused.
pub fn seal_plain_passwords(
    app: &AppName,
    device: &DeviceName,
    spec: &mut Map<String, Value>,
    keys: &CredentialKeys,
) -> Result<(), crate::RegistryError> {
    use crate::RegistryError::Invalid;
    for credentials in credential_lists_mut(spec) {
        let Some(list) = credentials.as_array_mut() else {
            return Err(Invalid("credentials must be a list".into()));
        };
        for credential in list {
            let Some(credential) = credential.as_object_mut() else {
                return Err(Invalid("a credential is an object".into()));
            };
            let (login, password) = if let Some(pass) = credential.get_mut("pass") {
                (device.as_str().to_string(), pass)
            } else if let Some(user) = credential.get_mut("user").and_then(Value::as_object_mut) {
                let login = match user.get("username").and_then(Value::as_str) {
                    Some(name) if !name.is_empty() && !name.contains(['@', ':']) => name.to_string(),
                    _ => {
                        return Err(Invalid(
                            "a user credential needs a username without '@' or ':'".into(),
                        ))
                    }
                };
                let Some(password) = user.get_mut("password") else {
                    return Err(Invalid(format!("user credential '{login}' has no password")));
                };
                (login, password)
            } else {
                continue;
            };
            match StoredForm::of(password) {
                StoredForm::Plain("") => return Err(Invalid("an empty password is not a credential".into())),
                StoredForm::Plain(plain) => {
                    let key = keys.current();
                    let mac = key.mac(app.as_str(), device.as_str(), &login, plain);
                    *password = json!({"keyed": {"key": key.id(), "mac": B64.encode(mac)}});
                }
                StoredForm::Unknown => {
                    return Err(Invalid(
                        "a password is a string or one of {\"plain\"|\"bcrypt\"|\"sha512\": ...}".into(),
                    ))
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The user names of `unique` user credentials: each finds its device (Drogue's alias).
pub fn unique_user_names(spec: &Map<String, Value>) -> Vec<String> {
    credential_lists(spec)
        .flat_map(|list| list.as_array().into_iter().flatten())
        .filter_map(|credential| {
            let user = credential.get("user")?.as_object()?;
            if user.get("unique").and_then(Value::as_bool) != Some(true) {
                return None;
            }
            user.get("username")?.as_str().map(str::to_string)
        })
        .collect()
}

/// How a password is stored.
enum StoredForm<'a> {
    Plain(&'a str),
    Keyed { key: &'a str, mac: [u8; 32] },
    Bcrypt(&'a str),
    Sha512(&'a str),
    Unknown,
}

impl<'a> StoredForm<'a> {
    fn of(value: &'a Value) -> Self {
        let object = match value {
            Value::String(plain) => return StoredForm::Plain(plain),
            Value::Object(object) if object.len() == 1 => object,
            _ => return StoredForm::Unknown,
        };
        let (form, value) = object.iter().next().expect("one entry");
        match (form.as_str(), value) {
            ("plain", Value::String(plain)) => StoredForm::Plain(plain),
            ("bcrypt", Value::String(hash)) => StoredForm::Bcrypt(hash),
            ("sha512", Value::String(hash)) => StoredForm::Sha512(hash),
            ("keyed", keyed) => {
                let key = keyed.get("key").and_then(Value::as_str);
                let mac = keyed
                    .get("mac")
                    .and_then(Value::as_str)
                    .and_then(|m| B64.decode(m).ok())
                    .and_then(|m| <[u8; 32]>::try_from(m).ok());
                match (key, mac) {
                    (Some(key), Some(mac)) => StoredForm::Keyed { key, mac },
                    _ => StoredForm::Unknown,
                }
            }
            _ => StoredForm::Unknown,
        }
    }
}

/// A password credential of one device, as read from its spec.
#[derive(Debug, Clone)]
struct PasswordCredential {
    /// The name it is presented with: the device's own for `pass`, the user name for `user`.
    login: String,
    stored: Value,
    /// Names this credential in derived verifiers: a changed credential voids them.
    fingerprint: String,
}

/// A verifier the server derived from a password it saw verify (`status.authentication`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedVerifier {
    credential: String,
    key: String,
    mac: [u8; 32],
}

impl DerivedVerifier {
    fn to_json(&self) -> Value {
        json!({"credential": self.credential, "key": self.key, "mac": B64.encode(self.mac)})
    }

    fn from_json(value: &Value) -> Option<Self> {
        Some(Self {
            credential: value.get("credential")?.as_str()?.to_string(),
            key: value.get("key")?.as_str()?.to_string(),
            mac: B64.decode(value.get("mac")?.as_str()?).ok()?.try_into().ok()?,
        })
    }

    /// The `status.authentication` section with `self` in place of any verifier of the same
    /// credential.
    pub fn merged_into(&self, section: Option<&Value>) -> Value {
        let mut verifiers: Vec<Value> = section
            .and_then(|s| s.get("verifiers"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|v| v.get("credential").and_then(Value::as_str) != Some(&self.credential))
            .cloned()
            .collect();
        verifiers.push(self.to_json());
        let excess = verifiers.len().saturating_sub(MAX_DERIVED);
        verifiers.drain(..excess);
        json!({ "verifiers": verifiers })
    }
}

/// The outcome of the fast check of a password.
#[derive(Debug, PartialEq, Eq)]
pub enum FastCheck {
    /// It matches. `derive` is set when a verifier under the current key should be stored (the
    /// match was under a previous key).
    Valid {
        derive: Option<DerivedVerifier>,
    },
    /// It matches no credential that could be checked fast, but these may still verify slowly:
    /// imported hashes that never verified before.
    Slow(Vec<SlowCheck>),
    Invalid,
}

/// An imported hash to verify `password` against; on success, [`SlowCheck::derive`] says what
/// to store so that the next check is fast.
#[derive(Debug, PartialEq, Eq)]
pub struct SlowCheck {
    credential: PasswordCredentialRef,
}

#[derive(Debug, PartialEq, Eq)]
struct PasswordCredentialRef {
    stored: Value,
    fingerprint: String,
}

impl SlowCheck {
    /// Whether `password` matches the hash. Slow by design (bcrypt, sha512-crypt): run it off the
    /// async workers. bcrypt reads only 72 bytes of a password, so a longer one is refused rather
    /// than checked in part.
    pub fn verify(&self, password: &str) -> bool {
        match StoredForm::of(&self.credential.stored) {
            StoredForm::Bcrypt(hash) => {
                password.len() <= 72 && bcrypt::verify(password, hash).unwrap_or(false)
            }
            StoredForm::Sha512(hash) => sha_crypt::sha512_check(password, hash).is_ok(),
            _ => false,
        }
    }
}

/// A device's password credentials and derived verifiers, read once from its spec and status.
#[derive(Debug, Clone, Default)]
pub struct DeviceCredentials {
    app: String,
    device: String,
    passwords: Vec<PasswordCredential>,
    derived: Vec<DerivedVerifier>,
}

impl DeviceCredentials {
    pub fn from_device(
        app: &AppName,
        device: &DeviceName,
        spec: &Map<String, Value>,
        status: &Map<String, Value>,
    ) -> Self {
        let passwords = credential_lists(spec)
            .flat_map(|list| list.as_array().into_iter().flatten())
            .filter_map(|credential| {
                let (login, stored) = if let Some(pass) = credential.get("pass") {
                    (device.as_str(), pass)
                } else {
                    let user = credential.get("user")?;
                    (user.get("username")?.as_str()?, user.get("password")?)
                };
                let fingerprint = hex::encode(
                    Sha256::new_with_prefix(login.as_bytes())
                        .chain_update([0])
                        .chain_update(stored.to_string())
                        .finalize(),
                );
                Some(PasswordCredential {
                    login: login.to_string(),
                    stored: stored.clone(),
                    fingerprint,
                })
            })
            .collect();
        let derived = status
            .get(VERIFIERS_SECTION)
            .and_then(|s| s.get("verifiers"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(DerivedVerifier::from_json)
            .collect();
        Self {
            app: app.to_string(),
            device: device.to_string(),
            passwords,
            derived,
        }
    }

    /// Check `password` presented as `login` with keyed hashes only (a few microseconds).
    pub fn check_fast(&self, keys: &CredentialKeys, login: &str, password: &str) -> FastCheck {
        let current = keys.current();
        let mac_under = |key: &CredentialKey| key.mac(&self.app, &self.device, login, password);
        let current_mac = mac_under(current);
        let matches = |key_id: &str, stored: &[u8; 32]| match keys.by_id(key_id) {
            Some(key) if key.id() == current.id() => bool::from(current_mac.ct_eq(stored)),
            Some(key) => bool::from(mac_under(key).ct_eq(stored)),
            None => false,
        };
        let mut slow = Vec::new();
        for credential in self.passwords.iter().filter(|c| c.login == login) {
            let derived: Vec<&DerivedVerifier> = self
                .derived
                .iter()
                .filter(|d| d.credential == credential.fingerprint)
                .collect();
            let derive_current = || {
                Some(DerivedVerifier {
                    credential: credential.fingerprint.clone(),
                    key: current.id().to_string(),
                    mac: current_mac,
                })
            };
            let has_current = derived.iter().any(|d| d.key == current.id());
            for verifier in &derived {
                if matches(&verifier.key, &verifier.mac) {
                    return FastCheck::Valid {
                        derive: (!has_current).then(derive_current).flatten(),
                    };
                }
            }
            match StoredForm::of(&credential.stored) {
                StoredForm::Keyed { key, mac } if matches(key, &mac) => {
                    let rekey = key != current.id() && !has_current;
                    return FastCheck::Valid {
                        derive: rekey.then(derive_current).flatten(),
                    };
                }
                // Only objects stored before Ajour sealed passwords (or written to the database
                // by hand) hold plain text.
                StoredForm::Plain(plain)
                    if !plain.is_empty() && bool::from(plain.as_bytes().ct_eq(password.as_bytes())) =>
                {
                    return FastCheck::Valid { derive: None };
                }
                // An imported hash that verified before has a verifier: a password that misses
                // it is wrong, and costs no slow hash.
                StoredForm::Bcrypt(_) | StoredForm::Sha512(_) if derived.is_empty() => slow.push(SlowCheck {
                    credential: PasswordCredentialRef {
                        stored: credential.stored.clone(),
                        fingerprint: credential.fingerprint.clone(),
                    },
                }),
                _ => {}
            }
        }
        if slow.is_empty() {
            FastCheck::Invalid
        } else {
            FastCheck::Slow(slow)
        }
    }

    /// The verifier to store after `password`, presented as `login`, verified slowly against `check`.
    pub fn derive(
        &self,
        keys: &CredentialKeys,
        check: &SlowCheck,
        login: &str,
        password: &str,
    ) -> DerivedVerifier {
        let key = keys.current();
        DerivedVerifier {
            credential: check.credential.fingerprint.clone(),
            key: key.id().to_string(),
            mac: key.mac(&self.app, &self.device, login, password),
        }
    }

    /// Key ids the stored credentials use that are not among `keys` (the secret was lost or
    /// replaced): worth a warning, since those devices cannot log in.
    pub fn unknown_keys<'a>(&'a self, keys: &'a CredentialKeys) -> impl Iterator<Item = &'a str> + 'a {
        self.passwords
            .iter()
            .filter_map(move |c| match StoredForm::of(&c.stored) {
                StoredForm::Keyed { key, .. } if keys.by_id(key).is_none() => Some(key),
                _ => None,
            })
    }
}

fn credential_lists(spec: &Map<String, Value>) -> impl Iterator<Item = &Value> {
    let current = spec.get("authentication").and_then(|a| a.get("credentials"));
    let legacy = spec.get("credentials").and_then(|c| c.get("credentials"));
    current.into_iter().chain(legacy)
}

fn credential_lists_mut(spec: &mut Map<String, Value>) -> impl Iterator<Item = &mut Value> {
    spec.iter_mut()
        .filter(|(section, _)| matches!(section.as_str(), "authentication" | "credentials"))
        .filter_map(|(_, section)| section.get_mut("credentials"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (AppName, DeviceName) {
        (AppName::parse("app").unwrap(), DeviceName::parse("dev1").unwrap())
    }

    fn spec(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn sealed(value: Value, keys: &CredentialKeys) -> DeviceCredentials {
        let (app, device) = names();
        let mut s = spec(value);
        seal_plain_passwords(&app, &device, &mut s, keys).unwrap();
        DeviceCredentials::from_device(&app, &device, &s, &Map::new())
    }

    fn valid(check: FastCheck) -> bool {
        matches!(check, FastCheck::Valid { .. })
    }

    #[test]
    fn plain_passwords_are_sealed_and_verify_with_one_keyed_hash() {
        let keys = CredentialKeys::generate();
        let (app, device) = names();
        let mut s = spec(json!({"authentication": {"credentials": [
            {"pass": "hey-rodney"},
            {"pass": {"plain": "second"}},
            {"user": {"username": "alice", "password": "wonderland", "unique": true}},
            {"psk": {"key": "abc"}}
        ]}}));
        seal_plain_passwords(&app, &device, &mut s, &keys).unwrap();
        let text = serde_json::to_string(&s).unwrap();
        for secret in ["hey-rodney", "second", "wonderland"] {
            assert!(!text.contains(secret), "{secret} stored in plain text: {text}");
        }
        assert!(text.contains("\"psk\""), "other credentials are kept: {text}");
        let creds = DeviceCredentials::from_device(&app, &device, &s, &Map::new());
        assert!(valid(creds.check_fast(&keys, "dev1", "hey-rodney")));
        assert!(valid(creds.check_fast(&keys, "dev1", "second")));
        assert!(valid(creds.check_fast(&keys, "alice", "wonderland")));
        assert_eq!(creds.check_fast(&keys, "bob", "wonderland"), FastCheck::Invalid);
        assert_eq!(creds.check_fast(&keys, "dev1", "wonderland"), FastCheck::Invalid);
        assert_eq!(creds.check_fast(&keys, "dev1", "wrong"), FastCheck::Invalid);
        assert_eq!(creds.check_fast(&keys, "dev1", ""), FastCheck::Invalid);
        assert_eq!(unique_user_names(&s), vec!["alice".to_string()]);
    }

    #[test]
    fn a_verifier_is_bound_to_its_device_and_key() {
        let keys = CredentialKeys::generate();
        let creds = sealed(
            json!({"authentication": {"credentials": [{"pass": "pw"}]}}),
            &keys,
        );
        // The same stored form on another device, or checked with another secret, verifies nothing.
        let other = DeviceName::parse("dev2").unwrap();
        let moved = DeviceCredentials {
            device: other.to_string(),
            ..creds.clone()
        };
        assert_eq!(moved.check_fast(&keys, "dev2", "pw"), FastCheck::Invalid);
        assert_eq!(
            creds.check_fast(&CredentialKeys::generate(), "dev1", "pw"),
            FastCheck::Invalid
        );
    }

    #[test]
    fn passwords_longer_than_bcrypt_reads_are_checked_in_full() {
        let keys = CredentialKeys::generate();
        let long = "A".repeat(72);
        let creds = sealed(
            json!({"authentication": {"credentials": [{"pass": format!("{long}tail")}]}}),
            &keys,
        );
        assert!(valid(creds.check_fast(&keys, "dev1", &format!("{long}tail"))));
        assert_eq!(
            creds.check_fast(&keys, "dev1", &format!("{long}other")),
            FastCheck::Invalid
        );
        assert_eq!(creds.check_fast(&keys, "dev1", &long), FastCheck::Invalid);
        // An imported bcrypt hash cannot check more than 72 bytes: longer passwords are refused.
        let (app, device) = names();
        let hash = bcrypt::hash(&long, 4).unwrap();
        let imported = DeviceCredentials::from_device(
            &app,
            &device,
            &spec(json!({"authentication": {"credentials": [{"pass": {"bcrypt": hash}}]}})),
            &Map::new(),
        );
        let FastCheck::Slow(checks) = imported.check_fast(&keys, "dev1", &format!("{long}x")) else {
            panic!("an imported hash is checked slowly")
        };
        assert!(!checks[0].verify(&format!("{long}x")));
        assert!(checks[0].verify(&long));
    }

    #[test]
    fn empty_and_malformed_passwords_are_refused_at_registration() {
        let keys = CredentialKeys::generate();
        let (app, device) = names();
        for bad in [
            json!({"authentication": {"credentials": [{"pass": ""}]}}),
            json!({"authentication": {"credentials": [{"pass": {"plain": ""}}]}}),
            json!({"authentication": {"credentials": [{"user": {"username": "u", "password": ""}}]}}),
            json!({"authentication": {"credentials": [{"user": {"username": "", "password": "x"}}]}}),
            json!({"authentication": {"credentials": [{"user": {"username": "a@b", "password": "x"}}]}}),
            json!({"authentication": {"credentials": [{"pass": {"md5": "x"}}]}}),
            json!({"authentication": {"credentials": [{"pass": 7}]}}),
            json!({"authentication": {"credentials": {"pass": "x"}}}),
        ] {
            let mut s = spec(bad.clone());
            let error = seal_plain_passwords(&app, &device, &mut s, &keys).unwrap_err();
            assert!(
                matches!(error, crate::RegistryError::Invalid(_)),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn imported_hashes_verify_slowly_once_then_through_their_derived_verifier() {
        let keys = CredentialKeys::generate();
        let (app, device) = names();
        let hash = bcrypt::hash("pw", 4).unwrap();
        let sha = sha_crypt::sha512_simple("other", &sha_crypt::Sha512Params::new(1000).unwrap()).unwrap();
        let s = spec(json!({"credentials": {"credentials": [
            {"pass": {"bcrypt": hash}}, {"pass": {"sha512": sha}}
        ]}}));
        let creds = DeviceCredentials::from_device(&app, &device, &s, &Map::new());
        let FastCheck::Slow(checks) = creds.check_fast(&keys, "dev1", "pw") else {
            panic!("slow check expected")
        };
        let verified: Vec<&SlowCheck> = checks.iter().filter(|c| c.verify("pw")).collect();
        assert_eq!(verified.len(), 1);
        assert!(checks.iter().any(|c| c.verify("other")));
        let derived = creds.derive(&keys, verified[0], "dev1", "pw");
        let mut status = Map::new();
        status.insert(VERIFIERS_SECTION.into(), derived.merged_into(None));
        let after = DeviceCredentials::from_device(&app, &device, &s, &status);
        assert_eq!(
            after.check_fast(&keys, "dev1", "pw"),
            FastCheck::Valid { derive: None }
        );
        // The bcrypt credential has a verifier now: a wrong password costs no slow hash for it;
        // the sha512 one never verified, so it is still tried.
        let FastCheck::Slow(left) = after.check_fast(&keys, "dev1", "guess") else {
            panic!("the sha512 credential is still to be tried")
        };
        assert_eq!(left.len(), 1);
        assert!(left[0].verify("other"));
        // Changing the credential voids the verifier.
        let changed = spec(json!({"credentials": {"credentials": [
            {"pass": {"bcrypt": bcrypt::hash("new", 4).unwrap()}}
        ]}}));
        let changed = DeviceCredentials::from_device(&app, &device, &changed, &status);
        assert!(matches!(
            changed.check_fast(&keys, "dev1", "pw"),
            FastCheck::Slow(_)
        ));
    }

    #[test]
    fn a_rotated_secret_keeps_devices_in_and_rekeys_them() {
        let old = CredentialKeys::generate();
        let creds = sealed(json!({"authentication": {"credentials": [{"pass": "pw"}]}}), &old);
        let new_key = CredentialKeys::generate();
        let rotated = CredentialKeys::parse(&format!("{}{}", new_key.to_text(), old.to_text())).unwrap();
        assert_eq!(rotated.current().id(), new_key.current().id());
        let FastCheck::Valid {
            derive: Some(derived),
        } = creds.check_fast(&rotated, "dev1", "pw")
        else {
            panic!("verifies under the previous key and asks to be re-keyed")
        };
        assert_eq!(derived.key, rotated.current().id());
        let (app, device) = names();
        let mut spec_of = Map::new();
        spec_of.insert(
            "authentication".into(),
            json!({"credentials": creds.passwords.iter().map(|c| json!({"pass": c.stored})).collect::<Vec<_>>()}),
        );
        let mut status = Map::new();
        status.insert(VERIFIERS_SECTION.into(), derived.merged_into(None));
        let rekeyed = DeviceCredentials::from_device(&app, &device, &spec_of, &status);
        // Now the old key can go.
        assert_eq!(
            rekeyed.check_fast(&new_key, "dev1", "pw"),
            FastCheck::Valid { derive: None }
        );
        assert_eq!(rekeyed.check_fast(&new_key, "dev1", "no"), FastCheck::Invalid);
        assert_eq!(creds.unknown_keys(&new_key).count(), 1);
        assert_eq!(creds.unknown_keys(&rotated).count(), 0);
    }

    #[test]
    fn key_files_round_trip_and_bad_ones_say_why() {
        let keys = CredentialKeys::generate();
        let read = CredentialKeys::parse(&keys.to_text()).unwrap();
        assert_eq!(read.current().id(), keys.current().id());
        assert!(CredentialKeys::parse("# nothing\n").is_err());
        assert!(CredentialKeys::parse("not base64!").is_err());
        assert!(CredentialKeys::parse(&B64.encode([1u8; 16])).is_err());
        let two = format!("{}, {}", B64.encode([1u8; 32]), B64.encode([2u8; 32]));
        assert_eq!(CredentialKeys::parse(&two).unwrap().ids().count(), 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        assert!(CredentialKeys::load_or_create(&path, false).is_err());
        let (created, was_created) = CredentialKeys::load_or_create(&path, true).unwrap();
        assert!(was_created);
        let (again, was_created) = CredentialKeys::load_or_create(&path, true).unwrap();
        assert!(!was_created);
        assert_eq!(created.current().id(), again.current().id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
