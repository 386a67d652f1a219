//! Device logins: one keyed hash per status, whatever the fleet's size or the server's restarts.
//!
//! Stored passwords are keyed verifiers ([`ajour_registry::credentials`]), so checking one is an
//! HMAC. An imported hash (bcrypt, sha512-crypt) is verified the slow way once, at most one per
//! core at a time, and a verifier derived from it is stored with the device so that every later
//! check, on any instance, is fast. Failed logins are answered no sooner than a fixed delay after
//! the request began, so a wrong password and an unknown device look the same from outside, and
//! they are counted by [`crate::guard`].

use crate::context::DeviceContext;
use crate::guard::{LockedBy, LoginGuard};
use crate::{warn_throttled, LOG_INTERVAL};
use ajour_registry::{CredentialKeys, DerivedVerifier, FastCheck, Key, Registry, VERIFIERS_SECTION};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown device, or a password that does not match. Deliberately the same answer.
    #[error("authentication failed")]
    Denied,
    /// Too many failed logins from this address or for this device; try again after this long.
    #[error("too many failed logins; retry in {} s", retry_after.as_secs())]
    Throttled { retry_after: Duration },
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

pub(crate) struct Authenticator {
    keys: Arc<CredentialKeys>,
    pub guard: LoginGuard,
    pub failure_delay: Duration,
    /// One slow hash per core at a time: a thousand devices with imported hashes connecting at
    /// once (or a flood of wrong passwords for them) queue here instead of starting a thousand
    /// blocking threads.
    verifying: tokio::sync::Semaphore,
    slow_checks: AtomicU64,
}

impl Authenticator {
    pub fn new(keys: Arc<CredentialKeys>, guard: LoginGuard, failure_delay: Duration) -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self {
            keys,
            guard,
            failure_delay,
            verifying: tokio::sync::Semaphore::new(cores),
            slow_checks: AtomicU64::new(0),
        }
    }

    /// Slow (imported hash) verifications so far.
    pub fn slow_checks(&self) -> u64 {
        self.slow_checks.load(Ordering::Relaxed)
    }

    /// Count a refusal by the guard, and say how long to wait in whole seconds (at least 1).
    pub fn throttled(&self, by: LockedBy, left: Duration) -> AuthError {
        let by = match by {
            LockedBy::Address => "address",
            LockedBy::Device => "device",
        };
        metrics::counter!("ajour_auth_throttled_total", "by" => by).increment(1);
        AuthError::Throttled {
            retry_after: Duration::from_secs(left.as_secs_f64().ceil().max(1.0) as u64),
        }
    }

    /// Check `password`, presented as `login`, for device `key` whose context is `context`.
    /// `Ok(true)`: a verifier was stored with the device (the cached context is stale).
    pub async fn check(
        &self,
        registry: &dyn Registry,
        key: &Key,
        context: &DeviceContext,
        login: &str,
        password: &str,
    ) -> Result<bool, AuthError> {
        let credentials = &context.credentials;
        let derived = match credentials.check_fast(&self.keys, login, password) {
            FastCheck::Valid { derive } => derive,
            FastCheck::Invalid => {
                if let Some(unknown) = credentials.unknown_keys(&self.keys).next() {
                    warn_throttled!(LOG_INTERVAL, %key, key_id = unknown, known = ?self.keys.ids().collect::<Vec<_>>(),
                        "the device's password was sealed with a credential secret this server does not have: restore it (--credential-secret-file)");
                }
                return Err(AuthError::Denied);
            }
            FastCheck::Slow(checks) => {
                let _permit = self
                    .verifying
                    .acquire()
                    .await
                    .map_err(|e| AuthError::Unavailable(e.to_string()))?;
                self.slow_checks.fetch_add(checks.len() as u64, Ordering::Relaxed);
                metrics::counter!("ajour_auth_slow_checks_total").increment(checks.len() as u64);
                let owned = password.to_string();
                // bcrypt takes tens of milliseconds by design; keep it off the async workers.
                let verified = tokio::task::spawn_blocking(move || {
                    checks.into_iter().find(|check| check.verify(&owned))
                })
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
                let Some(check) = verified else {
                    return Err(AuthError::Denied);
                };
                Some(credentials.derive(&self.keys, &check, login, password))
            }
        };
        match derived {
            Some(verifier) => Ok(self.store(registry, key, verifier).await),
            None => Ok(false),
        }
    }

    /// Store `verifier` with the device. A failure costs only speed: the next login verifies
    /// the slow way (or under the old key) again.
    async fn store(&self, registry: &dyn Registry, key: &Key, verifier: DerivedVerifier) -> bool {
        let merge = move |section: Option<&serde_json::Value>| Some(verifier.merged_into(section));
        match registry
            .merge_status_section(key, VERIFIERS_SECTION, &merge)
            .await
        {
            Ok(_) => {
                metrics::counter!("ajour_credentials_derived_total").increment(1);
                true
            }
            Err(error) => {
                warn_throttled!(LOG_INTERVAL, %key, %error, "storing a password verifier failed; the next login is checked slowly again");
                false
            }
        }
    }
}
