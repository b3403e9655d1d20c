//! The harness: a started server, a kubeconfig on disk, and raw HTTP helpers.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};
use reqwest::Method;
use serde_json::Value;
use tempfile::TempDir;
use test_apiserver::TestApiServer;

/// The Deployment collection in namespace `bots`.
pub const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/bots/deployments";
/// The StatefulSet collection in namespace `bots`.
pub const STATEFULSETS: &str = "/apis/apps/v1/namespaces/bots/statefulsets";
/// The merge patch content type.
pub const MERGE: &str = "application/merge-patch+json";

/// A started server with a kubeconfig written next to it.
pub struct Harness {
    pub server: TestApiServer,
    pub http: reqwest::Client,
    pub kubeconfig: PathBuf,
    _dir: TempDir,
}

/// A response's code, headers and raw body.
pub struct Reply {
    pub code: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

impl Harness {
    /// A server holding Deployment `bots/web` and StatefulSet `bots/db`, both at 0 replicas.
    pub async fn start() -> Self {
        let server = TestApiServer::start().await.expect("server starts");
        server.add_deployment("bots", "web", 0);
        server.add_statefulset("bots", "db", 0);
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig written");
        Self { server, http: reqwest::Client::new(), kubeconfig, _dir: dir }
    }

    /// A kube-rs client built from the written kubeconfig.
    pub async fn kube(&self) -> kube::Client {
        // NB: in the workspace build more than one rustls backend is linked; pick one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig parses");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("config loads");
        kube::Client::try_from(config).expect("client builds")
    }

    /// Sends a request with the server's token.
    pub async fn send(&self, method: Method, path: &str, content_type: Option<&str>, body: &str) -> Reply {
        self.send_as(method, path, content_type, body, Some("test-token")).await
    }

    /// Sends a request with the given bearer token, or none.
    pub async fn send_as(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: &str,
        token: Option<&str>,
    ) -> Reply {
        let mut request = self.http.request(method, format!("{}{path}", self.server.url())).body(body.to_owned());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request is answered");
        Reply {
            code: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.expect("body reads"),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, "").await
    }

    pub async fn merge_patch(&self, path: &str, body: &str) -> Reply {
        self.send(Method::PATCH, path, Some(MERGE), body).await
    }

    /// Calls the admin API.
    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let mut request = self.http.request(method, format!("{}/_test{path}", self.server.url()));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin answers");
        Reply {
            code: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.expect("body reads"),
        }
    }
}

/// Polls `check` every 20ms until it holds, failing after `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
