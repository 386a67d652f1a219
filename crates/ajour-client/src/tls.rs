//! TLS for both clients (MQTT and the registry's HTTP): the system's roots plus an optional CA
//! file, or no verification at all when asked for (test installations with self-signed
//! certificates), and optionally a client certificate to present. rustls with the ring provider,
//! chosen here rather than through a process-wide default, so nothing depends on which crate
//! installed one first.

use crate::SetupError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to check the server's certificate, and what to present of one's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// A PEM file of CA certificates trusted in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate. For test installations only: it defeats TLS against an attacker.
    pub insecure: bool,
    /// The client certificate presented when the server asks for one; none without.
    pub client_cert: Option<ClientCert>,
}

/// A client certificate (its chain: the client's own first, then any intermediates) and its
/// private key, read from PEM files and checked to belong together, so that a pair that cannot
/// work is refused when it is read, naming its file, not at a handshake.
#[derive(Clone)]
pub struct ClientCert {
    cert_file: PathBuf,
    key: Arc<CertifiedKey>,
}

impl ClientCert {
    /// The certificates in `cert_file` (PEM, at least one) and the private key in `key_file`
    /// (PEM: PKCS#8, PKCS#1 or SEC1; the first in the file), which must be the key of the first
    /// certificate. Every error names the file it is about.
    pub fn read(cert_file: &Path, key_file: &Path) -> Result<Self, SetupError> {
        let bad_cert = |reason: String| SetupError::ClientCert {
            path: cert_file.to_path_buf(),
            reason,
        };
        let bad_key = |reason: String| SetupError::ClientKey {
            path: key_file.to_path_buf(),
            reason,
        };
        let cert_pem = std::fs::read(cert_file).map_err(|e| bad_cert(format!("cannot be read: {e}")))?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_cert(format!("is not valid PEM: {e}")))?;
        if chain.is_empty() {
            return Err(bad_cert("holds no PEM CERTIFICATE".into()));
        }
        let key_pem = std::fs::read(key_file).map_err(|e| bad_key(format!("cannot be read: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                bad_key("holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".into())
            }
            other => bad_key(format!("is not valid PEM: {other}")),
        })?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad_key(format!("holds a private key that cannot be used: {e}")))?;
        let key = CertifiedKey::new(chain, signing_key);
        match key.keys_match() {
            // A key that cannot tell its public half is let through, as rustls lets it through.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(SetupError::ClientKeyMismatch {
                    cert: cert_file.to_path_buf(),
                    key: key_file.to_path_buf(),
                })
            }
            Err(other) => {
                return Err(bad_cert(format!(
                    "holds a certificate that cannot be used: {other}"
                )))
            }
        }
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key: Arc::new(key),
        })
    }

    /// The file the certificate was read from.
    pub fn cert_file(&self) -> &Path {
        &self.cert_file
    }

    /// The chain, the client's own certificate first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }
}

/// The key is not shown: only which certificate it is.
impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

/// The same certificates are the same client certificate (its key belongs to the first).
impl PartialEq for ClientCert {
    fn eq(&self, other: &Self) -> bool {
        self.chain() == other.chain()
    }
}

impl Eq for ClientCert {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates in `path`.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let pem = std::fs::read(path).map_err(|source| SetupError::CaFile {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(SetupError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// A rustls client configuration for `options`.
pub fn client_config(options: &TlsOptions) -> Result<Arc<ClientConfig>, SetupError> {
    let provider = provider();
    let builder =
        ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = if options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        // A machine without a system store still works with a CA file; errors for single
        // unreadable system certificates are not ours to fix.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = &options.ca_file {
            for cert in read_ca_file(path)? {
                roots.add(cert)?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match &options.client_cert {
        Some(cert) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert.key.clone()))),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `config` presenting `cert` (in place of what it presented): many clients with certificates of
/// their own on one set of roots, read once.
pub fn presenting(config: &ClientConfig, cert: &ClientCert) -> ClientConfig {
    let mut config = config.clone();
    config.client_auth_cert_resolver = Arc::new(SingleCertAndKey::from(cert.key.clone()));
    config
}

/// Accepts every certificate, but still checks that the handshake is signed properly.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
