//! The registry connection: the OCI distribution client with this store's configuration, limits
//! and error mapping. Everything that goes over the network is here, and every byte it returns
//! has been checked against its digest.

use super::layout::{Descriptor, MANIFEST_MEDIA_TYPES};
use super::reference::ImageRef;
use super::{OciAuth, OciConfig, OciError};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Progress of an upload: called with the number of bytes just sent.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Size of each upload request when pushing a blob.
const PUSH_CHUNK: usize = 1 << 20;

pub struct RegistryClient {
    client: oci_client::Client,
    auth: RegistryAuth,
    timeout: Duration,
}

impl RegistryClient {
    pub fn new(config: &OciConfig) -> Result<Self, OciError> {
        // reqwest is built without a default crypto provider so that ring, not aws-lc-rs, is
        // used. A process that installed one already keeps its own.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut extra_root_certificates = Vec::new();
        if let Some(path) = &config.extra_ca_file {
            let data = std::fs::read(path)
                .map_err(|e| OciError::Config(format!("reading CA file {}: {e}", path.display())))?;
            if !data.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(OciError::Config(format!(
                    "CA file {} holds no PEM certificate",
                    path.display()
                )));
            }
            extra_root_certificates.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let client_config = ClientConfig {
            protocol: if config.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: config.accept_invalid_certs,
            extra_root_certificates,
            // Firmware is not built per platform: from an index, the first manifest.
            platform_resolver: Some(Box::new(|entries| entries.first().map(|e| e.digest.clone()))),
            connect_timeout: Some(config.request_timeout),
            read_timeout: Some(config.request_timeout),
            ..Default::default()
        };
        let client = oci_client::Client::try_from(client_config)
            .map_err(|e| OciError::Config(format!("building the registry client: {e}")))?;
        let auth = match &config.auth {
            OciAuth::Anonymous => RegistryAuth::Anonymous,
            OciAuth::Basic { username, password } => RegistryAuth::Basic(username.clone(), password.clone()),
            OciAuth::Bearer { token } => RegistryAuth::Bearer(token.clone()),
        };
        Ok(Self {
            client,
            auth,
            // Connect and read timeouts bound each step; this bounds a whole operation.
            timeout: config.request_timeout.saturating_mul(4),
        })
    }

    /// The manifest `image` names, and its digest (checked against the bytes).
    pub async fn manifest(&self, image: &ImageRef) -> Result<(Bytes, String), OciError> {
        let reference = reference(image)?;
        let (bytes, digest) = counted(
            "manifest",
            self.bounded(image, async {
                self.client
                    .pull_manifest_raw(&reference, &self.auth, MANIFEST_MEDIA_TYPES)
                    .await
            })
            .await,
        )?;
        let actual = sha256_digest(&bytes);
        if actual != digest || image.digest().is_some_and(|d| d != actual) {
            return Err(OciError::Invalid {
                image: image.to_string(),
                reason: format!("manifest digest mismatch: expected {digest}, the bytes hash to {actual}"),
            });
        }
        Ok((bytes, digest))
    }

    /// What the tag of `image` points to now: a HEAD request, no body.
    pub async fn manifest_digest(&self, image: &ImageRef) -> Result<String, OciError> {
        let reference = reference(image)?;
        counted(
            "manifest_head",
            self.bounded(image, async {
                self.client.fetch_manifest_digest(&reference, &self.auth).await
            })
            .await,
        )
    }

