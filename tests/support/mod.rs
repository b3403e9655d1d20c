//! Test support: a real Synapse from the test bed, our server as a real process, and a small
//! client-server API client for the people in the tests.
#![allow(dead_code)]

pub mod bridge;
pub mod client;
pub mod e2ee;
pub mod oneshot;
pub mod proxy;
pub mod stack;
pub mod synapse;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A port free on 127.0.0.1 right now, chosen below the kernel's ephemeral range.
///
/// A port the kernel hands out for `bind(0)` is also one it hands out as the source port of an
/// outgoing connection: Synapse retrying a push to a bridge that is not listening yet could take
/// it (even by connecting to itself), and the bridge then fails with "Address already in use".
/// Ports under the ephemeral range are only ever taken by an explicit bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = ephemeral_range_start().clamp(2048, 65535);
    let span = low - 1024;
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(97).wrapping_add(seed);
        let port = (1024 + n % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 below {low}");
}

/// The first port of the kernel's ephemeral range (32768 where it cannot be read).
fn ephemeral_range_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_every(Duration::from_millis(100), timeout, what, f).await
}

/// Polls `f` every `interval` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually_every<T, F, Fut>(interval: Duration, timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(interval).await;
    }
}

/// A scratch directory under `target/test-scratch`, removed when dropped.
pub fn scratch_dir() -> tempfile::TempDir {
    let base = repo_root().join("target").join("test-scratch");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new().prefix("t").tempdir_in(&base).unwrap()
}

/// Path of our binary under test.
pub fn bridge_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_matrix-k8s-toggle"))
}

/// The permissions of the Role in `deploy/rbac.yaml`, as test apiserver rules: each verb on
/// each resource, limited to the names in `resourceNames`.
pub fn deploy_role_rules() -> Vec<test_apiserver::RbacRule> {
    use k8s_openapi::api::rbac::v1::Role;
    use serde::Deserialize;

    let text = std::fs::read_to_string(repo_root().join("deploy/rbac.yaml")).unwrap();
    let role: Role = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Role")
        .map(|doc| serde_yaml::from_value(doc).unwrap())
        .expect("deploy/rbac.yaml holds a Role");
    let namespace = role.metadata.namespace.expect("the Role has a namespace");
    let mut rules = Vec::new();
    for rule in role.rules.unwrap_or_default() {
        let group = rule.api_groups.as_ref().and_then(|g| g.first()).cloned().unwrap_or_default();
        for verb in &rule.verbs {
            for resource in rule.resources.iter().flatten() {
                let unnamed = test_apiserver::RbacRule::new(verb, resource, &namespace).in_group(&group);
                match &rule.resource_names {
                    Some(names) => rules.extend(names.iter().map(|n| unnamed.clone().named(n))),
                    None => rules.push(unnamed),
                }
            }
        }
    }
    rules
}
