//! The Kubernetes API surface. Each request is recorded, delayed, possibly answered by an
//! injected fault, authenticated, authorized, and only then served.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::admin;
use crate::autoscalers::AutoscalerKind;
use crate::cluster::Cluster;
use crate::patch::{self, PatchType};
use crate::rbac::{self, Attributes};
use crate::request::{ApiRequest, Discovery, EVENTS, Query, Target};
use crate::requests::RecordedRequest;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::Status;
use crate::store::{Filter, Key, Write};
use crate::watch;
use crate::workload::{Workload, WorkloadKind};

type Reply = Result<Response, Status>;

/// The whole server: the Kubernetes API plus the `/_test/` admin API.
pub fn app(cluster: Cluster) -> Router {
    Router::new().nest("/_test", admin::routes()).fallback(api).with_state(cluster)
}

/// One request's pieces, as the handlers need them.
struct Incoming {
    request: ApiRequest,
    method: Method,
    content_type: Option<String>,
    manager: String,
    body: Bytes,
}

async fn api(State(cluster): State<Cluster>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let changes = matches!(method, Method::PATCH | Method::PUT | Method::POST | Method::DELETE);
    let response = carry_out(&cluster, method, uri, headers, body).await;
    let delay = cluster.knobs().answer_delay;
    if changes && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

async fn carry_out(cluster: &Cluster, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path();
    let raw_query = uri.query().unwrap_or_default();
    let content_type = header_text(&headers, header::CONTENT_TYPE);
    cluster.record(RecordedRequest {
        method: method.to_string(),
        path: path.to_owned(),
        query: raw_query.to_owned(),
        content_type: content_type.clone(),
        body: String::from_utf8_lossy(&body).into_owned(),
        received_at: std::time::SystemTime::now(),
    });
    let request = ApiRequest::parse(method.as_str(), path, raw_query);
    let attributes = request.attributes();
    let (latency, fault, token, rules) = {
        let mut knobs = cluster.knobs();
        let target = format!("{path}?{raw_query}");
        let fault = knobs.faults.take(method.as_str(), &target);
        (knobs.latency, fault, knobs.token.clone(), knobs.rbac.clone())
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(code) = fault {
        tracing::debug!(%method, path, code, "injected fault");
        return Status::for_code(code, &request.refused(attributes.as_ref())).into_response();
    }
    let bearer = header_text(&headers, header::AUTHORIZATION);
    let bearer = bearer.as_deref().and_then(|h| h.strip_prefix("Bearer "));
    let anonymous_ok =
        bearer.is_none() && matches!(request.target, Target::Health | Target::Discovery(Discovery::Version));
    if bearer != Some(token.as_str()) && !anonymous_ok {
        return Status::unauthorized().into_response();
    }
    if let Some(attributes) = &attributes
        && !rbac::authorize(rules.as_deref(), attributes).allowed
    {
        return Status::forbidden(&request.refused(Some(attributes))).into_response();
    }
    let manager = request.query.field_manager.clone().unwrap_or_else(|| {
        header_text(&headers, header::USER_AGENT)
            .and_then(|ua| ua.split('/').next().map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned())
    });
    let incoming = Incoming { request, method, content_type, manager, body };
    serve(cluster, incoming, rules).unwrap_or_else(IntoResponse::into_response)
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn serve(cluster: &Cluster, incoming: Incoming, rules: Option<Vec<rbac::RbacRule>>) -> Reply {
    let method = incoming.method.clone();
    match (&method, &incoming.request.target) {
        (&Method::GET, Target::Collection { kind, namespace }) => {
            let filter = filter(namespace.clone(), &incoming.request.query)?;
            if incoming.request.query.watch {
                watch::serve(cluster, *kind, filter, &incoming.request.query)
            } else {
                list(cluster, *kind, &filter, &incoming.request.query)
            }
        }
        (&Method::GET, Target::Object { kind, namespace, name }) => {
            let key = Key::new(*kind, namespace, name);
            let store = cluster.store();
            let object = store.get(&key).ok_or_else(|| not_found(&key))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (&Method::GET, Target::Scale { kind, namespace, name }) => {
            let key = Key::new(*kind, namespace, name);
            let store = cluster.store();
            let object = store.get(&key).ok_or_else(|| not_found(&key))?;
            Ok(json_response(StatusCode::OK, &object.scale()))
        }
        (&Method::PATCH, Target::Object { kind, namespace, name }) => {
            patch_object(cluster, &Key::new(*kind, namespace, name), &incoming)
        }
        (&Method::PUT, Target::Object { kind, namespace, name }) => {
            replace_object(cluster, &Key::new(*kind, namespace, name), &incoming)
        }
        (&Method::PATCH | &Method::PUT, Target::Scale { kind, namespace, name }) => {
            write_scale(cluster, &Key::new(*kind, namespace, name), &incoming)
        }
        (&Method::POST, Target::AccessReview) => access_review(rules.as_deref(), &incoming),
        (&Method::POST, Target::Events { namespace }) => create_event(cluster, namespace, &incoming),
        (&Method::GET, Target::Autoscalers { kind, namespace }) => {
            list_autoscalers(cluster, *kind, namespace, &incoming)
        }
        (&Method::GET, Target::Autoscaler { kind, namespace, name }) => {
            let store = cluster.store();
            let object = store
                .autoscaler(*kind, namespace, name)
                .ok_or_else(|| Status::not_found(kind.group_resource(), name))?;
            Ok(json_response(StatusCode::OK, object))
        }
        (&Method::PATCH, Target::Autoscaler { kind, namespace, name }) => {
            patch_autoscaler(cluster, *kind, namespace, name, &incoming)
        }
        (&Method::GET, Target::Discovery(document)) => Ok(discovery(*document)),
        (&Method::GET, Target::Health) => Ok("ok".into_response()),
        (_, Target::Unknown) => Err(Status::path_not_found()),
        _ => Err(Status::method_not_allowed()),
    }
}

fn not_found(key: &Key) -> Status {
    Status::not_found(key.kind.group_resource(), &key.name)
}

/// `POST .../events`: an events.k8s.io Event, named by the client, in the request's namespace.
fn create_event(cluster: &Cluster, namespace: &str, incoming: &Incoming) -> Reply {
    let event = body_value(incoming)?;
    let name = event["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    if name.is_empty() {
        return Err(Status::invalid_event("metadata.name: Required value: name or generateName is required"));
    }
    if let Some(other) = event["metadata"]["namespace"].as_str()
        && other != namespace
    {
        return Err(Status::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    for field in ["reportingController", "reportingInstance", "action", "reason", "eventTime"] {
        if event[field].as_str().is_none_or(str::is_empty) {
            return Err(Status::invalid_event(&format!("{field}: Required value")));
        }
    }
    let created =
        cluster.store().create_event(namespace, event).ok_or_else(|| Status::already_exists(EVENTS, &name))?;
    Ok(json_response(StatusCode::CREATED, &created))
}

/// A list of HPAs or ScaledObjects. Items of a built-in kind lose their `kind` and
/// `apiVersion` in a list, as the real server writes them; custom resources keep theirs.
fn list_autoscalers(cluster: &Cluster, kind: AutoscalerKind, namespace: &str, incoming: &Incoming) -> Reply {
    if incoming.request.query.watch {
        return Err(Status::bad_request(format!(
            "the test API server does not watch {}",
            kind.group_resource().resource
        )));
    }
    let store = cluster.store();
    let items: Vec<Value> = store
        .autoscalers(kind, namespace)
        .into_iter()
        .map(|o| {
            let mut item = o.clone();
            if !kind.is_custom()
                && let Some(map) = item.as_object_mut()
            {
                map.remove("kind");
                map.remove("apiVersion");
            }
            item
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.kind()),
            "apiVersion": kind.api_version(),
            "metadata": {"resourceVersion": store.resource_version().to_string()},
            "items": items,
        }),
    ))
}

/// PATCH on an HPA or ScaledObject: JSON merge patch or JSON patch (a custom resource takes no
/// strategic merge); the name and the server's fields cannot change.
fn patch_autoscaler(
    cluster: &Cluster,
    kind: AutoscalerKind,
    namespace: &str,
    name: &str,
    incoming: &Incoming,
) -> Reply {
    let refused = if kind.is_custom() { Status::unsupported_custom_patch_type } else { Status::unsupported_patch_type };
    let patch_kind = PatchType::from_content_type(incoming.content_type.as_deref()).ok_or_else(refused)?;
    if kind.is_custom() && patch_kind == PatchType::StrategicMerge {
        return Err(Status::unsupported_custom_patch_type());
    }
    let mut store = cluster.store();
    let mut doc = store
        .autoscaler(kind, namespace, name)
        .cloned()
        .ok_or_else(|| Status::not_found(kind.group_resource(), name))?;
    patch::apply(patch_kind, &mut doc, &incoming.body).map_err(|e| Status::bad_request(e.to_string()))?;
    if incoming.request.query.dry_run {
        return Ok(json_response(StatusCode::OK, &doc));
    }
    let written = store.write_autoscaler(kind, namespace, name, doc)?;
    Ok(json_response(StatusCode::OK, &written))
}

fn json_response(code: StatusCode, body: &impl Serialize) -> Response {
    (code, axum::Json(body)).into_response()
}

fn filter(namespace: Option<String>, query: &Query) -> Result<Filter, Status> {
    Ok(Filter {
        namespace,
        fields: FieldSelector::parse(&query.field_selector).map_err(Status::bad_request)?,
        labels: LabelSelector::parse(&query.label_selector).map_err(Status::bad_request)?,
    })
}

/// A `DeploymentList` or `StatefulSetList`, fields in the real order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct List {
    kind: String,
    api_version: &'static str,
    metadata: ListMeta,
    items: Vec<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    resource_version: String,
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    continue_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining_item_count: Option<usize>,
}

fn list(cluster: &Cluster, kind: WorkloadKind, filter: &Filter, query: &Query) -> Reply {
    let store = cluster.store();
    let objects = store.list(kind, filter);
    let skip = match &query.continue_token {
        None => 0,
        Some(token) => {
            let after = decode_continue(token)
                .ok_or_else(|| Status::bad_request(format!("continue key is not valid: {token}")))?;
            objects.iter().position(|o| continue_key(o) > after).unwrap_or(objects.len())
        }
    };
    let rest = &objects[skip..];
    let take = query.limit.unwrap_or(rest.len()).min(rest.len());
    let page = &rest[..take];
    let more = rest.len() - take;
    let body = List {
        kind: format!("{}List", kind.kind()),
        api_version: "apps/v1",
        metadata: ListMeta {
            resource_version: store.resource_version().to_string(),
            continue_token: (more > 0).then(|| page.last().map(|o| encode_continue(&continue_key(o)))).flatten(),
            remaining_item_count: (more > 0).then_some(more),
        },
        items: page.iter().map(|o| o.to_list_item()).collect(),
    };
    Ok(json_response(StatusCode::OK, &body))
}

fn continue_key(object: &Workload) -> String {
    let namespace = object.meta().namespace.as_deref().unwrap_or_default();
    format!("{namespace}/{}", object.name())
}

fn encode_continue(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<String> {
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

/// Reads a PUT or POST body, which may be JSON or YAML.
fn body_value(incoming: &Incoming) -> Result<Value, Status> {
    let media = incoming.content_type.as_deref().and_then(|c| c.split(';').next()).map(str::trim);
    match media {
        Some("application/json") | None => {
            serde_json::from_slice(&incoming.body).map_err(|e| Status::bad_request(format!("error decoding body: {e}")))
        }
        Some("application/yaml") => {
            serde_yaml::from_slice(&incoming.body).map_err(|e| Status::bad_request(format!("error decoding body: {e}")))
        }
        Some(_) => Err(Status::unsupported_body_type()),
    }
}

/// 409 if `doc` carries a resourceVersion other than `current`'s.
fn precondition(doc: &Value, current: &Workload, key: &Key) -> Result<(), Status> {
    let wanted = doc.pointer("/metadata/resourceVersion").and_then(Value::as_str);
    match wanted {
        Some(rv) if !rv.is_empty() && Some(rv) != current.meta().resource_version.as_deref() => {
            Err(Status::conflict(key.kind.group_resource(), &key.name))
        }
        _ => Ok(()),
    }
}

fn patch_object(cluster: &Cluster, key: &Key, incoming: &Incoming) -> Reply {
    let kind =
        PatchType::from_content_type(incoming.content_type.as_deref()).ok_or_else(Status::unsupported_patch_type)?;
    let written = {
        let mut store = cluster.store();
        let current = store.get(key).ok_or_else(|| not_found(key))?;
        let mut doc = current.to_value();
        patch::apply(kind, &mut doc, &incoming.body).map_err(|e| Status::bad_request(e.to_string()))?;
        precondition(&doc, current, key)?;
        let candidate = Workload::from_value(key.kind, doc).map_err(Status::bad_request)?;
        let write = Write {
            manager: &incoming.manager,
            subresource: None,
            fields: patch::touched_fields(kind, &incoming.body),
            dry_run: incoming.request.query.dry_run,
        };
        store.write(key, candidate, write)?
    };
    cluster.wake_controller();
    Ok(json_response(StatusCode::OK, &written))
}

fn replace_object(cluster: &Cluster, key: &Key, incoming: &Incoming) -> Reply {
    let doc = body_value(incoming)?;
    check_name(&doc, key)?;
    let written = {
        let mut store = cluster.store();
        let current = store.get(key).ok_or_else(|| not_found(key))?;
        precondition(&doc, current, key)?;
        let mut fields_of = doc.clone();
        if let Some(map) = fields_of.as_object_mut() {
            map.retain(|k, _| k == "spec" || k == "metadata");
        }
        if let Some(meta) = fields_of.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|k, _| k == "labels" || k == "annotations");
        }
        let candidate = Workload::from_value(key.kind, doc).map_err(Status::bad_request)?;
        let write = Write {
            manager: &incoming.manager,
            subresource: None,
            fields: patch::fields_v1(&fields_of),
            dry_run: incoming.request.query.dry_run,
        };
        store.write(key, candidate, write)?
    };
    cluster.wake_controller();
    Ok(json_response(StatusCode::OK, &written))
}

/// `checkName`: a PUT body names the object on the URL, and its namespace if it names one.
fn check_name(doc: &Value, key: &Key) -> Result<(), Status> {
    let field = |f: &str| doc.pointer(&format!("/metadata/{f}")).and_then(Value::as_str).unwrap_or_default().to_owned();
    let (name, namespace) = (field("name"), field("namespace"));
    if name != key.name {
        return Err(Status::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            key.name
        )));
    }
    if !namespace.is_empty() && namespace != key.namespace {
        return Err(Status::bad_request(format!(
            "the namespace of the object ({namespace}) does not match the namespace on the URL ({})",
            key.namespace
        )));
    }
    Ok(())
}

