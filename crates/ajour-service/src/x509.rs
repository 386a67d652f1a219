//! Client certificates as device credentials, in Drogue Cloud's X.509 form: an application lists
//! CA certificates as its trust anchors (`spec.trustAnchors.anchors[].certificate`, base64 of the
//! PEM text), and a device signs in with a client certificate whose chain leads up to one of
//! them. The device is the one named by the certificate's subject, in either of Drogue's two
//! forms ([`crate::certificates`] looks it up): the device that lists the whole subject DN string
//! (such as `O=Drogue IoT, OU=Cloud, CN=Device 1`, [`dn_string`]'s form) in its `spec.alias`, or
//! else the device whose name is the subject's Common Name. The application is found by the
//! issuer DN at the top of the presented chain, which equals the subject DN of one of its anchors
//! (Drogue keeps an `x509/ca` alias of it). This module only parses and checks; looking
//! applications and devices up is the caller's, with the DN strings given here. Nothing here panics on bad input: every certificate
//! and spec is the outside world's, and each problem is a value.

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use std::fmt;
use x509_parser::certificate::X509Certificate;
use x509_parser::objects::oid_registry;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// The trust anchors of one application: the CA certificates its devices' certificates must
/// chain up to.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors {
    anchors: Vec<Anchor>,
    /// The same certificates as webpki takes them, kept apart so a check borrows one slice.
    webpki: Vec<TrustAnchor<'static>>,
}

#[derive(Debug, Clone)]
struct Anchor {
    der: CertificateDer<'static>,
    subject: String,
}

impl TrustAnchors {
    /// The anchors of an application's `spec` object (its `trustAnchors.anchors[]`). No
    /// `trustAnchors` section, or no `anchors` in it, is no anchors. Each anchor's `certificate`
    /// is base64 of a PEM text (what Drogue stores), or the PEM text itself, or base64 of DER;
    /// it must hold exactly one certificate. An anchor that does not parse is an error naming its
    /// index: a spec with a broken anchor is refused whole rather than trusted in part.
    pub fn from_spec(spec: &serde_json::Value) -> Result<Self, String> {
        let section = match spec.get("trustAnchors") {
            None | Some(serde_json::Value::Null) => return Ok(Self::default()),
            Some(section) => section,
        };
        if !section.is_object() {
            return Err("spec.trustAnchors is not an object".into());
        }
        let anchors = match section.get("anchors") {
            None | Some(serde_json::Value::Null) => return Ok(Self::default()),
            Some(serde_json::Value::Array(anchors)) => anchors,
            Some(_) => return Err("spec.trustAnchors.anchors is not a list".into()),
        };
        let mut parsed = Self::default();
        for (index, anchor) in anchors.iter().enumerate() {
            let (anchor, webpki) =
                Anchor::from_json(anchor).map_err(|e| format!("spec.trustAnchors.anchors[{index}]: {e}"))?;
            parsed.anchors.push(anchor);
            parsed.webpki.push(webpki);
        }
        Ok(parsed)
    }

    /// The anchors' subject DNs, in the spec's order, in the form of [`dn_string`]: what a
    /// presented chain's [`PresentedChain::issuer_dn`] is compared with.
    pub fn subjects(&self) -> impl Iterator<Item = &str> {
        self.anchors.iter().map(|a| a.subject.as_str())
    }

    /// Whether one of the anchors has the subject DN `dn` (exactly, as [`dn_string`] writes it).
    pub fn has_subject(&self, dn: &str) -> bool {
        self.subjects().any(|subject| subject == dn)
    }

    /// The anchors' certificates, DER, in the spec's order.
    pub fn certificates(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.anchors.iter().map(|a| &a.der)
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }
}

