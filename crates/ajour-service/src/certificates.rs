//! Signing a device in with its client certificate (Drogue's X.509 form, [`crate::x509`]): the
//! chain the TLS layer took (and checked the client holds the key of) is checked here against
//! the trust anchors of the application it names, because the anchors live in the registry, per
//! application, and change while the server runs. The device is found in that application in
//! either of Drogue's two forms: first the device listing the certificate's whole subject DN
//! (`O=Drogue IoT, OU=Cloud, CN=Device 1`, [`x509::dn_string`]'s form) in its `spec.alias`
//! ([`Registry::device_by_alias`]), else the device named by the certificate's Common Name. A
//! certificate without a Common Name signs in only by its DN. Tested end to end in
//! `crates/ajour/tests/it/tls.rs` (`devices_sign_in_with_client_certificates_over_https_and_mqtts`
//! by the name, `a_device_signs_in_by_its_certificates_subject_dn_listed_as_its_alias` by the
//! alias).

use crate::guard::LockedBy;
use crate::x509::{self, CertError, PresentedChain, TrustAnchors};
use crate::{error_total, AuthError, Device, Refusal, UpdateService};
use ajour_registry::{ListParams, Registry, Scope};
use ajour_types::{AppName, DeviceName, Key};
use rustls::pki_types::{CertificateDer, UnixTime};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a TLS device endpoint was given to sign a device in by certificate.
pub struct CertSignIn<'a> {
    /// The chain the client presented, its own certificate first.
    pub chain: &'a [CertificateDer<'static>],
    /// The application, when the client named it (an MQTT user name `device@app`, HTTP's
    /// `?application=`); otherwise it is the one whose trust anchor issued the chain.
    pub application: Option<&'a str>,
    /// A gateway acting for this device of its application.
    pub as_device: Option<&'a str>,
    pub peer: Option<IpAddr>,
}

/// Which applications have a trust anchor of each subject DN, read from the registry at most
/// once per spec cache TTL: a device presenting a certificate names no application, and the
/// issuer of its chain finds it.
pub(crate) struct IssuerIndex {
    ttl: Duration,
    /// When the index was read, and what it holds.
    read: Mutex<Option<(Instant, Arc<ByIssuer>)>>,
}

/// The applications trusting each issuer DN.
type ByIssuer = HashMap<String, Vec<AppName>>;

impl IssuerIndex {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            read: Mutex::new(None),
        }
    }

    async fn applications(&self, registry: &dyn Registry, issuer: &str) -> Result<Vec<AppName>, Refusal> {
        let cached = self
            .read
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, index)| index.clone());
        let index = match cached {
            Some(index) => index,
            None => {
                let apps = registry
                    .list(&Scope::Apps, &ListParams::default())
                    .await
                    .map_err(|error| {
                        error_total("registry");
                        tracing::warn!(%error, "trust anchors unavailable");
                        Refusal::Unavailable
                    })?;
                let mut index = ByIssuer::new();
                for app in apps {
                    let Ok(name) = AppName::parse(&app.metadata.name) else {
                        continue;
                    };
                    // A broken anchor is reported when a device of that application signs in.
                    let spec = serde_json::Value::Object(app.spec);
                    if let Ok(anchors) = TrustAnchors::from_spec(&spec) {
                        for subject in anchors.subjects() {
                            index.entry(subject.to_string()).or_default().push(name.clone());
                        }
                    }
                }
                let index = Arc::new(index);
                *self.read.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((Instant::now(), index.clone()));
                index
            }
        };
        Ok(index.get(issuer).cloned().unwrap_or_default())
    }
}

