//! HTTPS on the HTTP listener (`--tls-cert`, `--tls-key`): rustls with the ring provider, the
//! certificate and key read from PEM files and read again when either file changes, without a
//! restart (docs/http-and-api.md, "TLS"). The handshake itself runs in each connection's task,
//! under its timeouts ([`crate::connections`]).

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

/// Where the certificate chain and its private key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The ring provider, named explicitly: whatever other crates turn on in rustls, the server
/// never depends on a process-wide default provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read and check a certificate chain and its key: both parse, and the key is the certificate's.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading the certificate {cert_path}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_path} holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("reading the private key {key_path}: {e}"))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| format!("the key {key_path} does not fit the certificate {cert_path}: {e}"))
}

/// What identifies a version of a file on disk: its modification time and length (a Kubernetes
/// secret swapped by its symlink shows as a new file; `metadata` follows the link).
type Stamp = Option<(Option<SystemTime>, u64)>;

fn stamp(path: &Path) -> Stamp {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok(), metadata.len()))
}

/// The server's certificate, replaced when its files change ([`CertReloader::reload_if_changed`]);
/// every handshake takes the one current when it begins.
#[derive(Debug)]
pub struct CertReloader {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' stamps when last read, successfully or not.
    read: Mutex<(Stamp, Stamp)>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl CertReloader {
    /// Read the files once; an error names what is missing or wrong with them.
    pub fn new(files: TlsFiles) -> Result<Self, String> {
        let stamps = (stamp(&files.cert), stamp(&files.key));
        let current = load(&files)?;
        Ok(Self {
            files,
            current: RwLock::new(Arc::new(current)),
            read: Mutex::new(stamps),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// The certificate served now.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads that replaced the certificate, and those that failed and kept the old one.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Read the files again if either's modification time or length changed since they were last
    /// read: `Some(true)` when the new pair is served from now on, `Some(false)` when it is not
    /// usable (logged; the old pair stays, and is read again at the files' next change), `None`
    /// when nothing changed.
    pub fn reload_if_changed(&self) -> Option<bool> {
        let stamps = (stamp(&self.files.cert), stamp(&self.files.key));
        {
            let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
            if *read == stamps {
                return None;
            }
            *read = stamps;
        }
        match load(&self.files) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ajour_tls_reloads_total", "outcome" => "ok").increment(1);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                Some(true)
            }
            Err(error) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ajour_tls_reloads_total", "outcome" => "failed").increment(1);
                tracing::warn!("TLS certificate not reloaded, the previous one is kept: {error}");
                Some(false)
            }
        }
    }

    /// Look at the files every `every` until `stop` resolves.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            let reloader = self.clone();
            // Reading files blocks.
            let _ = tokio::task::spawn_blocking(move || reloader.reload_if_changed()).await;
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The TLS side of the HTTP and MQTT listeners: `reloader`'s certificate, HTTP/1.1 by ALPN (a
/// client offering no ALPN, as MQTT clients do, is served all the same), and a client
/// certificate asked for but not required ([`crate::client_cert`]): devices may sign in with one.
pub fn acceptor(reloader: Arc<CertReloader>) -> Result<tokio_rustls::TlsAcceptor, String> {
    let mut config = crate::client_cert::server_config_with_client_certs(reloader)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