/// PATCH or PUT on `/scale`: only `spec.replicas` (and a resourceVersion precondition) count.
fn write_scale(cluster: &Cluster, key: &Key, incoming: &Incoming) -> Reply {
    let patch_kind = if incoming.method == Method::PATCH {
        Some(
            PatchType::from_content_type(incoming.content_type.as_deref())
                .ok_or_else(Status::unsupported_patch_type)?,
        )
    } else {
        None
    };
    let put_body = match patch_kind {
        Some(_) => None,
        None => {
            let doc = body_value(incoming)?;
            check_name(&doc, key)?;
            Some(doc)
        }
    };
    let written = {
        let mut store = cluster.store();
        let current = store.get(key).ok_or_else(|| not_found(key))?;
        let doc = match (patch_kind, put_body) {
            (Some(kind), _) => {
                let mut doc = current.scale().to_value();
                patch::apply(kind, &mut doc, &incoming.body).map_err(|e| Status::bad_request(e.to_string()))?;
                doc
            }
            (None, doc) => doc.unwrap_or_default(),
        };
        precondition(&doc, current, key)?;
        let replicas = scale_replicas(&doc, &key.name)?;
        let mut candidate = current.clone();
        candidate.set_spec_replicas(replicas);
        let write = Write {
            manager: &incoming.manager,
            subresource: Some("scale"),
            fields: json!({"f:spec": {"f:replicas": {}}}),
            dry_run: incoming.request.query.dry_run,
        };
        store.write(key, candidate, write)?
    };
    cluster.wake_controller();
    Ok(json_response(StatusCode::OK, &written.scale()))
}