impl Anchor {
    fn from_json(anchor: &serde_json::Value) -> Result<(Self, TrustAnchor<'static>), String> {
        let text = anchor
            .get("certificate")
            .and_then(serde_json::Value::as_str)
            .ok_or("no `certificate` string")?;
        let der = anchor_der(text)?;
        let names = Names::of(&der)?;
        // webpki takes what it needs of the certificate (subject, key, name constraints) now, so
        // an anchor it could not use is found here, with its index, not at a device's sign-in.
        let webpki = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| format!("not usable as a trust anchor: {}", describe(&e)))?
            .to_owned();
        Ok((
            Self {
                der,
                subject: names.subject,
            },
            webpki,
        ))
    }
}

/// The one certificate of an anchor's `certificate` text.
fn anchor_der(text: &str) -> Result<CertificateDer<'static>, String> {
    let trimmed = text.trim_start();
    let bytes = if trimmed.starts_with("-----BEGIN") {
        trimmed.as_bytes().to_vec()
    } else {
        // Line breaks are tolerated: base64 pasted from a file is often wrapped.
        let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| format!("neither PEM nor base64: {e}"))?
    };
    if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        // Base64 of DER, as some tools write it: parsed (and checked) like any other.
        return Ok(CertificateDer::from(bytes));
    }
    let mut certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    match certificates.len() {
        1 => Ok(certificates.remove(0)),
        0 => Err("the PEM text holds no CERTIFICATE".into()),
        n => Err(format!("the PEM text holds {n} certificates, one expected")),
    }
}

/// `name` as Drogue writes it: x509-parser's form, which is the attributes in the certificate's
/// order (not RFC 4514's reversed one), each `ABBREV=value` (`CN`, `O`, `OU`, `C`, `L`, `ST`, ...;
/// else the registry's short name, as `serialNumber`; else `OID(1.2.3)`), joined by `", "`
/// (attributes of one multi-valued RDN by `" + "`), values as they are, without escaping. An error where x509-parser's
/// `Display` would write `<X509Error: Invalid X.509 name>`, so such a name never matches anything.
pub fn dn_string(name: &X509Name<'_>) -> Result<String, String> {
    name.to_string_with_registry(oid_registry())
        .map_err(|e| format!("unreadable name: {e}"))
}

/// What is read of one certificate with x509-parser.
struct Names {
    subject: String,
    issuer: String,
    common_name: Option<String>,
}

impl Names {
    fn of(der: &[u8]) -> Result<Self, String> {
        let (rest, certificate) =
            X509Certificate::from_der(der).map_err(|e| format!("not X.509 DER: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("{} stray bytes after the certificate", rest.len()));
        }
        // The first CN when there are several; as text only when it is a string type that is
        // UTF-8 as it is (UTF8String, PrintableString, IA5String, NumericString): a BMPString CN
        // names no device, as it names none in Drogue.
        let common_name = certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        Ok(Self {
            subject: dn_string(certificate.subject())?,
            issuer: dn_string(certificate.issuer())?,
            common_name,
        })
    }
}

/// The certificate chain a client presented in its TLS handshake: its own certificate first,
/// then any intermediates. Built only if every certificate parses; not yet checked against
/// anything (see [`verify`]).
#[derive(Debug, Clone)]
pub struct PresentedChain {
    certificates: Vec<CertificateDer<'static>>,
    subject_dn: String,
    issuer_dn: String,
    common_name: Option<String>,
}

impl PresentedChain {
    pub fn new(certificates: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        let mut names = Vec::with_capacity(certificates.len());
        for (index, der) in certificates.iter().enumerate() {
            names.push(Names::of(der).map_err(|reason| CertError::Unparsable { index, reason })?);
        }
        let (Some(first), Some(last)) = (names.first(), names.last()) else {
            return Err(CertError::NoChain);
        };
        Ok(Self {
            subject_dn: first.subject.clone(),
            issuer_dn: last.issuer.clone(),
            common_name: first.common_name.clone(),
            certificates,
        })
    }

