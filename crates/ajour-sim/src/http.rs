//! A device on the HTTP endpoint, as Drogue's devices (and `drgdfu`) speak to it.

use crate::{EncodedStatus, Link, LinkError, StatusEncoding};
use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;

/// One device posting its statuses to `/v1/dfu` with Basic credentials `device@app:password`,
/// waiting for the command in the answer.
#[derive(Debug, Clone)]
pub struct HttpLink {
    http: reqwest::Client,
    url: String,
    authorization: String,
}

impl HttpLink {
    /// Device `device` of application `app` at the endpoint under `base_url`. `http` is shared by
    /// a fleet (its connection pool and timeout).
    pub fn new(http: reqwest::Client, base_url: &str, app: &str, device: &str, password: &str) -> Self {
        Self {
            http,
            // `ct=30`: wait up to 30 s for a command, as devices ask Drogue to.
            url: format!("{}/v1/dfu?ct=30", base_url.trim_end_matches('/')),
            authorization: ajour_types::basic_auth::encode(&format!("{device}@{app}"), password),
        }
    }
}

impl Link for HttpLink {
    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        let mut request = self
            .http
            .post(&self.url)
            .header(AUTHORIZATION, &self.authorization)
            .body(status.bytes);
        // drgdfu sends the named form with no content type.
        if status.encoding == StatusEncoding::Packed {
            request = request.header(CONTENT_TYPE, "application/cbor");
        }
        // `{:#}`: down to the cause; reqwest's own message alone rarely says what happened.
        let unreachable = |error: reqwest::Error| {
            LinkError::Connection(format!(
                "{:#}",
                anyhow::Error::new(error).context(format!("POST {}", self.url))
            ))
        };
        let response = request.send().await.map_err(unreachable)?;
        let code = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        match code {
            StatusCode::OK => Ok(body),
            StatusCode::FORBIDDEN => Err(LinkError::Protocol(
                "authentication refused (403): check application, device and password".into(),
            )),
            // A server shutting down, or a proxy in front of one that is away; or logins for
            // this device held back for a while (someone guessed its password).
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS => {
                Err(LinkError::Connection(format!("POST {}: {code}", self.url)))
            }
            _ => Err(LinkError::Protocol(format!(
                "unexpected answer {code}: {}",
                String::from_utf8_lossy(&body).trim()
            ))),
        }
    }
}