impl UpdateService {
    /// Sign in the device a client certificate names: the chain must lead to a trust anchor of
    /// the device's application (`spec.trustAnchors`), be valid now and fit client
    /// authentication; the device is the one of that application listing the certificate's
    /// subject DN in its `spec.alias`, or else the one whose name is its Common Name. With
    /// `as_device`, the device the signed-in gateway acts for, as with a password. Every failure
    /// is [`Refusal::Denied`] (counted against the address, as a wrong password is), and logged
    /// at `info` with its reason: the operator sees why; the client learns nothing.
    pub async fn sign_in_certificate(&self, given: &CertSignIn<'_>) -> Result<Device<'_>, Refusal> {
        let denied = |key: Option<&Key>, why: &dyn std::fmt::Display| {
            tracing::info!("client certificate refused: {why}");
            metrics::counter!("ajour_auth_failures_total").increment(1);
            error_total("auth_denied");
            self.auth.guard.failed(key, given.peer);
            Refusal::Denied
        };
        // An address locked out for failed logins gets no chain checked, as it gets no password
        // checked.
        if let Err(left) = self.auth.guard.admit_address(given.peer) {
            return Err(self.refused_throttled(LockedBy::Address, left));
        }
        let chain = PresentedChain::new(given.chain.to_vec()).map_err(|e| denied(None, &e))?;
        let applications = match given.application {
            Some(app) => vec![AppName::parse(app).map_err(|e| denied(None, &e))?],
            None => {
                self.issuers
                    .applications(self.registry.as_ref(), chain.issuer_dn())
                    .await?
            }
        };
        let mut why = format!("no application trusts its issuer '{}'", chain.issuer_dn());
        for app in applications {
            let application = match self.registry.get(&Key::App(app.clone())).await {
                Ok(Some(application)) => application,
                Ok(None) => continue,
                Err(error) => {
                    error_total("registry");
                    tracing::warn!(%error, "trust anchors unavailable");
                    return Err(Refusal::Unavailable);
                }
            };
            let anchors = match TrustAnchors::from_spec(&serde_json::Value::Object(application.spec)) {
                Ok(anchors) => anchors,
                Err(error) => {
                    why = format!("application '{app}': {error}");
                    continue;
                }
            };
            let identity = match x509::verify(&chain, &anchors, UnixTime::now()) {
                Ok(identity) => identity,
                Err(error) => {
                    why = format!("application '{app}': {error}");
                    continue;
                }
            };
            // Drogue's two forms: the whole subject DN as a device's alias first, as Drogue
            // looks it up, then the Common Name as the device's name.
            let by_alias = match self.registry.device_by_alias(&app, &identity.subject_dn).await {
                Ok(found) => found,
                Err(error) => {
                    error_total("registry");
                    tracing::warn!(%error, "device authentication unavailable");
                    return Err(Refusal::Unavailable);
                }
            };
            let found_by_alias = by_alias.is_some();
            let name = match (by_alias, identity.common_name.as_deref()) {
                (Some(device), _) => device,
                (None, None) => return Err(denied(None, &CertError::NoCommonName)),
                (None, Some(cn)) => match DeviceName::parse(cn) {
                    Ok(name) => name,
                    Err(_) => {
                        return Err(denied(
                            None,
                            &format!(
                                "its subject DN '{}' is no device's alias, and its Common Name '{cn}' names no device",
                                identity.subject_dn
                            ),
                        ))
                    }
                },
            };
            let key = Key::Device(app, name);
            if let Err((by, left)) = self.auth.guard.admit(&key, given.peer) {
                return Err(self.refused_throttled(by, left));
            }
            return match self.contexts.get(self.registry.as_ref(), &key).await {
                Ok(Some(_)) => {
                    self.auth.guard.succeeded(&key, given.peer);
                    self.session_device(&key, given.as_device).await
                }
                // Found by its alias and deleted since: the index is written with the device.
                Ok(None) if found_by_alias => Err(denied(Some(&key), &format!("{key} does not exist"))),
                Ok(None) => Err(denied(
                    Some(&key),
                    &format!(
                        "{key} does not exist (and the subject DN '{}' is no device's alias)",
                        identity.subject_dn
                    ),
                )),
                Err(error) => {
                    error_total("registry");
                    tracing::warn!(%error, "device authentication unavailable");
                    Err(Refusal::Unavailable)
                }
            };
        }
        Err(denied(None, &why))
    }
}

impl UpdateService {
    /// A sign-in refused for too many failed logins, counted as the password path counts it.
    fn refused_throttled(&self, by: LockedBy, left: Duration) -> Refusal {
        error_total("auth_throttled");
        match self.auth.throttled(by, left) {
            AuthError::Throttled { retry_after } => Refusal::Throttled { retry_after },
            _ => Refusal::Denied,
        }
    }
}
