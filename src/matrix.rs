//! Outgoing client-server API calls as the bot: `as_token`, `user_id` and `device_id` masquerading.

use std::{borrow::Cow, sync::RwLock, time::Duration};

use ruma::{
    OwnedDeviceId, OwnedUserId,
    api::{
        AppserviceUserIdentity, IncomingResponse, MatrixVersion, OutgoingRequest, OutgoingRequestAppserviceExt,
        SupportedVersions,
        auth_scheme::{AuthScheme, SendAccessToken},
        error::FromHttpResponseError,
        path_builder::{PathBuilder, SinglePath, VersionHistory},
    },
};
use url::Url;

use crate::secret::Secret;

/// Errors of a call to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// The homeserver could not be reached.
    #[error("homeserver unreachable at {url}: {source}")]
    Unreachable {
        /// The homeserver base URL.
        url: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The homeserver answered with an error.
    #[error("homeserver answered {status} {errcode}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Matrix error code, e.g. `M_FORBIDDEN`.
        errcode: String,
        /// The error message.
        message: String,
    },
    /// A request could not be built (a bug).
    #[error("could not build request: {0}")]
    Build(String),
    /// A response could not be read.
    #[error("could not read the homeserver's response: {0}")]
    Response(String),
}

impl MatrixError {
    /// The Matrix error code, if the homeserver sent one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            MatrixError::Api { errcode, .. } => Some(errcode),
            _ => None,
        }
    }

    /// Whether the homeserver refused the request as too large (413 or `M_TOO_LARGE`).
    pub fn is_too_large(&self) -> bool {
        matches!(self, MatrixError::Api { status: 413, .. }) || self.errcode() == Some("M_TOO_LARGE")
    }

    /// Whether trying again later may succeed (transport errors, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            MatrixError::Unreachable { .. } => true,
            MatrixError::Api { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }
}

/// Gives the path-builder input a request type needs from the versions we assume.
pub trait PathInput: PathBuilder {
    /// The input for this path builder.
    fn input(versions: &SupportedVersions) -> Self::Input<'_>;
}

impl PathInput for VersionHistory {
    fn input(versions: &SupportedVersions) -> Self::Input<'_> {
        Cow::Borrowed(versions)
    }
}

impl PathInput for SinglePath {
    fn input(_: &SupportedVersions) -> Self::Input<'_> {}
}

/// The homeserver, as the bot sees it.
pub struct MatrixClient {
    http: reqwest::Client,
    base: String,
    as_token: Secret,
    bot: OwnedUserId,
    device_id: RwLock<Option<OwnedDeviceId>>,
    versions: SupportedVersions,
}

impl std::fmt::Debug for MatrixClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatrixClient").field("base", &self.base).field("bot", &self.bot).finish_non_exhaustive()
    }
}

impl MatrixClient {
    /// A client for `homeserver` acting as `bot` with `as_token`.
    pub fn new(homeserver: &Url, as_token: Secret, bot: OwnedUserId) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("matrix-k8s-toggle/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with static settings");
        let versions = SupportedVersions {
            versions: [MatrixVersion::V1_1, MatrixVersion::V1_7, MatrixVersion::V1_11, MatrixVersion::V1_12]
                .into_iter()
                .collect(),
            features: Default::default(),
        };
        Self {
            http,
            base: homeserver.as_str().trim_end_matches('/').to_owned(),
            as_token,
            bot,
            device_id: RwLock::new(None),
            versions,
        }
    }

    /// The bot's user id.
    pub fn bot(&self) -> &OwnedUserId {
        &self.bot
    }

    /// The homeserver base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sets the device every later call masquerades as (`device_id=`).
    pub fn set_device_id(&self, device_id: Option<OwnedDeviceId>) {
        *self.device_id.write().unwrap_or_else(|e| e.into_inner()) = device_id;
    }

    /// The device calls masquerade as.
    pub fn device_id(&self) -> Option<OwnedDeviceId> {
        self.device_id.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends `request` as the bot (and its device, once set).
    pub async fn send<R>(&self, request: R) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let device = self.device_id();
        let mut identity = AppserviceUserIdentity::new(&self.bot);
        identity.device_id = device.as_deref();
        self.send_with_identity(request, identity).await
    }

    /// Sends `request` as the bot without naming a device.
    pub async fn send_without_device<R>(&self, request: R) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        self.send_with_identity(request, AppserviceUserIdentity::new(&self.bot)).await
    }

    async fn send_with_identity<R>(
        &self,
        request: R,
        identity: AppserviceUserIdentity<'_>,
    ) -> Result<R::IncomingResponse, MatrixError>
    where
        R: OutgoingRequest,
        R::PathBuilder: PathInput,
        for<'a> R::Authentication: AuthScheme<Input<'a> = SendAccessToken<'a>>,
    {
        let http_request: http::Request<Vec<u8>> = request
            .try_into_http_request_with_identity(
                &self.base,
                SendAccessToken::Always(self.as_token.expose()),
                identity,
                R::PathBuilder::input(&self.versions),
            )
            .map_err(|e| MatrixError::Build(e.to_string()))?;
        let (parts, body) = http_request.into_parts();
        let url = parts.uri.to_string();
        tracing::trace!(method = %parts.method, path = %parts.uri.path(), "homeserver request");
        let response = self
            .http
            .request(parts.method, &url)
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|source| MatrixError::Unreachable { url: self.base.clone(), source })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes =
            response.bytes().await.map_err(|source| MatrixError::Unreachable { url: self.base.clone(), source })?;
        if !status.is_success() {
            return Err(api_error(status.as_u16(), &bytes));
        }
        let mut builder = http::Response::builder().status(status);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let http_response = builder.body(bytes.to_vec()).map_err(|e| MatrixError::Response(e.to_string()))?;
        R::IncomingResponse::try_from_http_response(http_response).map_err(|e| match e {
            FromHttpResponseError::Server(_) => api_error(status.as_u16(), &bytes),
            other => MatrixError::Response(other.to_string()),
        })
    }
}

fn api_error(status: u16, body: &[u8]) -> MatrixError {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        errcode: Option<String>,
        error: Option<String>,
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (errcode, message) = match parsed {
        Some(b) => (b.errcode.unwrap_or_else(|| "M_UNKNOWN".into()), b.error.unwrap_or_default()),
        None => ("M_UNKNOWN".into(), String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()),
    };
    MatrixError::Api { status, errcode, message }
}