    /// The blob `descriptor` names, at most `limit` bytes, checked against its digest and size.
    pub async fn blob(
        &self,
        image: &ImageRef,
        descriptor: &Descriptor,
        limit: u64,
    ) -> Result<Bytes, OciError> {
        let invalid = |reason: String| OciError::Invalid {
            image: image.to_string(),
            reason,
        };
        if descriptor.size > limit {
            return Err(invalid(format!(
                "blob {} is {} bytes, more than the {limit} allowed",
                descriptor.digest, descriptor.size
            )));
        }
        let reference = reference(image)?;
        let download = async {
            let mut stream = self
                .client
                .pull_blob_stream(&reference, descriptor.digest.as_str())
                .await
                .map_err(|e| map_error(image, e))?;
            let mut data = BytesMut::with_capacity(descriptor.size as usize);
            let mut hasher = Sha256::new();
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    // Every byte arrived: the client's own digest check failed.
                    Err(e) if data.len() as u64 == descriptor.size => {
                        return Err(invalid(format!(
                            "blob digest mismatch for {}: {e}",
                            descriptor.digest
                        )))
                    }
                    Err(e) => {
                        return Err(OciError::Unavailable {
                            image: image.to_string(),
                            reason: format!("downloading blob {}: {e}", descriptor.digest),
                        })
                    }
                };
                if data.len() as u64 + chunk.len() as u64 > descriptor.size {
                    return Err(invalid(format!(
                        "blob {} is longer than the {} bytes its descriptor says",
                        descriptor.digest, descriptor.size
                    )));
                }
                hasher.update(&chunk);
                data.extend_from_slice(&chunk);
            }
            if data.len() as u64 != descriptor.size {
                return Err(invalid(format!(
                    "blob {} is {} bytes, its descriptor says {}",
                    descriptor.digest,
                    data.len(),
                    descriptor.size
                )));
            }
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != descriptor.digest {
                return Err(invalid(format!(
                    "blob digest mismatch: expected {}, the bytes hash to {actual}",
                    descriptor.digest
                )));
            }
            Ok(data.freeze())
        };
        let result = match tokio::time::timeout(self.timeout, download).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(image, self.timeout)),
        };
        counted("blob", result)
    }

    /// Log in for pushing (a no-op for registries without auth).
    pub async fn authenticate_push(&self, image: &ImageRef) -> Result<(), OciError> {
        let reference = reference(image)?;
        self.bounded(image, async {
            self.client
                .auth(&reference, &self.auth, RegistryOperation::Push)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Upload a blob unless the registry has it, reporting progress as it goes.
    pub async fn push_blob(
        &self,
        image: &ImageRef,
        data: Bytes,
        digest: &str,
        progress: Progress,
    ) -> Result<(), OciError> {
        let reference = reference(image)?;
        let exists = self
            .bounded(image, async { self.client.blob_exists(&reference, digest).await })
            .await?;
        if exists {
            progress(data.len() as u64);
            return Ok(());
        }
        let size = data.len() as u64;
        let chunks: Vec<Bytes> = (0..data.len())
            .step_by(PUSH_CHUNK)
            .map(|start| data.slice(start..(start + PUSH_CHUNK).min(data.len())))
            .collect();
        // The client asks for the next chunk once the previous one is uploaded.
        let mut sent_before: Option<u64> = None;
        let stream = futures_util::stream::iter(chunks).map(move |chunk| {
            if let Some(sent) = sent_before.replace(chunk.len() as u64) {
                progress(sent);
            }
            Ok(chunk)
        });
        let push = self
            .client
            .push_blob_stream(&reference, stream, digest, Some(size));
        let uploads = (size / PUSH_CHUNK as u64 + 1) as u32;
        match tokio::time::timeout(self.timeout.saturating_mul(uploads), push).await {
            Ok(result) => result.map(|_| ()).map_err(|e| map_error(image, e)),
            Err(_) => Err(timed_out(image, self.timeout)),
        }
    }

    /// Store `manifest` under the tag of `image`; its digest.
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        manifest: Bytes,
        media_type: &str,
    ) -> Result<String, OciError> {
        let reference = reference(image)?;
        let digest = sha256_digest(&manifest);
        let content_type = media_type.parse().map_err(|_| OciError::Invalid {
            image: image.to_string(),
            reason: format!("bad media type {media_type}"),
        })?;
        self.bounded(image, async {
            self.client
                .push_manifest_raw(&reference, manifest, content_type)
                .await
        })
        .await?;
        Ok(digest)
    }

    async fn bounded<T>(
        &self,
        image: &ImageRef,
        operation: impl Future<Output = Result<T, OciDistributionError>>,
    ) -> Result<T, OciError> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(result) => result.map_err(|e| map_error(image, e)),
            Err(_) => Err(timed_out(image, self.timeout)),
        }
    }
}

/// `ajour_oci_registry_requests_total{kind, result}`: what the store asked the registry, and whether
/// it got a usable answer.
fn counted<T>(kind: &'static str, result: Result<T, OciError>) -> Result<T, OciError> {
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("ajour_oci_registry_requests_total", "kind" => kind, "result" => outcome).increment(1);
    result
}

fn reference(image: &ImageRef) -> Result<oci_client::Reference, OciError> {
    image.to_client_reference().map_err(OciError::InvalidImage)
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn timed_out(image: &ImageRef, after: Duration) -> OciError {
    OciError::Unavailable {
        image: image.to_string(),
        reason: format!("the registry did not answer within {after:?}"),
    }
}

/// Sort the client's errors into what an operator must do: nothing (wait), fix the name, fix
/// the credentials, or fix the image.
fn map_error(image: &ImageRef, error: OciDistributionError) -> OciError {
    let image_name = image.to_string();
    let reason = error.to_string();
    let unavailable = || OciError::Unavailable {
        image: image_name.clone(),
        reason: reason.clone(),
    };
    let denied = || OciError::Denied {
        image: image_name.clone(),
        reason: reason.clone(),
    };
    let invalid = || OciError::Invalid {
        image: image_name.clone(),
        reason: reason.clone(),
    };
    match &error {
        OciDistributionError::RegistryError { envelope, .. } => {
            match envelope.errors.first().map(|e| &e.code) {
                Some(
                    OciErrorCode::ManifestUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::BlobUnknown,
                ) => OciError::NotFound(image_name),
                Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => denied(),
                Some(
                    OciErrorCode::NameInvalid | OciErrorCode::TagInvalid | OciErrorCode::ManifestInvalid,
                ) => invalid(),
                _ => unavailable(),
            }
        }
        OciDistributionError::ServerError { code: 404, .. }
        | OciDistributionError::ImageManifestNotFoundError(_) => OciError::NotFound(image_name),
        OciDistributionError::ServerError { code: 401 | 403, .. }
        | OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::RegistryTokenDecodeError(_) => denied(),
        OciDistributionError::DigestError(_)
        | OciDistributionError::ManifestParsingError(_)
        | OciDistributionError::VersionedParsingError(_)
        | OciDistributionError::UnsupportedMediaTypeError(_)
        | OciDistributionError::UnsupportedSchemaVersionError(_)
        | OciDistributionError::ManifestEncodingError(_)
        | OciDistributionError::JsonError(_) => invalid(),
        _ => unavailable(),
    }
}
