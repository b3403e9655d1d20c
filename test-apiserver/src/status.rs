//! `metav1.Status` failure bodies, built the way `k8s.io/apimachinery/pkg/api/errors` builds them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The user every authenticated request runs as.
pub const USER: &str = "system:serviceaccount:toggle:matrix-k8s-toggle";

/// Patch content types a built-in resource accepts, in the order the real server lists them.
const PATCH_MEDIA_TYPES: &str = "application/json-patch+json, application/merge-patch+json, \
     application/strategic-merge-patch+json, application/apply-patch+yaml";

/// Body content types a built-in resource accepts for PUT and POST.
const BODY_MEDIA_TYPES: &str = "application/json, application/yaml, application/vnd.kubernetes.protobuf";

/// A `kind: Status` failure body and the HTTP status it travels with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Status {
    kind: &'static str,
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Box<Details>>,
    code: u16,
}

/// The always-empty `metadata: {}` of a Status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Empty {}

/// `metav1.StatusDetails`, each field omitted when empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Details {
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    group: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    causes: Vec<Cause>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u32>,
}

/// `metav1.StatusCause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Cause {
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'static str,
    message: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    field: &'static str,
}

/// A group and resource, such as `deployments.apps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupResource {
    pub group: &'static str,
    pub resource: &'static str,
}

impl GroupResource {
    fn qualified(self) -> String {
        if self.group.is_empty() { self.resource.to_owned() } else { format!("{}.{}", self.resource, self.group) }
    }

    fn details(self, name: &str) -> Details {
        Details { name: name.to_owned(), group: self.group, kind: self.resource.to_owned(), ..Details::default() }
    }
}

/// What a 403 names: the verb and resource (or path) that was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused<'a> {
    pub verb: &'a str,
    pub resource: Option<GroupResource>,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub path: &'a str,
}

impl Status {
    fn failure(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message,
            reason,
            details: None,
            code,
        }
    }

    fn with_details(mut self, details: Details) -> Self {
        self.details = Some(Box::new(details));
        self
    }

    /// The HTTP status code this body is sent with.
    pub(crate) fn code(&self) -> u16 {
        self.code
    }

    /// 404 for a named object that does not exist.
    pub(crate) fn not_found(resource: GroupResource, name: &str) -> Self {
        Self::failure(404, "NotFound", format!("{} \"{name}\" not found", resource.qualified()))
            .with_details(resource.details(name))
    }

    /// 404 for a path the server does not serve.
    pub(crate) fn path_not_found() -> Self {
        Self::failure(404, "NotFound", "the server could not find the requested resource".to_owned())
            .with_details(Details::default())
    }

    /// 401 for a missing or wrong bearer token.
    pub(crate) fn unauthorized() -> Self {
        Self::failure(401, "Unauthorized", "Unauthorized".to_owned())
    }

    /// 403 as the RBAC authorizer's refusal is written by `responsewriters.Forbidden`.
    pub(crate) fn forbidden(refused: &Refused<'_>) -> Self {
        let Some(resource) = refused.resource else {
            return Self::failure(
                403,
                "Forbidden",
                format!("forbidden: User \"{USER}\" cannot {} path \"{}\"", refused.verb, refused.path),
            )
            .with_details(Details::default());
        };
        let full = if refused.subresource.is_empty() {
            resource.resource.to_owned()
        } else {
            format!("{}/{}", resource.resource, refused.subresource)
        };
        let scope = if refused.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace \"{}\"", refused.namespace)
        };
        let why = format!(
            "User \"{USER}\" cannot {} resource \"{full}\" in API group \"{}\" {scope}",
            refused.verb, resource.group
        );
        let message = if refused.name.is_empty() {
            format!("{} is forbidden: {why}", resource.qualified())
        } else {
            format!("{} \"{}\" is forbidden: {why}", resource.qualified(), refused.name)
        };
        Self::failure(403, "Forbidden", message).with_details(resource.details(refused.name))
    }

    /// 409 for a create whose name is taken.
    pub(crate) fn already_exists(resource: GroupResource, name: &str) -> Self {
        Self::failure(409, "AlreadyExists", format!("{} \"{name}\" already exists", resource.qualified()))
            .with_details(resource.details(name))
    }

    /// 422 for an Event missing a required field.
    pub(crate) fn invalid_event(cause: &str) -> Self {
        Self::failure(422, "Invalid", format!("Event.events.k8s.io is invalid: {cause}"))
    }

    /// 409 for a write that carried a stale `metadata.resourceVersion`.
    pub(crate) fn conflict(resource: GroupResource, name: &str) -> Self {
        Self::failure(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                resource.qualified()
            ),
        )
        .with_details(resource.details(name))
    }

    /// 422 for a negative `spec.replicas`; `kind` is e.g. `Scale` in group `autoscaling`.
    pub(crate) fn invalid_replicas(group: &'static str, kind: &'static str, name: &str, replicas: i64) -> Self {
        Self::invalid(
            group,
            kind,
            name,
            "spec.replicas",
            format!("Invalid value: {replicas}: must be greater than or equal to 0"),
        )
    }

    /// 422 `Invalid` with one `FieldValueInvalid` cause, as `NewInvalid` builds it.
    pub(crate) fn invalid(
        group: &'static str,
        kind: &'static str,
        name: &str,
        field: &'static str,
        cause: String,
    ) -> Self {
        Self::failure(422, "Invalid", format!("{kind}.{group} \"{name}\" is invalid: {field}: {cause}")).with_details(
            Details {
                name: name.to_owned(),
                group,
                kind: kind.to_owned(),
                causes: vec![Cause { reason: "FieldValueInvalid", message: cause, field }],
                ..Details::default()
            },
        )
    }

    /// 415 for a PATCH whose content type is not a patch format.
    pub(crate) fn unsupported_patch_type() -> Self {
        Self::failure(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {PATCH_MEDIA_TYPES}"
            ),
        )
    }

    /// 415 for a PATCH on a custom resource with a content type it does not take: CRDs have
    /// no strategic merge.
    pub(crate) fn unsupported_custom_patch_type() -> Self {
        Self::failure(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: \
             application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                .to_owned(),
        )
    }

    /// 415 for a PUT or POST whose content type is not JSON or YAML.
    pub(crate) fn unsupported_body_type() -> Self {
        Self::failure(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {BODY_MEDIA_TYPES}"
            ),
        )
    }

    /// 400 with a message.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::failure(400, "BadRequest", message.into())
    }

    /// 405 for a method the path does not serve.
    pub(crate) fn method_not_allowed() -> Self {
        Self::failure(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource".to_owned(),
        )
        .with_details(Details::default())
    }

    /// 410, sent inside a watch stream for a resourceVersion that was compacted away.
    pub(crate) fn expired(requested: u64, oldest: u64) -> Self {
        Self::failure(410, "Expired", format!("too old resource version: {requested} ({oldest})"))
    }

    /// 429 as the storage layer's `NewTooManyRequests`.
    pub(crate) fn too_many_requests() -> Self {
        Self::failure(429, "TooManyRequests", "Too many requests, please try again later.".to_owned())
            .with_details(Details { retry_after_seconds: Some(1), ..Details::default() })
    }

    /// 500 as `NewInternalError`.
    pub(crate) fn internal(cause: &str) -> Self {
        Self::failure(500, "InternalError", format!("Internal error occurred: {cause}")).with_details(Details {
            causes: vec![Cause { reason: "", message: cause.to_owned(), field: "" }],
            ..Details::default()
        })
    }

    /// 503 as `NewServiceUnavailable`.
    pub(crate) fn service_unavailable() -> Self {
        Self::failure(503, "ServiceUnavailable", "the server is currently unable to handle the request".to_owned())
    }

    /// 504 as `NewTimeoutError`.
    pub(crate) fn timeout() -> Self {
        Self::failure(504, "Timeout", "Timeout: request did not complete within the allotted timeout".to_owned())
            .with_details(Details { retry_after_seconds: Some(1), ..Details::default() })
    }

    /// A body for an injected fault of any code.
    pub(crate) fn for_code(code: u16, refused: &Refused<'_>) -> Self {
        let name = refused.name;
        match (code, refused.resource) {
            (401, _) => Self::unauthorized(),
            (403, _) => Self::forbidden(refused),
            (404, Some(resource)) => Self::not_found(resource, name),
            (404, None) => Self::path_not_found(),
            (409, Some(resource)) => Self::conflict(resource, name),
            (410, _) => Self::expired(0, 0),
            (429, _) => Self::too_many_requests(),
            (500, _) => Self::internal("injected fault"),
            (503, _) => Self::service_unavailable(),
            (504, _) => Self::timeout(),
            (400, _) => Self::bad_request("injected fault"),
            _ => Self::failure(code, "", format!("injected fault {code}")),
        }
    }

    /// The body as a JSON value.
    #[cfg(test)]
    pub(crate) fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

