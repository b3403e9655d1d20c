//! Reads a method, path and query into what the request targets and the authorizer's view of
//! it, as the real server's `RequestInfoFactory` does.

use crate::autoscalers::AutoscalerKind;
use crate::rbac::Attributes;
use crate::selector::FieldSelector;
use crate::status::{GroupResource, Refused};
use crate::workload::WorkloadKind;

/// events.k8s.io Events, the one kind outside `apps` the server stores.
pub(crate) const EVENTS: GroupResource = GroupResource { group: "events.k8s.io", resource: "events" };

/// What a path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `/apis/apps/v1[/namespaces/{ns}]/{plural}`
    Collection { kind: WorkloadKind, namespace: Option<String> },
    /// `/apis/apps/v1/namespaces/{ns}/{plural}/{name}`
    Object { kind: WorkloadKind, namespace: String, name: String },
    /// `/apis/apps/v1/namespaces/{ns}/{plural}/{name}/scale`
    Scale { kind: WorkloadKind, namespace: String, name: String },
    /// `/apis/authorization.k8s.io/v1/selfsubjectaccessreviews`
    AccessReview,
    /// `/apis/events.k8s.io/v1/namespaces/{ns}/events`
    Events { namespace: String },
    /// `/apis/autoscaling/v2/namespaces/{ns}/horizontalpodautoscalers`, or KEDA's
    /// `/apis/keda.sh/v1alpha1/namespaces/{ns}/scaledobjects`.
    Autoscalers { kind: AutoscalerKind, namespace: String },
    /// One of those by name.
    Autoscaler { kind: AutoscalerKind, namespace: String, name: String },
    /// `/version`, `/api`, `/apis` and the served group versions.
    Discovery(Discovery),
    /// `/healthz`, `/livez`, `/readyz`.
    Health,
    /// Anything else: 404.
    Unknown,
}

/// A discovery document the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Discovery {
    Version,
    Api,
    Apis,
    AppsV1,
    AuthorizationV1,
}

/// The query parameters the API understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Query {
    pub watch: bool,
    pub resource_version: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub allow_watch_bookmarks: bool,
    pub send_initial_events: bool,
    pub field_selector: String,
    pub label_selector: String,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub field_manager: Option<String>,
    pub dry_run: bool,
}

impl Query {
    pub(crate) fn parse(raw: &str) -> Self {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw).unwrap_or_default();
        let mut query = Self::default();
        for (key, value) in pairs {
            let flag = matches!(value.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True");
            match key.as_str() {
                "watch" => query.watch = flag,
                "resourceVersion" if !value.is_empty() => query.resource_version = Some(value),
                "timeoutSeconds" => query.timeout_seconds = value.parse().ok(),
                "allowWatchBookmarks" => query.allow_watch_bookmarks = flag,
                "sendInitialEvents" => query.send_initial_events = flag,
                "fieldSelector" => query.field_selector = value,
                "labelSelector" => query.label_selector = value,
                "limit" => query.limit = value.parse().ok().filter(|l| *l > 0),
                "continue" if !value.is_empty() => query.continue_token = Some(value),
                "fieldManager" => query.field_manager = Some(value),
                "dryRun" => query.dry_run = value == "All",
                _ => {}
            }
        }
        query
    }
}

/// A parsed API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiRequest {
    pub target: Target,
    pub verb: &'static str,
    pub query: Query,
    pub path: String,
}

impl ApiRequest {
    pub(crate) fn parse(method: &str, path: &str, raw_query: &str) -> Self {
        let query = Query::parse(raw_query);
        let target = target(path);
        let verb = match (method, &target) {
            ("GET" | "HEAD", Target::Collection { .. } | Target::Autoscalers { .. }) if query.watch => "watch",
            ("GET" | "HEAD", Target::Collection { .. } | Target::Autoscalers { .. }) => "list",
            ("GET" | "HEAD", _) => "get",
            ("PATCH", _) => "patch",
            ("PUT", _) => "update",
            ("POST", _) => "create",
            ("DELETE", Target::Collection { .. }) => "deletecollection",
            ("DELETE", _) => "delete",
            _ => "unknown",
        };
        Self { target, verb, query, path: path.to_owned() }
    }