/// `spec.replicas` of a Scale document: missing is 0, negative is 422, non-integer is 400.
fn scale_replicas(doc: &Value, name: &str) -> Result<i32, Status> {
    serde_json::from_value::<k8s_openapi::api::autoscaling::v1::Scale>(doc.clone())
        .map_err(|e| Status::bad_request(format!("Scale in version \"v1\" cannot be handled as a Scale: {e}")))?;
    let replicas = match doc.pointer("/spec/replicas") {
        None | Some(Value::Null) => 0,
        Some(value) => value.as_i64().unwrap_or_default(),
    };
    if replicas < 0 {
        return Err(Status::invalid_replicas("autoscaling", "Scale", name, replicas));
    }
    i32::try_from(replicas).map_err(|_| Status::bad_request("spec.replicas is out of range"))
}

/// `POST selfsubjectaccessreviews`: any authenticated user may ask, and gets 201.
fn access_review(rules: Option<&[rbac::RbacRule]>, incoming: &Incoming) -> Reply {
    let review = body_value(incoming)?;
    let spec = review.get("spec").cloned().unwrap_or_default();
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let decision = match (spec.get("resourceAttributes"), spec.get("nonResourceAttributes")) {
        (Some(ra), None) => rbac::authorize(
            rules,
            &Attributes {
                verb: text(ra, "verb"),
                group: text(ra, "group"),
                resource: text(ra, "resource"),
                subresource: text(ra, "subresource"),
                namespace: text(ra, "namespace"),
                name: text(ra, "name"),
            },
        ),
        (None, Some(nra)) => rbac::authorize_path(rules, &text(nra, "verb"), &text(nra, "path")),
        _ => {
            return Err(Status::invalid(
                "authorization.k8s.io",
                "SelfSubjectAccessReview",
                "",
                "spec.resourceAttributes",
                "Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified"
                    .to_owned(),
            ));
        }
    };
    let mut status = json!({"allowed": decision.allowed});
    if let Some(reason) = decision.reason {
        status["reason"] = Value::String(reason);
    }
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": status,
        }),
    ))
}