    /// The certificates, the client's own first.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The subject DN of the client's own certificate ([`dn_string`]'s form): what a device may
    /// list in its `spec.alias`.
    pub fn subject_dn(&self) -> &str {
        &self.subject_dn
    }

    /// The issuer DN of the last certificate presented ([`dn_string`]'s form): the subject of the
    /// trust anchor the chain should lead to, which finds the application.
    pub fn issuer_dn(&self) -> &str {
        &self.issuer_dn
    }

    /// The first Common Name of the client's subject: the device's name, when no device lists
    /// the subject DN as an alias. `None` when there is none, or it is not a UTF-8 string type.
    pub fn common_name(&self) -> Option<&str> {
        self.common_name.as_deref()
    }
}

/// Who a verified client certificate says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject DN ([`dn_string`]'s form), to match a device's `spec.alias`.
    pub subject_dn: String,
    /// The subject's Common Name, to match a device's name; `None` when the subject has none (or
    /// not as a UTF-8 string type): such a certificate names a device by its DN alone.
    pub common_name: Option<String>,
}

/// Why a client certificate does not sign a device in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertError {
    /// The client presented no certificate.
    NoChain,
    /// Certificate `index` of the chain (0: the client's own) does not parse.
    Unparsable { index: usize, reason: String },
    /// The chain does not lead to one of the application's trust anchors (unknown issuer, bad
    /// signature, an intermediate that is no CA, ...).
    NotTrusted { reason: String },
    /// A certificate of the chain expired before `now`.
    Expired { not_after: UnixTime, now: UnixTime },
    /// A certificate of the chain is valid only after `now`.
    NotYetValid { not_before: UnixTime, now: UnixTime },
    /// The client's certificate is not one for a TLS client: a CA's, or an extended key usage
    /// without client authentication.
    NotForClients { reason: String },
    /// The certificate is trusted and its subject DN is no device's alias, and its subject has no
    /// Common Name to name a device by either (the caller's refusal: [`verify`] does not know
    /// the aliases).
    NoCommonName,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoChain => write!(f, "no client certificate was presented"),
            Self::Unparsable { index: 0, reason } => {
                write!(f, "the client certificate cannot be parsed: {reason}")
            }
            Self::Unparsable { index, reason } => write!(
                f,
                "certificate {index} of the client's chain (0 is its own) cannot be parsed: {reason}"
            ),
            Self::NotTrusted { reason } => write!(
                f,
                "the client certificate is not trusted by the application's trust anchors: {reason}"
            ),
            Self::Expired { not_after, now } => write!(
                f,
                "a certificate of the client's chain expired at {} (now {})",
                when(*not_after),
                when(*now)
            ),
            Self::NotYetValid { not_before, now } => write!(
                f,
                "a certificate of the client's chain is not valid before {} (now {})",
                when(*not_before),
                when(*now)
            ),
            Self::NotForClients { reason } => {
                write!(f, "the certificate is not a client certificate: {reason}")
            }
            Self::NoCommonName => write!(
                f,
                "the client certificate's subject DN is no device's alias, and it has no Common Name (CN) \
                 to name a device by"
            ),
        }
    }
}

impl std::error::Error for CertError {}

fn when(time: UnixTime) -> String {
    i64::try_from(time.as_secs())
        .ok()
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{} s after 1970", time.as_secs()))
}