    /// The authorizer attributes of a workload request; `None` for everything else.
    pub(crate) fn attributes(&self) -> Option<Attributes> {
        let (kind, namespace, name, subresource) = match &self.target {
            Target::Collection { kind, namespace } => {
                let pinned = FieldSelector::parse(&self.query.field_selector)
                    .ok()
                    .and_then(|s| s.exact_name().map(str::to_owned));
                (*kind, namespace.clone().unwrap_or_default(), pinned.unwrap_or_default(), "")
            }
            Target::Object { kind, namespace, name } => (*kind, namespace.clone(), name.clone(), ""),
            Target::Scale { kind, namespace, name } => (*kind, namespace.clone(), name.clone(), "scale"),
            Target::Autoscalers { kind, namespace } | Target::Autoscaler { kind, namespace, .. } => {
                let name = match &self.target {
                    Target::Autoscaler { name, .. } => name.clone(),
                    _ => String::new(),
                };
                let resource = kind.group_resource();
                return Some(Attributes {
                    verb: self.verb.to_owned(),
                    group: resource.group.to_owned(),
                    resource: resource.resource.to_owned(),
                    namespace: namespace.clone(),
                    name,
                    ..Attributes::default()
                });
            }
            Target::Events { namespace } => {
                return Some(Attributes {
                    verb: self.verb.to_owned(),
                    group: EVENTS.group.to_owned(),
                    resource: EVENTS.resource.to_owned(),
                    namespace: namespace.clone(),
                    ..Attributes::default()
                });
            }
            _ => return None,
        };
        Some(Attributes {
            verb: self.verb.to_owned(),
            group: "apps".to_owned(),
            resource: kind.plural().to_owned(),
            subresource: subresource.to_owned(),
            namespace,
            name,
        })
    }

    /// What a 403 (or an injected fault) for this request names.
    pub(crate) fn refused<'a>(&'a self, attributes: Option<&'a Attributes>) -> Refused<'a> {
        let resource = match &self.target {
            Target::Collection { kind, .. } | Target::Object { kind, .. } | Target::Scale { kind, .. } => {
                Some(kind.group_resource())
            }
            Target::AccessReview => {
                Some(GroupResource { group: "authorization.k8s.io", resource: "selfsubjectaccessreviews" })
            }
            Target::Events { .. } => Some(EVENTS),
            Target::Autoscalers { kind, .. } | Target::Autoscaler { kind, .. } => Some(kind.group_resource()),
            _ => None,
        };
        Refused {
            verb: self.verb,
            resource,
            subresource: attributes.map_or("", |a| a.subresource.as_str()),
            namespace: attributes.map_or("", |a| a.namespace.as_str()),
            name: attributes.map_or("", |a| a.name.as_str()),
            path: &self.path,
        }
    }
}

