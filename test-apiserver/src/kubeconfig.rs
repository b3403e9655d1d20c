//! The kubeconfig that points a client at the server: one cluster, one token user, one context.

use serde_json::json;

/// The name used for the cluster and the context.
pub const CONTEXT: &str = "test-apiserver";

/// The name of the kubeconfig user.
pub const KUBECONFIG_USER: &str = "matrix-k8s-toggle";

/// A kubeconfig for `server` (e.g. `http://127.0.0.1:6443`) with a bearer `token`, whose
/// current context defaults to `namespace`.
pub fn kubeconfig_yaml(server: &str, token: &str, namespace: &str) -> String {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CONTEXT, "cluster": {"server": server}}],
        "users": [{"name": KUBECONFIG_USER, "user": {"token": token}}],
        "contexts": [{
            "name": CONTEXT,
            "context": {"cluster": CONTEXT, "user": KUBECONFIG_USER, "namespace": namespace}
        }],
        "current-context": CONTEXT,
        "preferences": {}
    });
    serde_yaml::to_string(&config).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_names_server_token_and_current_context() {
        let yaml = kubeconfig_yaml("http://127.0.0.1:1", "t0ken", "default");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed["clusters"][0]["cluster"]["server"], "http://127.0.0.1:1");
        assert_eq!(parsed["users"][0]["user"]["token"], "t0ken");
        assert_eq!(parsed["current-context"], CONTEXT);
        assert_eq!(parsed["contexts"][0]["context"]["namespace"], "default");
    }
}