/// Check `chain` against `anchors` at `now`: every signature up to one of the anchors (the ring
/// provider's algorithms, as the TLS handshake uses), every certificate's validity period, and
/// that the client's certificate is an end entity fit for TLS client authentication. The last is
/// webpki's `KeyUsage::client_auth()`, which is "required if present": a certificate without an
/// extended key usage extension is accepted, one with the extension must list clientAuth
/// (1.3.6.1.5.5.7.3.2), and an empty one is refused; webpki applies it to every certificate of
/// the path it builds, intermediates included. A CA certificate (basic constraints cA=true)
/// presented as the client's own is refused by webpki (`CaUsedAsEndEntity`): an application's
/// CA does not sign in as a device. Revocation is not checked (Drogue has no CRLs either).
pub fn verify(
    chain: &PresentedChain,
    anchors: &TrustAnchors,
    now: UnixTime,
) -> Result<CertIdentity, CertError> {
    let Some((own, intermediates)) = chain.certificates.split_first() else {
        return Err(CertError::NoChain);
    };
    let end_entity = webpki::EndEntityCert::try_from(own).map_err(|e| CertError::Unparsable {
        index: 0,
        reason: describe(&e),
    })?;
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    end_entity
        .verify_for_usage(
            algorithms,
            &anchors.webpki,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| refusal(e, anchors))?;
    // No Common Name is no refusal here: the subject DN may be a device's alias.
    Ok(CertIdentity {
        subject_dn: chain.subject_dn.clone(),
        common_name: chain.common_name.clone(),
    })
}

fn refusal(error: webpki::Error, anchors: &TrustAnchors) -> CertError {
    use webpki::Error as E;
    match error {
        E::CertExpired { time, not_after } => CertError::Expired { not_after, now: time },
        E::CertNotValidYet { time, not_before } => CertError::NotYetValid {
            not_before,
            now: time,
        },
        E::CaUsedAsEndEntity => CertError::NotForClients {
            reason: "it is a CA certificate (basic constraints cA=true), not an end entity's".into(),
        },
        E::RequiredEkuNotFoundContext(_) => CertError::NotForClients {
            reason: "its extended key usage does not include TLS client authentication".into(),
        },
        E::EmptyEkuExtension => CertError::NotForClients {
            reason: "its extended key usage extension is empty".into(),
        },
        E::UnknownIssuer if anchors.is_empty() => CertError::NotTrusted {
            reason: "the application has no trust anchors".into(),
        },
        other => CertError::NotTrusted {
            reason: describe(&other),
        },
    }
}

