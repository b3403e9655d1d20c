//! `/_test/*`: a JSON admin API with the same knobs as the library, so scripts can steer a
//! server running in another process. Unauthenticated and never logged; bind it to loopback.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cluster::Cluster;
use crate::controller::ControllerMode;
use crate::faults::Fault;
use crate::kubeconfig;
use crate::rbac::RbacRule;
use crate::requests::RecordedRequest;
use crate::workload::{UnknownKind, WorkloadKind};

pub(crate) fn routes() -> Router<Cluster> {
    Router::new()
        .route("/workloads", post(add_workload))
        .route("/workloads/{kind}/{namespace}/{name}", get(show_workload).delete(remove_workload))
        .route("/controller", get(show_controller).put(set_controller))
        .route("/rbac", get(show_rbac).put(set_rbac))
        .route("/token", put(set_token))
        .route("/faults", post(add_fault).delete(clear_faults))
        .route("/latency", put(set_latency))
        .route("/requests", get(list_requests).delete(clear_requests))
        .route("/compact", post(compact))
        .route("/kubeconfig", get(show_kubeconfig))
}

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    /// The path names a kind other than deployment or statefulset.
    #[error(transparent)]
    Kind(#[from] UnknownKind),
    /// No such workload.
    #[error("{kind} {namespace}/{name} not found")]
    NotFound { kind: WorkloadKind, namespace: String, name: String },
    /// A workload cannot start with negative replicas.
    #[error("replicas must not be negative, got {0}")]
    NegativeReplicas(i32),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let code = match self {
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Kind(_) | Self::NegativeReplicas(_) => StatusCode::BAD_REQUEST,
        };
        (code, Json(json!({"error": self.to_string()}))).into_response()
    }
}

/// `POST /_test/workloads` body.
#[derive(Debug, Deserialize)]
struct NewWorkload {
    kind: WorkloadKind,
    namespace: String,
    name: String,
    replicas: i32,
}

async fn add_workload(State(cluster): State<Cluster>, Json(new): Json<NewWorkload>) -> Result<Response, AdminError> {
    if new.replicas < 0 {
        return Err(AdminError::NegativeReplicas(new.replicas));
    }
    cluster.add_workload(new.kind, &new.namespace, &new.name, new.replicas);
    let object = cluster.object(new.kind, &new.namespace, &new.name);
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

/// A workload's state as tests ask about it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkloadState {
    spec_replicas: i32,
    ready_replicas: i32,
    annotations: std::collections::BTreeMap<String, String>,
    object: serde_json::Value,
}

async fn show_workload(
    State(cluster): State<Cluster>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<WorkloadState>, AdminError> {
    let kind: WorkloadKind = kind.parse()?;
    let not_found = || AdminError::NotFound { kind, namespace: namespace.clone(), name: name.clone() };
    let (spec_replicas, ready_replicas) = cluster.replicas(kind, &namespace, &name).ok_or_else(not_found)?;
    Ok(Json(WorkloadState {
        spec_replicas,
        ready_replicas,
        annotations: cluster.annotations(kind, &namespace, &name).unwrap_or_default(),
        object: cluster.object(kind, &namespace, &name).ok_or_else(not_found)?,
    }))
}

async fn remove_workload(
    State(cluster): State<Cluster>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<StatusCode, AdminError> {
    let kind: WorkloadKind = kind.parse()?;
    if cluster.remove_workload(kind, &namespace, &name) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AdminError::NotFound { kind, namespace, name })
    }
}