impl IntoResponse for Status {
    fn into_response(self) -> Response {
        tracing::debug!(code = self.code(), reason = self.reason, message = %self.message, "failure status");
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = matches!(self.code, 429 | 503);
        let mut response = (code, axum::Json(self)).into_response();
        if retry {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const DEPLOYMENTS: GroupResource = GroupResource { group: "apps", resource: "deployments" };

    #[test]
    fn not_found_matches_the_real_body() {
        assert_eq!(
            serde_json::to_string(&Status::not_found(DEPLOYMENTS, "nope")).unwrap(),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"deployments.apps \"nope\" not found","reason":"NotFound","details":{"name":"nope","group":"apps","kind":"deployments"},"code":404}"#
        );
    }

    #[test]
    fn forbidden_on_a_subresource_names_it_and_the_namespace() {
        let refused = Refused {
            verb: "patch",
            resource: Some(DEPLOYMENTS),
            subresource: "scale",
            namespace: "clawdbot",
            name: "clawdbot",
            path: "",
        };
        assert_eq!(
            Status::forbidden(&refused).to_json()["message"],
            json!(
                "deployments.apps \"clawdbot\" is forbidden: User \"system:serviceaccount:toggle:matrix-k8s-toggle\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"clawdbot\""
            )
        );
    }

    #[test]
    fn forbidden_list_at_cluster_scope_has_no_name() {
        let refused =
            Refused { verb: "list", resource: Some(DEPLOYMENTS), subresource: "", namespace: "", name: "", path: "" };
        let body = Status::forbidden(&refused).to_json();
        assert_eq!(
            body["message"],
            json!(
                "deployments.apps is forbidden: User \"system:serviceaccount:toggle:matrix-k8s-toggle\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
            )
        );
        assert_eq!(body["details"], json!({"group": "apps", "kind": "deployments"}));
    }

    #[test]
    fn invalid_replicas_carries_a_field_cause() {
        assert_eq!(
            Status::invalid_replicas("autoscaling", "Scale", "web", -1).to_json(),
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Scale.autoscaling \"web\" is invalid: spec.replicas: Invalid value: -1: must be greater than or equal to 0",
                "reason": "Invalid",
                "details": {"name": "web", "group": "autoscaling", "kind": "Scale", "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: -1: must be greater than or equal to 0",
                    "field": "spec.replicas"
                }]},
                "code": 422
            })
        );
    }
}
