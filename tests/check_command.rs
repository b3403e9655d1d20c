#![recursion_limit = "256"]
//! `matrix-k8s-toggle check` against a real Synapse and the test apiserver: one line per
//! check, non-zero exit on any failure, and a missing permission named.

mod support;

use std::process::Command;

use support::{bridge::BridgeSetup, bridge_binary, deploy_role_rules, scratch_dir, synapse::Synapse};
use test_apiserver::{RbacRule, TestApiServer, WorkloadKind};

async fn run_check(api: &TestApiServer, synapse_running: bool) -> (bool, String) {
    run_check_with(api, synapse_running, None).await
}

/// `check` with the configuration file `config` (YAML), if any.
async fn run_check_with(api: &TestApiServer, synapse_running: bool, config: Option<&str>) -> (bool, String) {
    let dir = scratch_dir();
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let mut setup = BridgeSetup::new(dir.path()).env("KUBECONFIG", kubeconfig.to_str().unwrap());
    if let Some(yaml) = config {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        setup = setup.env("CONFIG_PATH", path.to_str().unwrap());
    }
    let synapse = Synapse::start(dir.path(), &setup.registration);
    if !synapse_running {
        synapse.stop();
    }
    let output = tokio::task::spawn_blocking(move || {
        Command::new(bridge_binary())
            .arg("check")
            .env_clear()
            .envs(&setup.env)
            .env("MATRIX_HOMESERVER", &synapse.url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned())
}

fn line<'a>(report: &'a str, prefix: &str) -> &'a str {
    report.lines().find(|l| l.contains(prefix)).unwrap_or_else(|| panic!("no line with {prefix:?} in:\n{report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_complete_setup_passes_every_check() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let (ok, report) = run_check(&api, true).await;
    assert!(ok, "{report}");
    assert!(line(&report, "as_token").starts_with("ok"), "{report}");
    assert!(line(&report, "target clawdbot").contains("is running"), "{report}");
    assert!(line(&report, "permissions clawdbot").contains("patch deployments/scale"), "{report}");
    assert!(report.lines().all(|l| l.starts_with("ok")), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_role_in_deploy_passes_every_permission_check() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let rules = deploy_role_rules();
    let apps = rules.iter().filter(|r| r.group == "apps");
    assert!(apps.clone().all(|r| r.name.as_deref() == Some("clawdbot")), "every workload rule is named: {rules:?}");
    api.set_rbac(Some(rules));
    let (ok, report) = run_check(&api, true).await;
    assert!(ok, "{report}");
    let permissions = line(&report, "permissions clawdbot");
    assert!(permissions.starts_with("ok") && permissions.contains("watch deployments"), "{report}");
    assert!(permissions.contains("create events"), "the audit trail's permission is checked too: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_fails_the_check_and_is_named() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    api.set_rbac(Some(vec![
        RbacRule::new("get", "deployments/scale", "clawdbot"),
        RbacRule::new("get", "deployments", "clawdbot"),
        RbacRule::new("patch", "deployments", "clawdbot"),
        RbacRule::new("list", "deployments", "clawdbot"),
        RbacRule::new("watch", "deployments", "clawdbot"),
    ]));
    let (ok, report) = run_check(&api, true).await;
    assert!(!ok, "{report}");
    let permissions = line(&report, "permissions clawdbot");
    assert!(permissions.starts_with("FAIL"), "{report}");
    assert!(permissions.contains("may not: patch deployments/scale"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_homeserver_fails_the_check_with_the_setting_to_fix() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    let (ok, report) = run_check(&api, false).await;
    assert!(!ok, "{report}");
    assert!(line(&report, "homeserver").contains("fix MATRIX_HOMESERVER"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_target_is_checked_for_what_its_autoscaler_needs_and_reported() {
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 1);
    api.add_deployment("clawdbot", "web", 2);
    api.cluster().add_hpa("clawdbot", "web-hpa", (WorkloadKind::Deployment, "web"), 2, 6, 2);
    api.cluster().add_scaled_object("clawdbot", "clawdbot", "clawdbot", 1, 4);
    // NB: the Role in deploy/ for both workloads, and the commented HPA rule uncommented, but
    // not the KEDA one.
    let mut rules = deploy_role_rules();
    let web: Vec<RbacRule> =
        rules.iter().filter(|r| r.name.as_deref() == Some("clawdbot")).map(|r| r.clone().named("web")).collect();
    rules.extend(web);
    rules.push(RbacRule::new("list", "horizontalpodautoscalers", "clawdbot").in_group("autoscaling"));
    api.set_rbac(Some(rules));
    let config = "targets:\n  - {name: web, namespace: clawdbot, autoscaler: hpa}\n  - {name: clawdbot, namespace: clawdbot, autoscaler: keda}\n";
    let (ok, report) = run_check_with(&api, true, Some(config)).await;
    assert!(!ok, "{report}");
    let web = line(&report, "permissions web");
    assert!(web.starts_with("ok") && web.contains("list horizontalpodautoscalers"), "{report}");
    let hpa = line(&report, "autoscaler web");
    assert!(hpa.starts_with("ok") && hpa.contains("HPA web-hpa scales it between 2 and 6"), "{report}");
    let keda = line(&report, "permissions clawdbot");
    assert!(keda.starts_with("FAIL"), "{report}");
    assert!(keda.contains("may not: get scaledobjects, patch scaledobjects"), "{report}");
    assert!(line(&report, "autoscaler clawdbot").starts_with("FAIL"), "an unreadable ScaledObject: {report}");
}