/// webpki's errors in words where the plain name would puzzle; its `Display` is its `Debug`.
fn describe(error: &webpki::Error) -> String {
    use webpki::Error as E;
    match error {
        E::UnknownIssuer => "its issuer is none of the application's trust anchors".into(),
        E::InvalidSignatureForPublicKey => "a signature of the chain does not verify".into(),
        E::EndEntityUsedAsCa => "an issuer of the chain is not a CA certificate".into(),
        E::BadDer | E::BadDerTime => "malformed DER".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, DnValue,
        ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    use serde_json::json;
    use std::time::Duration;

    type Ca = CertifiedIssuer<'static, KeyPair>;

    fn name(entries: &[(DnType, &str)]) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        for (ty, value) in entries {
            dn.push(ty.clone(), *value);
        }
        dn
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name =
            name(&[(DnType::OrganizationName, "Drogue IoT"), (DnType::CommonName, cn)]);
        params
    }

    fn root_ca(cn: &str) -> Ca {
        CertifiedIssuer::self_signed(ca_params(cn), KeyPair::generate().unwrap()).unwrap()
    }

    fn intermediate_ca(cn: &str, issuer: &Ca) -> Ca {
        CertifiedIssuer::signed_by(ca_params(cn), KeyPair::generate().unwrap(), issuer).unwrap()
    }

    /// A device certificate with subject `O=Drogue IoT, OU=Cloud, CN=<cn>`, changed by `tweak`.
    fn device_cert(
        cn: &str,
        issuer: &Ca,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = name(&[
            (DnType::OrganizationName, "Drogue IoT"),
            (DnType::OrganizationalUnitName, "Cloud"),
            (DnType::CommonName, cn),
        ]);
        tweak(&mut params);
        params
            .signed_by(&KeyPair::generate().unwrap(), issuer)
            .unwrap()
            .der()
            .clone()
    }

    fn base64_of(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    /// The spec of an application trusting `cas`, as Drogue stores them (base64 of the PEM).
    fn spec_of(cas: &[&Ca]) -> serde_json::Value {
        let anchors: Vec<_> = cas
            .iter()
            .map(|ca| json!({ "certificate": base64_of(&ca.pem()) }))
            .collect();
        json!({ "trustAnchors": { "anchors": anchors } })
    }

    fn anchors_of(cas: &[&Ca]) -> TrustAnchors {
        TrustAnchors::from_spec(&spec_of(cas)).unwrap()
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    fn verify_chain(
        certs: Vec<CertificateDer<'static>>,
        anchors: &TrustAnchors,
    ) -> Result<CertIdentity, CertError> {
        verify(&PresentedChain::new(certs)?, anchors, now())
    }

    #[test]
    fn a_device_certificate_signed_by_the_application_ca_names_the_device() {
        let ca = root_ca("App CA");
        let chain = PresentedChain::new(vec![device_cert("Device 1", &ca, |_| {})]).unwrap();
        assert_eq!(chain.subject_dn(), "O=Drogue IoT, OU=Cloud, CN=Device 1");
        assert_eq!(chain.issuer_dn(), "O=Drogue IoT, CN=App CA");
        assert_eq!(chain.common_name(), Some("Device 1"));
        let anchors = anchors_of(&[&ca]);
        assert_eq!(
            anchors.subjects().collect::<Vec<_>>(),
            ["O=Drogue IoT, CN=App CA"]
        );
        // The wiring's lookup: the chain's issuer is the anchor's subject.
        assert!(anchors.has_subject(chain.issuer_dn()));
        assert_eq!(
            verify(&chain, &anchors, now()),
            Ok(CertIdentity {
                subject_dn: "O=Drogue IoT, OU=Cloud, CN=Device 1".into(),
                common_name: Some("Device 1".into()),
            })
        );
    }

    #[test]
    fn the_dn_string_is_in_certificate_order_with_abbreviations_and_no_escaping() {
        let ca = root_ca("App CA");
        let der = device_cert("x", &ca, |params| {
            // Deliberately not RFC 4514's order (CN first), and a value with a comma and a '+'.
            params.distinguished_name = name(&[
                (DnType::CountryName, "DE"),
                (DnType::LocalityName, "Berlin"),
                (DnType::OrganizationName, "Drogue, IoT + friends"),
                (DnType::CommonName, "Device 1"),
                (DnType::CustomDnType(vec![2, 5, 4, 5]), "1234"),
                (DnType::CustomDnType(vec![1, 3, 6, 1, 4, 1, 99999, 1]), "x"),
            ]);
        });
        let chain = PresentedChain::new(vec![der]).unwrap();
        // serialNumber (2.5.4.5) by its registry name; an OID the registry does not know as
        // `OID(dotted)`. The comma inside O's value is not escaped: the string is for matching
        // aliases written the same way, not for parsing back.
        assert_eq!(
            chain.subject_dn(),
            "C=DE, L=Berlin, O=Drogue, IoT + friends, CN=Device 1, serialNumber=1234, OID(1.3.6.1.4.1.99999.1)=x"
        );
    }

    #[test]
    fn a_bmp_string_common_name_is_in_the_dn_but_names_no_device() {
        let ca = root_ca("App CA");
        let der = device_cert("x", &ca, |params| {
            params.distinguished_name = name(&[(DnType::OrganizationName, "Drogue IoT")]);
            params.distinguished_name.push(
                DnType::CommonName,
                DnValue::BmpString("Device 1".try_into().unwrap()),
            );
        });
        let chain = PresentedChain::new(vec![der]).unwrap();
        assert_eq!(chain.subject_dn(), "O=Drogue IoT, CN=Device 1");
        assert_eq!(chain.common_name(), None);
        assert_eq!(
            verify(&chain, &anchors_of(&[&ca]), now()),
            Ok(CertIdentity {
                subject_dn: "O=Drogue IoT, CN=Device 1".into(),
                common_name: None,
            })
        );
    }

    #[test]
    fn a_trusted_certificate_without_a_common_name_is_verified_with_its_dn_alone() {
        let ca = root_ca("App CA");
        let der = device_cert("x", &ca, |params| {
            params.distinguished_name = name(&[(DnType::OrganizationName, "Drogue IoT")]);
        });
        // Whether it names a device (by a device's alias) is the caller's to find out.
        let result = verify_chain(vec![der], &anchors_of(&[&ca]));
        assert_eq!(
            result,
            Ok(CertIdentity {
                subject_dn: "O=Drogue IoT".into(),
                common_name: None,
            })
        );
    }

    #[test]
    fn a_certificate_of_another_ca_is_refused_even_with_the_same_subject_names() {
        let ca = root_ca("App CA");
        // Same DN as the application's CA, another key: only the signature tells them apart.
        let impostor = root_ca("App CA");
        let der = device_cert("Device 1", &impostor, |_| {});
        let chain = PresentedChain::new(vec![der]).unwrap();
        assert_eq!(chain.issuer_dn(), "O=Drogue IoT, CN=App CA");
        let result = verify(&chain, &anchors_of(&[&ca]), now());
        let Err(CertError::NotTrusted { reason }) = result else {
            panic!("{result:?}")
        };
        assert_eq!(reason, "a signature of the chain does not verify");

        let other = root_ca("Other CA");
        let result = verify_chain(vec![device_cert("Device 1", &other, |_| {})], &anchors_of(&[&ca]));
        assert_eq!(
            result,
            Err(CertError::NotTrusted {
                reason: "its issuer is none of the application's trust anchors".into()
            })
        );
    }

    #[test]
    fn an_application_without_anchors_trusts_nothing() {
        let ca = root_ca("App CA");
        let anchors = TrustAnchors::from_spec(&json!({})).unwrap();
        let result = verify_chain(vec![device_cert("Device 1", &ca, |_| {})], &anchors);
        assert_eq!(
            result,
            Err(CertError::NotTrusted {
                reason: "the application has no trust anchors".into()
            })
        );
    }

    #[test]
    fn an_expired_or_future_certificate_is_refused() {
        let ca = root_ca("App CA");
        let anchors = anchors_of(&[&ca]);
        let expired = device_cert("Device 1", &ca, |params| {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        let at = UnixTime::since_unix_epoch(Duration::from_secs(1_750_000_000));
        let chain = PresentedChain::new(vec![expired]).unwrap();
        let result = verify(&chain, &anchors, at);
        assert_eq!(
            result,
            Err(CertError::Expired {
                not_after: UnixTime::since_unix_epoch(Duration::from_secs(978_307_200)),
                now: at,
            })
        );
        assert_eq!(
            result.unwrap_err().to_string(),
            "a certificate of the client's chain expired at 2001-01-01T00:00:00Z (now 2025-06-15T15:06:40Z)"
        );
        // The same certificate is good at a time within its validity.
        let within = UnixTime::since_unix_epoch(Duration::from_secs(970_000_000));
        assert!(verify(&chain, &anchors, within).is_ok());

        let future = device_cert("Device 1", &ca, |params| {
            params.not_before = rcgen::date_time_ymd(2090, 1, 1);
        });
        let result = verify(&PresentedChain::new(vec![future]).unwrap(), &anchors, at);
        assert!(
            matches!(result, Err(CertError::NotYetValid { now, .. }) if now == at),
            "{result:?}"
        );
    }

    #[test]
    fn the_ca_itself_is_not_a_client_certificate() {
        let ca = root_ca("App CA");
        let result = verify_chain(vec![ca.der().clone()], &anchors_of(&[&ca]));
        assert_eq!(
            result,
            Err(CertError::NotForClients {
                reason: "it is a CA certificate (basic constraints cA=true), not an end entity's".into()
            })
        );
    }

    #[test]
    fn extended_key_usage_must_allow_client_auth_when_present() {
        let ca = root_ca("App CA");
        let anchors = anchors_of(&[&ca]);
        let client = device_cert("Device 1", &ca, |params| {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        assert!(verify_chain(vec![client], &anchors).is_ok());
        // No extension at all (rcgen's default) is accepted: the other tests' certificates.
        let server_only = device_cert("Device 1", &ca, |params| {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        assert_eq!(
            verify_chain(vec![server_only], &anchors),
            Err(CertError::NotForClients {
                reason: "its extended key usage does not include TLS client authentication".into()
            })
        );
    }

    #[test]
    fn an_intermediate_ca_must_be_presented() {
        let root = root_ca("App CA");
        let intermediate = intermediate_ca("Line 3", &root);
        let device = device_cert("Device 1", &intermediate, |_| {});
        let anchors = anchors_of(&[&root]);

        let chain = PresentedChain::new(vec![device.clone(), intermediate.der().clone()]).unwrap();
        assert_eq!(chain.subject_dn(), "O=Drogue IoT, OU=Cloud, CN=Device 1");
        // The top of the chain's issuer: the root, which finds the application.
        assert_eq!(chain.issuer_dn(), "O=Drogue IoT, CN=App CA");
        assert_eq!(
            verify(&chain, &anchors, now()).map(|id| id.common_name),
            Ok(Some("Device 1".to_string()))
        );

        let alone = PresentedChain::new(vec![device]).unwrap();
        assert_eq!(alone.issuer_dn(), "O=Drogue IoT, CN=Line 3");
        assert_eq!(
            verify(&alone, &anchors, now()),
            Err(CertError::NotTrusted {
                reason: "its issuer is none of the application's trust anchors".into()
            })
        );
    }

    #[test]
    fn garbage_certificates_are_errors() {
        assert_eq!(PresentedChain::new(vec![]).unwrap_err(), CertError::NoChain);
        let err = PresentedChain::new(vec![CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01])]).unwrap_err();
        assert!(matches!(err, CertError::Unparsable { index: 0, .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("the client certificate cannot be parsed: "),
            "{err}"
        );

        let ca = root_ca("App CA");
        let good = device_cert("Device 1", &ca, |_| {});
        let err =
            PresentedChain::new(vec![good.clone(), CertificateDer::from(b"garbage".to_vec())]).unwrap_err();
        assert!(matches!(err, CertError::Unparsable { index: 1, .. }), "{err:?}");

        // A valid certificate followed by a stray byte.
        let mut trailing = good.to_vec();
        trailing.push(0);
        let err = PresentedChain::new(vec![CertificateDer::from(trailing)]).unwrap_err();
        assert_eq!(
            err,
            CertError::Unparsable {
                index: 0,
                reason: "1 stray bytes after the certificate".into()
            }
        );

        // Every truncation of a good certificate is an error, none a panic.
        for len in 0..good.len() {
            assert!(PresentedChain::new(vec![CertificateDer::from(good[..len].to_vec())]).is_err());
        }
    }

    #[test]
    fn anchors_are_taken_as_base64_of_pem_as_pem_and_as_base64_of_der() {
        let a = root_ca("A");
        let b = root_ca("B");
        let c = root_ca("C");
        let spec = json!({ "trustAnchors": { "anchors": [
            { "certificate": base64_of(&a.pem()) },
            { "certificate": b.pem() },
            { "certificate": base64::engine::general_purpose::STANDARD.encode(c.der()) },
        ] } });
        let anchors = TrustAnchors::from_spec(&spec).unwrap();
        assert_eq!(
            anchors.subjects().collect::<Vec<_>>(),
            ["O=Drogue IoT, CN=A", "O=Drogue IoT, CN=B", "O=Drogue IoT, CN=C"]
        );
        assert_eq!(
            anchors.certificates().cloned().collect::<Vec<_>>(),
            [a.der().clone(), b.der().clone(), c.der().clone()]
        );
        for ca in [&a, &b, &c] {
            assert!(verify_chain(vec![device_cert("d", ca, |_| {})], &anchors).is_ok());
        }
    }

    #[test]
    fn missing_anchor_sections_are_no_anchors() {
        for spec in [
            json!({}),
            json!({ "trustAnchors": null }),
            json!({ "trustAnchors": {} }),
            json!({ "trustAnchors": { "anchors": [] } }),
            json!({ "firmware": { "oci": { "image": "x" } } }),
        ] {
            let anchors = TrustAnchors::from_spec(&spec).unwrap();
            assert!(anchors.is_empty(), "{spec}");
            assert_eq!(anchors.len(), 0);
        }
    }

    #[test]
    fn a_malformed_anchor_is_an_error_naming_its_index() {
        let ca = root_ca("App CA");
        let good = json!({ "certificate": base64_of(&ca.pem()) });
        let two = format!("{}{}", ca.pem(), root_ca("Other").pem());
        let key_only = KeyPair::generate().unwrap().serialize_pem();
        let cases = [
            (
                json!({ "cert": "x" }),
                "spec.trustAnchors.anchors[1]: no `certificate` string",
            ),
            (
                json!({ "certificate": 7 }),
                "spec.trustAnchors.anchors[1]: no `certificate` string",
            ),
            (
                json!({ "certificate": "not base64!" }),
                "spec.trustAnchors.anchors[1]: neither PEM nor base64: ",
            ),
            (
                json!({ "certificate": base64_of("garbage") }),
                "spec.trustAnchors.anchors[1]: not X.509 DER: ",
            ),
            (
                json!({ "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" }),
                "spec.trustAnchors.anchors[1]: not X.509 DER: ",
            ),
            (
                json!({ "certificate": "-----BEGIN CERTIFICATE-----\nnot base64\n" }),
                "spec.trustAnchors.anchors[1]: bad PEM: ",
            ),
            (
                json!({ "certificate": base64_of(&two) }),
                "spec.trustAnchors.anchors[1]: the PEM text holds 2 certificates, one expected",
            ),
            (
                json!({ "certificate": key_only }),
                "spec.trustAnchors.anchors[1]: the PEM text holds no CERTIFICATE",
            ),
        ];
        for (bad, expected) in cases {
            let spec = json!({ "trustAnchors": { "anchors": [good.clone(), bad.clone()] } });
            let error = TrustAnchors::from_spec(&spec).unwrap_err();
            assert!(error.starts_with(expected), "{bad}: {error}");
        }
        assert_eq!(
            TrustAnchors::from_spec(&json!({ "trustAnchors": [] })).unwrap_err(),
            "spec.trustAnchors is not an object"
        );
        assert_eq!(
            TrustAnchors::from_spec(&json!({ "trustAnchors": { "anchors": {} } })).unwrap_err(),
            "spec.trustAnchors.anchors is not a list"
        );
    }

    #[test]
    fn every_error_has_its_own_message() {
        let t = UnixTime::since_unix_epoch(Duration::from_secs(0));
        let errors = [
            CertError::NoChain,
            CertError::Unparsable {
                index: 0,
                reason: "r".into(),
            },
            CertError::Unparsable {
                index: 2,
                reason: "r".into(),
            },
            CertError::NotTrusted { reason: "r".into() },
            CertError::Expired { not_after: t, now: t },
            CertError::NotYetValid {
                not_before: t,
                now: t,
            },
            CertError::NotForClients { reason: "r".into() },
            CertError::NoCommonName,
        ];
        let messages: std::collections::HashSet<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), errors.len());
        assert_eq!(
            CertError::Unparsable {
                index: 2,
                reason: "r".into()
            }
            .to_string(),
            "certificate 2 of the client's chain (0 is its own) cannot be parsed: r"
        );
    }
}
