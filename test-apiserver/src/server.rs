//! [`TestApiServer`]: the cluster served over HTTP on a local port, with its controller, until
//! it is shut down or dropped.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::controller::ControllerMode;
use crate::faults::Fault;
use crate::http::app;
use crate::kubeconfig::kubeconfig_yaml;
use crate::rbac::RbacRule;
use crate::requests::RecordedRequest;
use crate::workload::WorkloadKind;

/// The bearer token a server accepts unless told otherwise.
pub const DEFAULT_TOKEN: &str = "test-token";

/// How a server starts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The bearer token clients must send.
    pub token: String,
    /// How pods behave after a replica change.
    pub controller: ControllerMode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            token: DEFAULT_TOKEN.to_owned(),
            controller: ControllerMode::default(),
        }
    }
}

/// A running test apiserver; it stops serving when dropped or shut down.
#[derive(Debug)]
pub struct TestApiServer {
    cluster: Cluster,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
    controller: Option<JoinHandle<()>>,
}

impl TestApiServer {
    /// Starts on 127.0.0.1 with a free port, token `test-token`, RBAC allowing everything and
    /// pods ready 200ms after a change.
    pub async fn start() -> io::Result<Self> {
        Self::start_with(Options::default()).await
    }

    /// Starts with the given options.
    pub async fn start_with(options: Options) -> io::Result<Self> {
        let listener = TcpListener::bind(options.listen).await?;
        let addr = listener.local_addr()?;
        let cluster = Cluster::new(&options.token, options.controller);
        let controller = tokio::spawn(cluster.run_controller());
        let stopped = cluster.stopped();
        let router = app(cluster.clone());
        let server = tokio::spawn(async move {
            let serving = axum::serve(listener, router).with_graceful_shutdown(stopped);
            if let Err(error) = serving.await {
                tracing::error!(%error, "test apiserver stopped");
            }
        });
        tracing::info!(%addr, "test apiserver listening");
        Ok(Self { cluster, addr, server: Some(server), controller: Some(controller) })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }

    /// The simulated cluster behind it.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A kubeconfig for this server and its current token, namespace `default`.
    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_yaml(&self.url(), &self.cluster.token(), "default")
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
    }

    /// Creates a Deployment with `replicas` ready replicas.
    pub fn add_deployment(&self, namespace: &str, name: &str, replicas: i32) {
        self.cluster.add_deployment(namespace, name, replicas);
    }

    /// Creates a StatefulSet with `replicas` ready replicas.
    pub fn add_statefulset(&self, namespace: &str, name: &str, replicas: i32) {
        self.cluster.add_statefulset(namespace, name, replicas);
    }

    /// Deletes a workload; false if there was none.
    pub fn remove_workload(&self, kind: WorkloadKind, namespace: &str, name: &str) -> bool {
        self.cluster.remove_workload(kind, namespace, name)
    }

    /// Sets how pods behave for replica changes from now on.
    pub fn set_controller(&self, mode: ControllerMode) {
        self.cluster.set_controller(mode);
    }

    /// Replaces the RBAC table; `None` allows everything.
    pub fn set_rbac(&self, rules: Option<Vec<RbacRule>>) {
        self.cluster.set_rbac(rules);
    }

    /// Changes the accepted bearer token.
    pub fn set_token(&self, token: &str) {
        self.cluster.set_token(token);
    }

    /// Queues a fault.
    pub fn inject_fault(&self, fault: Fault) {
        self.cluster.inject_fault(fault);
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.cluster.clear_faults();
    }

    /// Delays every API response by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.cluster.set_latency(latency);
    }

    /// Delays answers to changing requests by `delay` after they were carried out.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.cluster.set_answer_delay(delay);
    }

    /// Every API request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.cluster.requests()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.cluster.clear_requests();
    }

    /// Every events.k8s.io Event created so far, oldest first.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.cluster.events()
    }

    /// `(spec.replicas, status.readyReplicas)` of a workload.
    pub fn replicas(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<(i32, i32)> {
        self.cluster.replicas(kind, namespace, name)
    }

    /// `metadata.annotations` of a workload.
    pub fn annotations(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<BTreeMap<String, String>> {
        self.cluster.annotations(kind, namespace, name)
    }

    /// Forgets the watch history, so older resourceVersions get 410 Expired.
    pub fn compact_watch_history(&self) {
        self.cluster.compact_watch_history();
    }

    /// Stops accepting connections, ends open watches, and waits (up to 5s) for the rest.
    pub async fn shutdown(mut self) {
        self.cluster.stop();
        for handle in [self.server.take(), self.controller.take()].into_iter().flatten() {
            let abort = handle.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), handle).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.cluster.stop();
    }
}
