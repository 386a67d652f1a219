//! A device on the HTTP endpoint, as Drogue's devices (and `drgdfu`) speak to it.

use crate::{EncodedStatus, Link, LinkError, StatusEncoding};
use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use std::sync::Arc;

/// One device posting its statuses to `/v1/dfu` with Basic credentials `device@app:password`,
/// or signed in by the client certificate its HTTP client presents
/// ([`Self::spread_by_certificate`]), waiting for the command in the answer.
///
/// Given several servers (instances of one Ajour on one database), the device's statuses go to
/// each in turn, as a load balancer without session affinity would spread them: every instance
/// must then be able to answer any status. A status a server could not take is sent again to the
/// next one.
#[derive(Debug, Clone)]
pub struct HttpLink {
    http: reqwest::Client,
    /// The endpoint URL of each server.
    urls: Arc<[String]>,
    /// The server the next status goes to (an index into `urls`, modulo its length).
    next: usize,
    sign_in: SignIn,
    /// The device a gateway sends statuses for (`as=`); `None`: the device speaks for itself.
    acting_for: Option<String>,
}

/// How a link's device signs in.
#[derive(Debug, Clone)]
enum SignIn {
    /// Basic credentials: the `Authorization` header's value.
    Password(String),
    /// The client certificate of the link's HTTP client, in application `app`.
    Certificate { app: String },
}

impl HttpLink {
    /// Device `device` of application `app` at the endpoint under `base_url`. `http` is shared by
    /// a fleet (its connection pool and timeout).
    pub fn new(http: reqwest::Client, base_url: &str, app: &str, device: &str, password: &str) -> Self {
        Self::spread(http, &Self::endpoints(&[base_url]), 0, app, device, password)
    }

    /// The endpoint URLs of the servers under `base_urls`, once for a whole fleet.
    pub fn endpoints(base_urls: &[impl AsRef<str>]) -> Arc<[String]> {
        base_urls
            .iter()
            // `ct=30`: wait up to 30 s for a command, as devices ask Drogue to.
            .map(|base| format!("{}/v1/dfu?ct=30", base.as_ref().trim_end_matches('/')))
            .collect()
    }

    /// Device `device` of application `app`, its statuses going to each of `endpoints` (from
    /// [`Self::endpoints`]) in turn, starting with the one at `first` (give each device of a
    /// fleet its own, so that a fleet's first statuses are spread too).
    pub fn spread(
        http: reqwest::Client,
        endpoints: &Arc<[String]>,
        first: usize,
        app: &str,
        device: &str,
        password: &str,
    ) -> Self {
        let credentials = ajour_types::basic_auth::encode(&format!("{device}@{app}"), password);
        Self::signing_in(http, endpoints, first, SignIn::Password(credentials))
    }

    /// A device of application `app` signing in by the client certificate `http` presents
    /// (made with `reqwest::ClientBuilder::identity`; the certificate names the device), its
    /// statuses spread as [`Self::spread`]'s. It sends no `Authorization` header: the endpoint
    /// takes a password over a certificate. The application is named by `?application=`, so
    /// the server need not find it by the certificate's issuer.
    pub fn spread_by_certificate(
        http: reqwest::Client,
        endpoints: &Arc<[String]>,
        first: usize,
        app: &str,
    ) -> Self {
        Self::signing_in(
            http,
            endpoints,
            first,
            SignIn::Certificate { app: app.to_string() },
        )
    }

    /// A link to `endpoints`, starting at `first`, signing in by `sign_in`.
    fn signing_in(http: reqwest::Client, endpoints: &Arc<[String]>, first: usize, sign_in: SignIn) -> Self {
        assert!(!endpoints.is_empty(), "a device needs a server to talk to");
        Self {
            http,
            urls: endpoints.clone(),
            next: first % endpoints.len(),
            sign_in,
            acting_for: None,
        }
    }

    /// This link's device is a gateway sending the statuses of `device` of its application
    /// (Drogue's `as=`): it logs in as itself, the statuses and commands are `device`'s.
    pub fn acting_for(mut self, device: &str) -> Self {
        self.acting_for = Some(device.to_string());
        self
    }
}

impl Link for HttpLink {
    async fn exchange(&mut self, status: EncodedStatus) -> Result<Bytes, LinkError> {
        let url = &self.urls[self.next];
        self.next = (self.next + 1) % self.urls.len();
        let mut request = self.http.post(url).body(status.bytes);
        request = match &self.sign_in {
            SignIn::Password(authorization) => request.header(AUTHORIZATION, authorization),
            SignIn::Certificate { app } => request.query(&[("application", app)]),
        };
        if let Some(device) = &self.acting_for {
            request = request.query(&[("as", device)]);
        }
        // drgdfu sends the named form with no content type.
        if status.encoding == StatusEncoding::Packed {
            request = request.header(CONTENT_TYPE, "application/cbor");
        }
        // `{:#}`: down to the cause; reqwest's own message alone rarely says what happened.
        let unreachable = |error: reqwest::Error| {
            LinkError::Connection(format!(
                "{:#}",
                anyhow::Error::new(error).context(format!("POST {url}"))
            ))
        };
        let response = request.send().await.map_err(unreachable)?;
        let code = response.status();
        let body = response.bytes().await.map_err(unreachable)?;
        match code {
            StatusCode::OK => Ok(body),
            StatusCode::FORBIDDEN => Err(LinkError::Protocol(match self.sign_in {
                SignIn::Password(_) => "authentication refused (403): check application, device and password".into(),
                SignIn::Certificate { .. } => "authentication refused (403): check the application's trust anchors, \
                     and that the client certificate names the device (its subject DN an alias of the device, \
                     or its Common Name the device's name)"
                    .into(),
            })),
            // The endpoint asks for a password when it saw no client certificate.
            StatusCode::UNAUTHORIZED if matches!(self.sign_in, SignIn::Certificate { .. }) => Err(LinkError::Protocol(
                "the server saw no client certificate (401): the endpoint must be https:// on a server with --tls-cert".into(),
            )),
            // A server shutting down, or a proxy in front of one that is away; or logins for
            // this device held back for a while (someone guessed its password).
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS => Err(LinkError::Connection(format!("POST {url}: {code}"))),
            _ => Err(LinkError::Protocol(format!(
                "unexpected answer {code}: {}",
                String::from_utf8_lossy(&body).trim()
            ))),
        }
    }
}
