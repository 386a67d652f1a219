//! Client certificates in the TLS handshake, for devices that sign in with one (Drogue's X.509
//! credentials, [`ajour_service::x509`]). The server asks every client for a certificate and
//! lets it connect without one (password sign-in goes on as before). A certificate that is
//! presented is accepted here as long as it parses: its chain is checked only at sign-in,
//! because the anchors it must lead to are per application, live in the registry and change
//! while the server runs, and which application is meant is only known from the certificate
//! itself. What the handshake does check is that the client holds the certificate's private key
//! (its CertificateVerify signature): sign-in then trusts the chain [`peer_chain`] returns as the
//! client's own, not one copied from elsewhere.

use ajour_service::x509::PresentedChain;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ResolvesServerCert;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The ring provider, named explicitly as in [`crate::tls`]: the server never depends on a
/// process-wide default provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Asks for a client certificate, does not require one, and accepts any that parses, after the
/// client proved it holds its key. Not a trust decision: see the module's documentation.
#[derive(Debug)]
pub struct DeferredClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl DeferredClientCert {
    /// Handshake signatures checked with `provider`'s algorithms.
    pub fn new(provider: &CryptoProvider) -> Self {
        Self {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for DeferredClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: the acceptable CAs are every application's, too many and too changeable to
    /// list, and devices built for Drogue send their one certificate regardless.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only that it parses: the chain, its validity period and key usage are checked against
        // the application's trust anchors at sign-in (`ajour_service::x509::verify`), since
        // those anchors are in the registry, per application, and change at run time. A
        // certificate that does not even parse could never sign in: refused now.
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|der| der.clone().into_owned())
            .collect();
        match PresentedChain::new(chain) {
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(_) => Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A server configuration serving `resolver`'s certificate that asks clients for certificates
/// ([`DeferredClientCert`]); ring provider, rustls' safe default protocol versions, no ALPN
/// (the caller sets `alpn_protocols` for its protocol). An error only if the provider and
/// versions do not fit together, which the ring provider's defaults always do.
pub fn server_config_with_client_certs(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, String> {
    let provider = provider();
    let verifier = Arc::new(DeferredClientCert::new(&provider));
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("configuring TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver))
}

/// The certificate chain a client presented on its TLS connection, as the HTTP endpoint finds it
/// among a request's extensions.
#[derive(Debug, Clone)]
pub struct ClientChain(pub Arc<Vec<CertificateDer<'static>>>);

/// The chain the client presented (its own certificate first), once the handshake is done; `None`
/// when it presented none (or the handshake is not done yet).
pub fn peer_chain(conn: &rustls::ServerConnection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_certificates()
        .filter(|chain| !chain.is_empty())
        .map(<[CertificateDer<'static>]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::sign::{CertifiedKey, SingleCertAndKey};
    use std::io;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Ca = CertifiedIssuer<'static, KeyPair>;

    fn ca() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "test CA");
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// A certificate for `sans` with subject `CN=<cn>`, signed by `ca`, and its key.
    fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, ca).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), key)
    }

    /// A client and a server shaking hands over an in-memory pipe; the server answers "ok" and
    /// returns the chain it saw, the client returns what it read.
    async fn handshake(
        client: rustls::ClientConfig,
        ca: &Ca,
    ) -> (
        Result<Option<Vec<CertificateDer<'static>>>, io::Error>,
        Result<[u8; 2], io::Error>,
    ) {
        let (cert, key) = leaf(ca, "server", &["localhost"]);
        let served = CertifiedKey::from_der(vec![cert], key, &provider()).unwrap();
        let config = server_config_with_client_certs(Arc::new(SingleCertAndKey::from(served))).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = acceptor.accept(server_io).await?;
            let chain = peer_chain(tls.get_ref().1);
            tls.write_all(b"ok").await?;
            tls.shutdown().await?;
            Ok(chain)
        });
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let name = ServerName::try_from("localhost").unwrap();
        let client = async {
            let mut tls = connector.connect(name, client_io).await?;
            let mut answer = [0u8; 2];
            tls.read_exact(&mut answer).await?;
            Ok(answer)
        }
        .await;
        (server.await.unwrap(), client)
    }

    fn client_builder(
        ca: &Ca,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
    }

    /// The server's verdict as the rustls error inside its I/O error.
    fn rustls_error(error: &io::Error) -> Option<&rustls::Error> {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    }

    #[tokio::test]
    async fn the_server_sees_the_chain_a_client_presents_with_tls13_and_tls12() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let ca = ca();
            let (cert, key) = leaf(&ca, "Device 1", &[]);
            let client = client_builder(&ca, &[version])
                .with_client_auth_cert(vec![cert.clone(), ca.der().clone()], key)
                .unwrap();
            let (server, client) = handshake(client, &ca).await;
            assert_eq!(client.unwrap(), *b"ok", "{version:?}");
            let chain = server.unwrap().unwrap();
            assert_eq!(chain, [cert, ca.der().clone()], "{version:?}");
            // What sign-in makes of it.
            let presented = PresentedChain::new(chain).unwrap();
            assert_eq!(presented.common_name(), Some("Device 1"));
            assert_eq!(presented.issuer_dn(), "CN=test CA");
        }
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_still_connects() {
        let ca = ca();
        let client = client_builder(&ca, &[&rustls::version::TLS13]).with_no_client_auth();
        let (server, client) = handshake(client, &ca).await;
        assert_eq!(client.unwrap(), *b"ok");
        assert_eq!(server.unwrap(), None);
    }