fn target(path: &str) -> Target {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["version"] => Target::Discovery(Discovery::Version),
        ["api"] => Target::Discovery(Discovery::Api),
        ["apis"] => Target::Discovery(Discovery::Apis),
        ["apis", "apps", "v1"] => Target::Discovery(Discovery::AppsV1),
        ["apis", "authorization.k8s.io", "v1"] => Target::Discovery(Discovery::AuthorizationV1),
        ["healthz" | "livez" | "readyz"] => Target::Health,
        ["apis", "authorization.k8s.io", "v1", "selfsubjectaccessreviews"] => Target::AccessReview,
        ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"] if !ns.is_empty() => {
            Target::Events { namespace: (*ns).to_owned() }
        }
        ["apis", group, version, "namespaces", ns, plural, rest @ ..]
            if !ns.is_empty() && AutoscalerKind::from_path(group, version, plural).is_some() =>
        {
            let kind = AutoscalerKind::from_path(group, version, plural).unwrap_or(AutoscalerKind::Hpa);
            let namespace = (*ns).to_owned();
            match rest {
                [] => Target::Autoscalers { kind, namespace },
                [name] if !name.is_empty() => Target::Autoscaler { kind, namespace, name: (*name).to_owned() },
                _ => Target::Unknown,
            }
        }
        ["apis", "apps", "v1", plural] => WorkloadKind::from_plural(plural)
            .map_or(Target::Unknown, |kind| Target::Collection { kind, namespace: None }),
        ["apis", "apps", "v1", "namespaces", ns, plural, rest @ ..] if !ns.is_empty() => {
            let Some(kind) = WorkloadKind::from_plural(plural) else {
                return Target::Unknown;
            };
            let namespace = (*ns).to_owned();
            match rest {
                [] => Target::Collection { kind, namespace: Some(namespace) },
                [name] if !name.is_empty() => Target::Object { kind, namespace, name: (*name).to_owned() },
                [name, "scale"] if !name.is_empty() => Target::Scale { kind, namespace, name: (*name).to_owned() },
                _ => Target::Unknown,
            }
        }
        _ => Target::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_patch_is_a_patch_on_the_scale_subresource() {
        let request = ApiRequest::parse(
            "PATCH",
            "/apis/apps/v1/namespaces/bots/deployments/web/scale",
            "fieldManager=matrix-k8s-toggle",
        );
        let attributes = request.attributes().unwrap();
        assert_eq!(attributes.verb, "patch");
        assert_eq!(attributes.subresource, "scale");
        assert_eq!(attributes.name, "web");
        assert_eq!(request.query.field_manager.as_deref(), Some("matrix-k8s-toggle"));
    }

    #[test]
    fn a_watch_pinned_by_field_selector_is_authorized_by_name() {
        let request = ApiRequest::parse(
            "GET",
            "/apis/apps/v1/namespaces/bots/statefulsets",
            "watch=true&fieldSelector=metadata.name%3Ddb&resourceVersion=5&timeoutSeconds=10",
        );
        let attributes = request.attributes().unwrap();
        assert_eq!((attributes.verb.as_str(), attributes.name.as_str()), ("watch", "db"));
        assert_eq!(request.query.resource_version.as_deref(), Some("5"));
        assert_eq!(request.query.timeout_seconds, Some(10));
    }

    #[test]
    fn creating_an_event_is_authorized_as_create_on_events_in_its_group() {
        let request = ApiRequest::parse("POST", "/apis/events.k8s.io/v1/namespaces/bots/events", "");
        let attributes = request.attributes().unwrap();
        assert_eq!(
            (attributes.verb.as_str(), attributes.group.as_str(), attributes.resource.as_str()),
            ("create", "events.k8s.io", "events")
        );
        assert_eq!(attributes.namespace, "bots");
    }

    #[test]
    fn autoscalers_are_authorized_in_their_own_groups_and_by_name_when_named() {
        let list = ApiRequest::parse("GET", "/apis/autoscaling/v2/namespaces/bots/horizontalpodautoscalers", "");
        let attributes = list.attributes().unwrap();
        assert_eq!(
            (
                attributes.verb.as_str(),
                attributes.group.as_str(),
                attributes.resource.as_str(),
                attributes.name.as_str()
            ),
            ("list", "autoscaling", "horizontalpodautoscalers", "")
        );
        let patch = ApiRequest::parse("PATCH", "/apis/keda.sh/v1alpha1/namespaces/bots/scaledobjects/worker", "");
        let attributes = patch.attributes().unwrap();
        assert_eq!(
            (
                attributes.verb.as_str(),
                attributes.group.as_str(),
                attributes.resource.as_str(),
                attributes.name.as_str()
            ),
            ("patch", "keda.sh", "scaledobjects", "worker")
        );
        let old = ApiRequest::parse("GET", "/apis/autoscaling/v1/namespaces/bots/horizontalpodautoscalers", "");
        assert_eq!(old.target, Target::Unknown, "only autoscaling/v2 is served");
    }

    #[test]
    fn unknown_resources_and_core_paths_are_unknown() {
        for path in [
            "/apis/apps/v1/namespaces/a/replicasets",
            "/api/v1/namespaces/a/pods",
            "/apis/apps/v1/namespaces/a/deployments/b/status",
        ] {
            assert_eq!(ApiRequest::parse("GET", path, "").target, Target::Unknown);
        }
    }
}