/// [`ControllerMode`] in JSON, with durations in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "camelCase", rename_all_fields = "camelCase")]
enum ControllerBody {
    Ready { after_ms: u64 },
    Never { progress_deadline_ms: u64 },
    Partial { ready: i32, after_ms: u64 },
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<ControllerMode> for ControllerBody {
    fn from(mode: ControllerMode) -> Self {
        match mode {
            ControllerMode::Ready { after } => Self::Ready { after_ms: millis(after) },
            ControllerMode::Never { progress_deadline } => {
                Self::Never { progress_deadline_ms: millis(progress_deadline) }
            }
            ControllerMode::Partial { ready, after } => Self::Partial { ready, after_ms: millis(after) },
        }
    }
}

impl From<ControllerBody> for ControllerMode {
    fn from(body: ControllerBody) -> Self {
        match body {
            ControllerBody::Ready { after_ms } => Self::Ready { after: Duration::from_millis(after_ms) },
            ControllerBody::Never { progress_deadline_ms } => {
                Self::Never { progress_deadline: Duration::from_millis(progress_deadline_ms) }
            }
            ControllerBody::Partial { ready, after_ms } => {
                Self::Partial { ready, after: Duration::from_millis(after_ms) }
            }
        }
    }
}

async fn show_controller(State(cluster): State<Cluster>) -> Json<ControllerBody> {
    Json(cluster.controller().into())
}

async fn set_controller(State(cluster): State<Cluster>, Json(body): Json<ControllerBody>) -> StatusCode {
    cluster.set_controller(body.into());
    StatusCode::NO_CONTENT
}

/// `PUT /_test/rbac` body: `null` rules allow everything.
#[derive(Debug, Serialize, Deserialize)]
struct RbacBody {
    rules: Option<Vec<RbacRule>>,
}

async fn show_rbac(State(cluster): State<Cluster>) -> Json<RbacBody> {
    Json(RbacBody { rules: cluster.knobs().rbac.clone() })
}

async fn set_rbac(State(cluster): State<Cluster>, Json(body): Json<RbacBody>) -> StatusCode {
    cluster.set_rbac(body.rules);
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct TokenBody {
    token: String,
}

async fn set_token(State(cluster): State<Cluster>, Json(body): Json<TokenBody>) -> StatusCode {
    cluster.set_token(&body.token);
    StatusCode::NO_CONTENT
}

async fn add_fault(State(cluster): State<Cluster>, Json(fault): Json<Fault>) -> StatusCode {
    cluster.inject_fault(fault);
    StatusCode::NO_CONTENT
}

async fn clear_faults(State(cluster): State<Cluster>) -> StatusCode {
    cluster.clear_faults();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct LatencyBody {
    ms: u64,
}

async fn set_latency(State(cluster): State<Cluster>, Json(body): Json<LatencyBody>) -> StatusCode {
    cluster.set_latency(Duration::from_millis(body.ms));
    StatusCode::NO_CONTENT
}

async fn list_requests(State(cluster): State<Cluster>) -> Json<Vec<RecordedRequest>> {
    Json(cluster.requests())
}

async fn clear_requests(State(cluster): State<Cluster>) -> StatusCode {
    cluster.clear_requests();
    StatusCode::NO_CONTENT
}

async fn compact(State(cluster): State<Cluster>) -> StatusCode {
    cluster.compact_watch_history();
    StatusCode::NO_CONTENT
}

#[derive(Debug, Deserialize)]
struct KubeconfigQuery {
    namespace: Option<String>,
}

/// The kubeconfig for this server, addressed by the `Host` the caller used.
async fn show_kubeconfig(
    State(cluster): State<Cluster>,
    headers: HeaderMap,
    Query(query): Query<KubeconfigQuery>,
) -> Response {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
    let yaml = kubeconfig::kubeconfig_yaml(
        &format!("http://{host}"),
        &cluster.token(),
        query.namespace.as_deref().unwrap_or("default"),
    );
    ([(header::CONTENT_TYPE, "application/yaml")], yaml).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_modes_round_trip_through_json() {
        let body: ControllerBody = serde_json::from_str(r#"{"mode":"partial","ready":1,"afterMs":250}"#).unwrap();
        assert_eq!(ControllerMode::from(body), ControllerMode::Partial { ready: 1, after: Duration::from_millis(250) });
        let never = ControllerBody::from(ControllerMode::Never { progress_deadline: Duration::from_secs(2) });
        assert_eq!(serde_json::to_value(never).unwrap(), json!({"mode": "never", "progressDeadlineMs": 2000}));
    }
}