    #[tokio::test]
    async fn a_certificate_of_an_unknown_ca_is_let_through_to_sign_in() {
        let ca = ca();
        let stranger = self::ca();
        let (cert, key) = leaf(&stranger, "Device 1", &[]);
        let client = client_builder(&ca, &[&rustls::version::TLS13])
            .with_client_auth_cert(vec![cert.clone()], key)
            .unwrap();
        let (server, client) = handshake(client, &ca).await;
        assert_eq!(client.unwrap(), *b"ok");
        assert_eq!(server.unwrap(), Some(vec![cert]));
    }

    #[tokio::test]
    async fn a_client_without_the_certificates_key_is_refused() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let ca = ca();
            let (cert, _) = leaf(&ca, "Device 1", &[]);
            // Someone else's certificate, signed for with another key: CertifiedKey::new does
            // not check they belong together, the server must.
            let (_, other_key) = leaf(&ca, "thief", &[]);
            let signer = provider().key_provider.load_private_key(other_key).unwrap();
            let stolen = SingleCertAndKey::from(CertifiedKey::new(vec![cert], signer));
            let client = client_builder(&ca, &[version]).with_client_cert_resolver(Arc::new(stolen));
            let (server, client) = handshake(client, &ca).await;
            let error = server.unwrap_err();
            assert_eq!(
                rustls_error(&error),
                Some(&rustls::Error::InvalidCertificate(CertificateError::BadSignature)),
                "{version:?}: {error}"
            );
            assert!(client.is_err(), "{version:?}");
        }
    }

    #[tokio::test]
    async fn a_certificate_that_does_not_parse_is_refused() {
        let ca = ca();
        let (_, key) = leaf(&ca, "Device 1", &[]);
        let signer = provider().key_provider.load_private_key(key).unwrap();
        let garbage = CertificateDer::from(b"not a certificate".to_vec());
        let client = client_builder(&ca, &[&rustls::version::TLS13]).with_client_cert_resolver(Arc::new(
            SingleCertAndKey::from(CertifiedKey::new(vec![garbage], signer)),
        ));
        let (server, client) = handshake(client, &ca).await;
        let error = server.unwrap_err();
        assert_eq!(
            rustls_error(&error),
            Some(&rustls::Error::InvalidCertificate(CertificateError::BadEncoding)),
            "{error}"
        );
        assert!(client.is_err());
    }

    #[test]
    fn certificates_are_asked_for_not_required_and_not_hinted() {
        let verifier = DeferredClientCert::new(&provider());
        assert!(verifier.offer_client_auth());
        assert!(!verifier.client_auth_mandatory());
        assert!(verifier.root_hint_subjects().is_empty());
        assert_eq!(
            verifier.supported_verify_schemes(),
            provider().signature_verification_algorithms.supported_schemes()
        );
        assert!(verifier
            .supported_verify_schemes()
            .contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    }
}