fn discovery(document: Discovery) -> Response {
    let workload = |plural: &str, singular: &str, kind: &str, short: &str| {
        [
            json!({
                "name": plural, "singularName": singular, "namespaced": true, "kind": kind,
                "verbs": ["get", "list", "patch", "update", "watch"],
                "shortNames": [short], "categories": ["all"]
            }),
            json!({
                "name": format!("{plural}/scale"), "singularName": "", "namespaced": true,
                "group": "autoscaling", "version": "v1", "kind": "Scale",
                "verbs": ["get", "patch", "update"]
            }),
        ]
    };
    let group = |name: &str| {
        json!({
            "name": name,
            "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}],
            "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}
        })
    };
    let body = match document {
        Discovery::Version => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-test-apiserver",
            "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
            "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc",
            "platform": "linux/amd64"
        }),
        Discovery::Api => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
        }),
        Discovery::Apis => json!({
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [group("apps"), group("authorization.k8s.io")]
        }),
        Discovery::AppsV1 => {
            let mut resources = workload("deployments", "deployment", "Deployment", "deploy").to_vec();
            resources.extend(workload("statefulsets", "statefulset", "StatefulSet", "sts"));
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": resources})
        }
        Discovery::AuthorizationV1 => json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authorization.k8s.io/v1",
            "resources": [{
                "name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview",
                "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]
            }]
        }),
    };
    json_response(StatusCode::OK, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let token = encode_continue("apps/web");
        assert_eq!(decode_continue(&token).as_deref(), Some("apps/web"));
        assert_eq!(decode_continue("zz"), None);
    }

    #[test]
    fn a_scale_without_replicas_means_zero_and_negative_is_invalid() {
        assert_eq!(scale_replicas(&json!({"spec": {}}), "web").ok(), Some(0));
        let invalid = scale_replicas(&json!({"spec": {"replicas": -2}}), "web").unwrap_err();
        assert_eq!(invalid.code(), 422);
        let wrong = scale_replicas(&json!({"spec": {"replicas": "2"}}), "web").unwrap_err();
        assert_eq!(wrong.code(), 400);
    }
}
