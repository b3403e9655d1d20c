//! The RBAC table: which (verb, resource, namespace, name) the test user may touch. It decides
//! both 403s and SelfSubjectAccessReview answers.

use serde::{Deserialize, Serialize};

use crate::status::USER;

/// One allowed combination in an API group (`apps` unless named); `"*"` matches any verb,
/// resource or namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbacRule {
    /// The API group, e.g. `apps` or `events.k8s.io`.
    #[serde(default = "apps")]
    pub group: String,
    /// `get`, `list`, `watch`, `patch`, `update`, or `*`.
    pub verb: String,
    /// A resource with its subresource, e.g. `deployments/scale`, or `*`.
    pub resource: String,
    /// A namespace, or `*` for every namespace and the cluster scope.
    pub namespace: String,
    /// Limits the rule to one object, as `resourceNames` does (list and watch match only when a
    /// `metadata.name` field selector pins that object).
    #[serde(default)]
    pub name: Option<String>,
}

impl RbacRule {
    /// A rule for every object of `resource` in `namespace`.
    pub fn new(verb: &str, resource: &str, namespace: &str) -> Self {
        Self {
            group: "apps".to_owned(),
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            namespace: namespace.to_owned(),
            name: None,
        }
    }

    /// The same rule in API group `group`.
    pub fn in_group(mut self, group: &str) -> Self {
        self.group = group.to_owned();
        self
    }

    /// The same rule limited to the object `name`.
    pub fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    fn allows(&self, request: &Attributes) -> bool {
        let any = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        any(&self.verb, &request.verb)
            && (self.resource == "*" || request.group == self.group)
            && any(&self.resource, &request.full_resource())
            && any(&self.namespace, &request.namespace)
            && self.name.as_ref().is_none_or(|n| !request.name.is_empty() && *n == request.name)
    }
}

fn apps() -> String {
    "apps".to_owned()
}

/// What a resource request asks to do, as the authorizer sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Attributes {
    fn full_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

/// An authorizer decision and the reason SelfSubjectAccessReview reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub allowed: bool,
    pub reason: Option<String>,
}

/// Decides a request against the table; `None` allows everything.
pub(crate) fn authorize(rules: Option<&[RbacRule]>, request: &Attributes) -> Decision {
    let account = USER.strip_prefix("system:serviceaccount:").unwrap_or(USER).replacen(':', "/", 1);
    let Some(rules) = rules else {
        return Decision {
            allowed: true,
            reason: Some(format!(
                "RBAC: allowed by ClusterRoleBinding \"test-apiserver\" of ClusterRole \"cluster-admin\" to ServiceAccount \"{account}\""
            )),
        };
    };
    match rules.iter().position(|r| r.allows(request)) {
        Some(i) => Decision {
            allowed: true,
            reason: Some(format!(
                "RBAC: allowed by RoleBinding \"test-apiserver-{i}/{ns}\" of Role \"test-apiserver-{i}\" to ServiceAccount \"{account}\"",
                ns = request.namespace
            )),
        },
        None => Decision { allowed: false, reason: None },
    }
}

/// Decides a non-resource request (such as `/version`): a rule whose resource is the path.
pub(crate) fn authorize_path(rules: Option<&[RbacRule]>, verb: &str, path: &str) -> Decision {
    let allowed = rules.is_none_or(|rules| {
        rules.iter().any(|r| (r.verb == "*" || r.verb == verb) && (r.resource == "*" || r.resource == path))
    });
    Decision { allowed, reason: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch_scale(namespace: &str, name: &str) -> Attributes {
        Attributes {
            verb: "patch".to_owned(),
            group: "apps".to_owned(),
            resource: "deployments".to_owned(),
            subresource: "scale".to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    #[test]
    fn no_table_allows_everything() {
        assert!(authorize(None, &patch_scale("a", "b")).allowed);
    }

    #[test]
    fn a_rule_for_the_main_resource_does_not_cover_the_subresource() {
        let rules = [RbacRule::new("patch", "deployments", "a")];
        assert!(!authorize(Some(&rules), &patch_scale("a", "b")).allowed);
    }

    #[test]
    fn a_named_rule_matches_only_that_object() {
        let rules = [RbacRule::new("patch", "deployments/scale", "a").named("b")];
        assert!(authorize(Some(&rules), &patch_scale("a", "b")).allowed);
        assert!(!authorize(Some(&rules), &patch_scale("a", "c")).allowed);
        assert!(!authorize(Some(&rules), &patch_scale("z", "b")).allowed);
    }

    #[test]
    fn only_a_wildcard_namespace_reaches_the_cluster_scope() {
        let list = Attributes { verb: "list".to_owned(), resource: "deployments".to_owned(), ..Attributes::default() };
        assert!(!authorize(Some(&[RbacRule::new("list", "deployments", "a")]), &list).allowed);
        assert!(authorize(Some(&[RbacRule::new("*", "*", "*")]), &list).allowed);
    }
}
