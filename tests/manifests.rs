//! The deployment artefacts checked against the code they deploy: `deploy/` builds with kustomize,
//! every object is a Kubernetes object without unknown fields, the Role grants exactly what the
//! scaler uses, the pod is locked down, ports and settings agree with the registration and the
//! config parser, no Secret holds a real value, and the Dockerfile builds `--locked` into a
//! distroless image that runs as a numeric non-root user.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    path::{Component, Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::Deployment,
        core::v1::{ConfigMap, Container, Namespace, PersistentVolumeClaim, Secret, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{PolicyRule, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use matrix_k8s_toggle::{
    config::{Autoscaler, Config, Target, WorkloadKind},
    registration::Registration,
    scaler::{EVENTS_GROUP, permissions_needed},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_yaml::Value;

/// Where the bridge runs; Synapse's registration points at `<service>.<NAMESPACE>.svc`.
const NAMESPACE: &str = "toggle";
/// The name of the ServiceAccount, Role, Deployment, Service and NetworkPolicy.
const NAME: &str = "matrix-k8s-toggle";
/// The Secret the Deployment reads; shipped only as an example.
const SECRET: &str = "matrix-k8s-toggle-secrets";
/// The only value a Secret under deploy/ may hold.
const PLACEHOLDER: &str = "REPLACE_ME";
/// The example registration, whose url Synapse uses to reach the Service.
const EXAMPLE_REGISTRATION: &str = "registration/example-registration.yaml";
/// Read by kube-rs, not by src/config/.
const SETTINGS_OUTSIDE_CONFIG_RS: &[&str] = &["KUBECONFIG"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every non-empty document of a (multi-document) YAML text.
fn documents(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{origin}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Every `.yaml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// One object as written, with the file (or command) it came from.
#[derive(Clone, Debug)]
struct Object {
    origin: String,
    doc: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.doc["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.doc["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn identity(&self) -> (String, String, String) {
        let namespace = self.doc["metadata"]["namespace"].as_str().unwrap_or_default();
        (self.kind().to_owned(), namespace.to_owned(), self.name().to_owned())
    }

    /// The object as its k8s-openapi type; panics on a wrong apiVersion or kind, a bad value, or
    /// a field the type does not have (a typo Kubernetes would drop without a word).
    fn typed<T: Resource + DeserializeOwned + Serialize>(&self) -> T {
        let what = format!("{}: {} {:?}", self.origin, self.kind(), self.name());
        assert_eq!(self.doc["apiVersion"].as_str(), Some(T::API_VERSION), "{what}: apiVersion");
        assert_eq!(self.kind(), T::KIND, "{what}: kind");
        let typed: T = serde_yaml::from_value(self.doc.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
        let back = serde_yaml::to_value(&typed).unwrap();
        assert!(
            back == self.doc,
            "{what}: some field is unknown to Kubernetes or has the wrong type.\nwritten:\n{}\nas Kubernetes reads it:\n{}",
            serde_yaml::to_string(&self.doc).unwrap(),
            serde_yaml::to_string(&back).unwrap()
        );
        typed
    }

    /// Checks the object against the type its kind names.
    fn check_type(&self) {
        match self.kind() {
            "Namespace" => {
                let _: Namespace = self.typed();
            }
            "ServiceAccount" => {
                let _: ServiceAccount = self.typed();
            }
            "Role" => {
                let _: Role = self.typed();
            }
            "RoleBinding" => {
                let _: RoleBinding = self.typed();
            }
            "ConfigMap" => {
                let _: ConfigMap = self.typed();
            }
            "PersistentVolumeClaim" => {
                let _: PersistentVolumeClaim = self.typed();
            }
            "Deployment" => {
                let _: Deployment = self.typed();
            }
            "Service" => {
                let _: Service = self.typed();
            }
            "NetworkPolicy" => {
                let _: NetworkPolicy = self.typed();
            }
            "Secret" => {
                let _: Secret = self.typed();
            }
            other => {
                panic!("{}: kind {other:?} is not expected in deploy/; teach tests/manifests.rs about it", self.origin)
            }
        }
    }
}

/// A set of objects: the kustomization's resource files, or what kustomize built from them.
struct Manifests {
    objects: Vec<Object>,
}

impl Manifests {
    /// The `resources:` of deploy/kustomization.yaml, each file parsed on its own.
    fn from_resource_files() -> Self {
        let objects = resource_files()
            .iter()
            .flat_map(|file| {
                let origin = format!("deploy/{file}");
                documents(&read(&deploy_dir().join(file)), &origin)
                    .into_iter()
                    .map(move |doc| Object { origin: origin.clone(), doc })
            })
            .collect();
        Manifests { objects }
    }

    /// What `kubectl kustomize deploy/` prints.
    fn from_kustomize() -> Self {
        let output = match Command::new("kubectl").arg("kustomize").arg(deploy_dir()).output() {
            Ok(o) => o,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "kubectl is not installed, so deploy/ cannot be built with kustomize: run scripts/test, which installs it (Debian package kubernetes-client)"
            ),
            Err(e) => panic!("running kubectl kustomize: {e}"),
        };
        assert!(
            output.status.success(),
            "kubectl kustomize deploy/ failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("kustomize prints UTF-8");
        let objects = documents(&text, "kubectl kustomize deploy/")
            .into_iter()
            .map(|doc| Object { origin: "kubectl kustomize deploy/".into(), doc })
            .collect();
        Manifests { objects }
    }

    fn of_kind(&self, kind: &str) -> Vec<&Object> {
        self.objects.iter().filter(|o| o.kind() == kind).collect()
    }

    /// The one object of type `T`.
    fn one<T: Resource + DeserializeOwned + Serialize>(&self) -> T {
        let found = self.of_kind(T::KIND);
        assert_eq!(found.len(), 1, "expected exactly one {} in deploy/, found {}", T::KIND, found.len());
        found[0].typed()
    }
}

fn kustomization() -> Value {
    documents(&read(&deploy_dir().join("kustomization.yaml")), "deploy/kustomization.yaml").remove(0)
}

/// The `resources:` list of deploy/kustomization.yaml.
fn resource_files() -> Vec<String> {
    let k = kustomization();
    let list = k["resources"].as_sequence().expect("deploy/kustomization.yaml has a resources list");
    list.iter().map(|v| v.as_str().expect("resources are file names").to_owned()).collect()
}

/// The bridge's container in the Deployment.
fn container(d: &Deployment) -> Container {
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().expect("the Deployment has a pod spec");
    assert_eq!(pod.containers.len(), 1, "the pod runs the bridge alone");
    pod.containers[0].clone()
}

/// The port number the container declares under `name`.
fn container_port(c: &Container, name: &str) -> i32 {
    let ports = c.ports.as_deref().unwrap_or_default();
    let port = ports.iter().find(|p| p.name.as_deref() == Some(name));
    port.unwrap_or_else(|| panic!("the container has no port named {name:?}")).container_port
}

fn resolve(c: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => container_port(c, name),
    }
}

/// The environment the container gets: the ConfigMaps it loads whole, then its own `env`.
/// Values from Secrets read as `<from secret NAME/KEY>`.
fn environment(m: &Manifests) -> BTreeMap<String, String> {
    let c = container(&m.one::<Deployment>());
    let mut env = BTreeMap::new();
    for source in c.env_from.unwrap_or_default() {
        let name = source.config_map_ref.expect("envFrom loads ConfigMaps only").name;
        let config_map: ConfigMap = m
            .of_kind("ConfigMap")
            .into_iter()
            .find(|o| o.name() == name)
            .unwrap_or_else(|| panic!("envFrom names ConfigMap {name:?}, which deploy/ does not have"))
            .typed();
        env.extend(config_map.data.unwrap_or_default());
    }
    for var in c.env.unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(v), None) => v,
            (None, Some(from)) => {
                let key = from.secret_key_ref.expect("env values come from Secrets only");
                format!("<from secret {}/{}>", key.name, key.key)
            }
            other => panic!("{}: set either value or valueFrom, not {other:?}", var.name),
        };
        assert!(env.insert(var.name.clone(), value).is_none(), "{} is set both in a ConfigMap and in env", var.name);
    }
    env
}

/// The string literals of src/config/ outside its tests: every setting it reads is among them.
fn config_rs_literals() -> BTreeSet<String> {
    ["src/config/mod.rs", "src/config/settings.rs"]
        .iter()
        .flat_map(|file| {
            let source = read(&repo().join(file));
            let code = source.split("#[cfg(test)]").next().unwrap().to_owned();
            code.split('"').skip(1).step_by(2).map(str::to_owned).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_kustomization_builds_into_the_listed_files_with_only_the_image_replaced() {
    let built = Manifests::from_kustomize();
    let files = Manifests::from_resource_files();

    let kinds: BTreeSet<&str> = built.objects.iter().map(Object::kind).collect();
    let expected: BTreeSet<&str> = [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
    ]
    .into();
    assert_eq!(kinds, expected);

    let mut built_ids: Vec<_> = built.objects.iter().map(Object::identity).collect();
    let mut file_ids: Vec<_> = files.objects.iter().map(Object::identity).collect();
    built_ids.sort();
    file_ids.sort();
    assert_eq!(built_ids, file_ids, "kustomize changed which objects there are, or their namespaces");

    let k = kustomization();
    let images = k["images"].as_sequence().expect("the kustomization sets the image");
    for b in &built.objects {
        let mut written = files.objects.iter().find(|f| f.identity() == b.identity()).unwrap().doc.clone();
        if b.kind() == "Deployment" {
            let c = &mut written["spec"]["template"]["spec"]["containers"][0];
            let image = images.iter().find(|i| i["name"] == c["image"]).expect("images: names the container's image");
            let full = format!("{}:{}", image["newName"].as_str().unwrap(), image["newTag"].as_str().unwrap());
            c["image"] = Value::String(full);
        }
        assert_eq!(b.doc, written, "kustomize changed {:?} beyond its image", b.identity());
    }
}

#[test]
fn every_file_in_deploy_is_listed_once_or_is_the_secret_example() {
    let listed = resource_files();
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "a file is listed twice in resources: {listed:?}");
    for file in &listed {
        let path = deploy_dir().join(file);
        assert!(path.is_file(), "resources lists {file}, which does not exist");
        assert!(!documents(&read(&path), file).is_empty(), "{file} holds no object");
    }
    for entry in std::fs::read_dir(deploy_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".yaml") && name != "kustomization.yaml" && name != "secret.example.yaml" {
            assert!(unique.contains(&name), "deploy/{name} is not in the kustomization's resources");
        }
    }
}

#[test]
fn every_object_is_a_kubernetes_type_without_unknown_fields() {
    let mut objects = Manifests::from_resource_files().objects;
    let example = deploy_dir().join("secret.example.yaml");
    objects.extend(
        documents(&read(&example), "deploy/secret.example.yaml")
            .into_iter()
            .map(|doc| Object { origin: "deploy/secret.example.yaml".into(), doc }),
    );
    assert!(objects.len() >= 10, "deploy/ should hold ten objects, found {}", objects.len());
    for o in &objects {
        o.check_type();
    }
}

/// One permission, as RBAC grants it: API group, verb, resource, and the one object it is
/// limited to (`None`: any).
type Grant = (String, String, String, Option<String>);

/// Every permission `rules` grant, one per name in `resourceNames`, and how many times one is
/// granted in all (a permission granted twice counts twice).
fn grants(rules: &[PolicyRule]) -> (BTreeSet<Grant>, usize) {
    let mut granted = BTreeSet::new();
    let mut count = 0;
    for rule in rules {
        let groups = rule.api_groups.clone().unwrap_or_default();
        assert_eq!(groups.len(), 1, "one API group per rule: {groups:?}");
        assert!(rule.non_resource_urls.is_none(), "no nonResourceURLs");
        let names = match &rule.resource_names {
            None => vec![None],
            Some(names) => names.iter().cloned().map(Some).collect(),
        };
        for verb in &rule.verbs {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                assert!(!verb.contains('*') && !resource.contains('*'), "no wildcards: {verb} {resource}");
                for name in &names {
                    granted.insert((groups[0].clone(), verb.clone(), resource.clone(), name.clone()));
                    count += 1;
                }
            }
        }
    }
    (granted, count)
}

/// What the bridge uses for `t`, as RBAC grants it.
fn needed(t: &Target) -> BTreeSet<Grant> {
    permissions_needed(t)
        .into_iter()
        .map(|p| (p.group.to_owned(), p.verb.to_owned(), p.resource.to_owned(), p.name))
        .collect()
}

/// The one target deploy/configmap.yaml configures.
fn deployed_target(m: &Manifests) -> Target {
    let env = environment(m);
    Target::deployment(&env["DEPLOYMENT_NAME"], &env["DEPLOYMENT_NAMESPACE"])
}

/// The rules deploy/rbac.yaml offers, commented out, for targets beside an autoscaler: each
/// `#- ` line starts one, and the `#  ` lines after it continue it.
fn commented_rules() -> Vec<PolicyRule> {
    let text = read(&deploy_dir().join("rbac.yaml"));
    let mut rules: Vec<String> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix('#') else { continue };
        if rest.starts_with("- ") {
            rules.push(format!("{rest}\n"));
        } else if let Some(rule) = rules.last_mut().filter(|_| rest.starts_with("  ") && !rest.trim().is_empty()) {
            rule.push_str(rest);
            rule.push('\n');
        }
    }
    rules
        .iter()
        .map(|r| {
            let mut list: Vec<PolicyRule> =
                serde_yaml::from_str(r).unwrap_or_else(|e| panic!("a commented rule in deploy/rbac.yaml: {e}\n{r}"));
            list.pop().unwrap()
        })
        .collect()
}

#[test]
fn the_role_grants_exactly_what_the_configured_target_needs() {
    let m = Manifests::from_resource_files();
    let role: Role = m.one();
    let (granted, count) = grants(&role.rules.unwrap_or_default());
    let needed = needed(&deployed_target(&m));
    assert_eq!(granted, needed, "the Role must grant exactly what the scaler and the audit trail use");
    assert_eq!(count, needed.len(), "a permission is granted twice");
}

#[test]
fn the_commented_autoscaler_rules_grant_exactly_what_each_autoscaler_adds() {
    let m = Manifests::from_resource_files();
    let role: Role = m.one();
    let rules = role.rules.unwrap_or_default();
    let target = deployed_target(&m);
    let optional = commented_rules();
    assert_eq!(optional.len(), 2, "one commented rule for HPAs, one for KEDA");
    let for_group = |group: &str| {
        let rule = optional.iter().find(|r| r.api_groups.as_deref() == Some(&[group.to_owned()][..]));
        let mut with = rules.clone();
        with.push(rule.unwrap_or_else(|| panic!("no commented rule for {group}")).clone());
        grants(&with)
    };
    let scaled_object = target.workload.clone();
    for (group, autoscaler) in [("autoscaling", Autoscaler::Hpa), ("keda.sh", Autoscaler::Keda { scaled_object })] {
        let (granted, count) = for_group(group);
        let needed = needed(&target.clone().with_autoscaler(autoscaler.clone()));
        assert_eq!(granted, needed, "the Role with the {group} rule uncommented, against {autoscaler:?}");
        assert_eq!(count, needed.len(), "a permission is granted twice with the {group} rule");
    }
}

#[test]
fn the_role_cannot_write_the_workload_object_itself_only_its_scale() {
    let role: Role = Manifests::from_resource_files().one();
    for rule in role.rules.unwrap_or_default() {
        if rule.api_groups.as_deref() != Some(&["apps".to_owned()][..]) {
            continue;
        }
        for resource in rule.resources.as_deref().unwrap_or_default() {
            if resource.ends_with("/scale") {
                continue;
            }
            for verb in &rule.verbs {
                assert!(
                    !matches!(verb.as_str(), "patch" | "update" | "create" | "delete" | "deletecollection"),
                    "`{verb}` on `{resource}` could rewrite the pod template"
                );
            }
        }
    }
    let keda = Autoscaler::Keda { scaled_object: "clawdbot".into() };
    for kind in [WorkloadKind::Deployment, WorkloadKind::StatefulSet] {
        for autoscaler in [None, Some(Autoscaler::Hpa), Some(keda.clone())] {
            let mut t = Target::deployment("clawdbot", "clawdbot").with_kind(kind);
            t.autoscaler = autoscaler;
            for p in permissions_needed(&t) {
                if p.group == "apps" {
                    assert!(p.verb != "patch" || p.resource.ends_with("/scale"), "the scaler needs `{p}`");
                }
                if p.verb == "patch" {
                    assert!(p.name.is_some(), "`{p}` must name its one object");
                }
            }
        }
    }
}

#[test]
fn the_role_is_in_the_targets_namespace_and_every_rule_that_can_name_it_does() {
    let m = Manifests::from_resource_files();
    let role: Role = m.one();
    let target = deployed_target(&m);
    assert_eq!(role.metadata.namespace.as_deref(), Some(target.namespace.as_str()), "the Role's namespace");
    let unnamed: BTreeSet<(String, String, String)> = needed(&target)
        .into_iter()
        .filter(|g| g.3.is_none())
        .map(|(group, verb, resource, _)| (group, verb, resource))
        .collect();
    // NB: Event names are generated: the audit trail's `create` cannot name one.
    assert_eq!(
        unnamed,
        BTreeSet::from([(EVENTS_GROUP.to_owned(), "create".to_owned(), "events".to_owned())]),
        "only creating Events is granted without a name"
    );
    for rule in role.rules.unwrap_or_default() {
        if rule.api_groups.as_deref() == Some(&[EVENTS_GROUP.to_owned()][..]) {
            continue;
        }
        // NB: list and watch too: the rollout watch pins the object with a metadata.name field
        // selector, and `check` names it in every access review.
        assert_eq!(
            rule.resource_names,
            Some(vec![target.workload.clone()]),
            "{:?} on {:?}",
            rule.verbs,
            rule.resources
        );
    }
}

#[test]
fn the_role_is_bound_to_the_bridges_service_account_and_nothing_is_cluster_wide() {
    let m = Manifests::from_resource_files();
    let role: Role = m.one();
    let binding: RoleBinding = m.one();
    let account: ServiceAccount = m.one();
    let deployment: Deployment = m.one();

    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "bound to the bridge alone");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, NAME);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(account.metadata.name.as_deref(), Some(NAME));
    assert_eq!(account.metadata.namespace.as_deref(), Some(NAMESPACE));
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    assert_eq!(deployment.metadata.namespace.as_deref(), Some(NAMESPACE));

    for path in yaml_files(&deploy_dir()) {
        for doc in documents(&read(&path), &path.display().to_string()) {
            let kind = doc["kind"].as_str().unwrap_or_default();
            assert!(!kind.starts_with("Cluster"), "{}: no {kind}: nothing cluster-wide", path.display());
        }
    }
}

#[test]
fn every_object_of_the_bridge_is_in_its_namespace() {
    let m = Manifests::from_resource_files();
    let target_namespace = environment(&m)["DEPLOYMENT_NAMESPACE"].clone();
    for o in &m.objects {
        let (kind, namespace, name) = o.identity();
        match kind.as_str() {
            "Namespace" => assert_eq!(name, NAMESPACE),
            "Role" | "RoleBinding" => assert_eq!(namespace, target_namespace, "{kind} {name}"),
            _ => assert_eq!(namespace, NAMESPACE, "{kind} {name}"),
        }
    }
}

#[test]
fn the_pod_runs_as_non_root_with_a_read_only_root_and_no_privileges() {
    let deployment: Deployment = Manifests::from_resource_files().one();
    let c = container(&deployment);
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let psc = pod.security_context.expect("a pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(psc.run_as_group, Some(65532));
    assert_eq!(psc.fs_group, Some(65532));
    assert_eq!(psc.seccomp_profile.map(|s| s.type_), Some("RuntimeDefault".into()));
    let csc = c.security_context.expect("a container securityContext");
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(csc.read_only_root_filesystem, Some(true));
    assert_eq!(csc.privileged, None);
    assert_eq!(csc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]));
    assert_eq!(pod.host_network, None);
    assert_eq!(pod.host_pid, None);
}

#[test]
fn one_pod_at_a_time_owns_the_state_volume() {
    let m = Manifests::from_resource_files();
    let deployment: Deployment = m.one();
    let claim: PersistentVolumeClaim = m.one();
    let env = environment(&m);
    let c = container(&deployment);
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.and_then(|s| s.type_).as_deref(), Some("Recreate"));

    let claim_spec = claim.spec.unwrap();
    assert_eq!(claim_spec.access_modes, Some(vec!["ReadWriteOnce".to_owned()]));
    let volumes = spec.template.spec.unwrap().volumes.unwrap_or_default();
    let state = volumes
        .iter()
        .find(|v| v.persistent_volume_claim.as_ref().map(|p| &p.claim_name) == claim.metadata.name.as_ref())
        .expect("the pod mounts the PersistentVolumeClaim");
    let mount = c.volume_mounts.unwrap_or_default().into_iter().find(|m| m.name == state.name).expect("mounted");
    assert_eq!(Some(mount.mount_path.as_str()), env.get("STATE_DIR").map(String::as_str), "STATE_DIR is the volume");
    assert_ne!(mount.read_only, Some(true));
}

#[test]
fn the_probes_and_resources_are_set() {
    let c = container(&Manifests::from_resource_files().one());
    let http_port = container_port(&c, "http");
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get =
            probe.as_ref().and_then(|p| p.http_get.clone()).unwrap_or_else(|| panic!("an httpGet probe on {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(resolve(&c, &get.port), http_port, "the {path} probe's port");
    }
    let resources = c.resources.expect("resources are set");
    for (what, list) in [("requests", resources.requests), ("limits", resources.limits)] {
        let list = list.unwrap_or_else(|| panic!("{what} are set"));
        assert!(list.contains_key("cpu") && list.contains_key("memory"), "{what} name cpu and memory");
    }
}

#[test]
fn the_registration_url_the_service_and_the_container_agree_on_the_port() {
    let m = Manifests::from_resource_files();
    let deployment: Deployment = m.one();
    let service: Service = m.one();
    let policy: NetworkPolicy = m.one();
    let c = container(&deployment);
    let port = container_port(&c, "http");

    let (_dir, path) = example_registration_with_fresh_tokens();
    let registration = Registration::load(&path).unwrap();
    let url = url::Url::parse(&registration.url).unwrap();
    let service_name = service.metadata.name.clone().unwrap();
    let service_namespace = service.metadata.namespace.clone().unwrap();
    assert_eq!(
        url.host_str(),
        Some(format!("{service_name}.{service_namespace}.svc").as_str()),
        "the registration url"
    );
    assert_eq!(i32::from(registration.url_port()), port, "the registration url's port");

    let spec = service.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(
        spec.publish_not_ready_addresses,
        Some(true),
        "Synapse must reach the bridge while /readyz fails, or it drops room keys"
    );
    let service_ports = spec.ports.unwrap_or_default();
    assert_eq!(service_ports.len(), 1);
    assert_eq!(service_ports[0].port, port, "the Service's port");
    assert_eq!(resolve(&c, service_ports[0].target_port.as_ref().unwrap()), port, "the Service's targetPort");

    let listen = environment(&m)["LISTEN_ADDRESS"].clone();
    assert_eq!(listen.parse::<std::net::SocketAddr>().unwrap().port() as i32, port, "LISTEN_ADDRESS");

    let pod_labels = deployment.spec.unwrap().template.metadata.unwrap().labels.unwrap_or_default();
    let selects_pod = |selector: &BTreeMap<String, String>| selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v));
    assert!(selects_pod(&spec.selector.unwrap_or_default()), "the Service selects the pod");
    let policy = policy.spec.unwrap();
    assert!(
        selects_pod(&policy.pod_selector.unwrap().match_labels.unwrap_or_default()),
        "the NetworkPolicy selects the pod"
    );
    assert_eq!(policy.policy_types, Some(vec!["Ingress".to_owned(), "Egress".to_owned()]));
    let ingress = policy.ingress.clone().unwrap_or_default();
    assert_eq!(ingress.len(), 1, "one ingress rule: from Synapse");
    let rule = &ingress[0];
    let ports: Vec<i32> = rule.ports.iter().flatten().map(|p| resolve(&c, p.port.as_ref().unwrap())).collect();
    assert_eq!(ports, vec![port], "the NetworkPolicy opens the container's port only");
    let from = rule.from.as_deref().unwrap_or_default();
    assert!(!from.is_empty(), "the NetworkPolicy names who may connect");
    for peer in from {
        assert_synapse_pods(peer);
    }
}

/// A peer that is Synapse's pods: a pod selector within a namespace selected by name.
fn assert_synapse_pods(peer: &k8s_openapi::api::networking::v1::NetworkPolicyPeer) {
    let ns = peer.namespace_selector.as_ref().expect("a namespace selector");
    let labels = ns.match_labels.as_ref().expect("selected by label");
    assert!(labels.contains_key("kubernetes.io/metadata.name"), "by the namespace's name label");
    let pods = peer.pod_selector.as_ref().expect("Synapse's pods, not the whole namespace");
    assert!(!pods.match_labels.clone().unwrap_or_default().is_empty(), "pods selected by label");
    assert!(peer.ip_block.is_none());
}

#[test]
fn egress_goes_only_to_dns_synapse_and_the_api_server_ports() {
    let m = Manifests::from_resource_files();
    let policy: NetworkPolicy = m.one();
    let egress = policy.spec.unwrap().egress.unwrap_or_default();
    let ports = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyEgressRule| -> BTreeSet<(String, i32)> {
        rule.ports
            .iter()
            .flatten()
            .map(|p| {
                let port = match p.port.as_ref().expect("every egress rule names its ports") {
                    IntOrString::Int(n) => *n,
                    IntOrString::String(s) => panic!("named port {s} in an egress rule"),
                };
                (p.protocol.clone().unwrap_or_else(|| "TCP".into()), port)
            })
            .collect()
    };
    assert_eq!(egress.len(), 3, "DNS, Synapse and the API server: {egress:?}");
    let dns = &egress[0];
    assert_eq!(ports(dns), BTreeSet::from([("TCP".into(), 53), ("UDP".into(), 53)]));
    let dns_peer = &dns.to.as_deref().expect("DNS is named")[0];
    assert_eq!(
        dns_peer.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
        "kube-system"
    );
    let synapse = &egress[1];
    let homeserver = url::Url::parse(&environment(&m)["MATRIX_HOMESERVER"]).unwrap();
    let homeserver_port = homeserver.port_or_known_default().unwrap() as i32;
    assert_eq!(ports(synapse), BTreeSet::from([("TCP".into(), homeserver_port)]), "MATRIX_HOMESERVER's port");
    for peer in synapse.to.as_deref().expect("Synapse is named") {
        assert_synapse_pods(peer);
    }
    let api_server = &egress[2];
    assert_eq!(ports(api_server), BTreeSet::from([("TCP".into(), 443), ("TCP".into(), 6443)]));

    let ingress_peer = &policy_ingress_peers(&m)[0];
    assert_eq!(
        &synapse.to.as_deref().unwrap()[0],
        ingress_peer,
        "pushes come from, and calls go to, the same Synapse pods"
    );
}

fn policy_ingress_peers(m: &Manifests) -> Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer> {
    let policy: NetworkPolicy = m.one();
    policy.spec.unwrap().ingress.unwrap_or_default().remove(0).from.unwrap_or_default()
}

#[test]
fn every_environment_variable_is_a_setting_the_bridge_reads() {
    let literals = config_rs_literals();
    let env = environment(&Manifests::from_resource_files());
    for name in env.keys() {
        assert!(
            literals.contains(name) || SETTINGS_OUTSIDE_CONFIG_RS.contains(&name.as_str()),
            "{name} is not a setting src/config/ reads"
        );
    }
    for name in ["MATRIX_HOMESERVER", "MATRIX_SERVER_NAME", "ALLOWED_USERS", "DEPLOYMENT_NAME", "DEPLOYMENT_NAMESPACE"]
    {
        assert!(env.contains_key(name), "{name} should be set explicitly");
    }
    assert_eq!(env["REGISTRATION_PATH"], "/config/registration.yaml");
    assert_eq!(env["STATE_DIR"], "/data");
    assert_eq!(env["LOG_FORMAT"], "json");
    assert_eq!(env["CRYPTO_STORE_PASSPHRASE"], format!("<from secret {SECRET}/crypto-store-passphrase>"));
}

/// The example registration as its reader would make it: the same file, with fresh tokens in
/// place of its placeholders (which the bridge refuses).
fn example_registration_with_fresh_tokens() -> (tempfile::TempDir, PathBuf) {
    let mut example: serde_yaml::Value = serde_yaml::from_str(&read(&repo().join(EXAMPLE_REGISTRATION))).unwrap();
    example["as_token"] = "3vQ1bX9kLm2Zp8Rt5Wy7Nc4Hd6Jf0Gs".into();
    example["hs_token"] = "Tq7Lw2Xe9Kr4Mz1Vb6Np3Yh8Cj5Df0Ga".into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registration.yaml");
    std::fs::write(&path, serde_yaml::to_string(&example).unwrap()).unwrap();
    (dir, path)
}

#[test]
fn the_settings_load_with_the_bridges_own_config_parser() {
    let m = Manifests::from_resource_files();
    let role: Role = m.one();
    let c = container(&m.one::<Deployment>());
    let mut env = environment(&m);
    for key in env.keys() {
        assert!(
            key.chars().all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit() || ch == '_'),
            "{key:?} is not an environment variable name (envFrom would export it anyway)"
        );
    }
    let (_dir, registration) = example_registration_with_fresh_tokens();
    env.insert("REGISTRATION_PATH".into(), registration.display().to_string());
    let config = Config::load(None, &env).unwrap_or_else(|e| panic!("deploy/configmap.yaml: {e}"));
    assert_eq!(config.state_dir, Path::new("/data"));
    assert_eq!(i32::from(config.listen_address.port()), container_port(&c, "http"));
    assert_eq!(config.targets.len(), 1);
    let target = &config.targets[0];
    assert_eq!(target.kind, WorkloadKind::Deployment);
    assert_eq!(Some(&target.namespace), role.metadata.namespace.as_ref(), "the Role is where the target is");
    for rule in role.rules.unwrap_or_default() {
        for name in rule.resource_names.unwrap_or_default() {
            assert_eq!(name, target.workload, "the Role names the target");
        }
    }
    assert!(config.crypto_store_passphrase.is_some(), "the crypto store is encrypted with the Secret's passphrase");
}

#[test]
fn no_secret_in_deploy_holds_a_real_value_and_none_is_applied() {
    let m = Manifests::from_resource_files();
    assert!(m.of_kind("Secret").is_empty(), "apply -k must not overwrite the real Secret: keep it out of resources");

    let mut keys = BTreeSet::new();
    for path in yaml_files(&deploy_dir()) {
        let text = read(&path);
        for token in ["as_token:", "hs_token:"] {
            assert!(!text.contains(token), "{}: no registration tokens in deploy/", path.display());
        }
        for doc in documents(&text, &path.display().to_string()) {
            if doc["kind"] != "Secret" {
                continue;
            }
            let secret: Secret = Object { origin: path.display().to_string(), doc }.typed();
            for (key, value) in secret.string_data.unwrap_or_default() {
                assert_eq!(value, PLACEHOLDER, "{}: {key}", path.display());
                keys.insert((secret.metadata.name.clone().unwrap(), key));
            }
            for (key, value) in secret.data.unwrap_or_default() {
                assert_eq!(value.0, PLACEHOLDER.as_bytes(), "{}: {key}", path.display());
                keys.insert((secret.metadata.name.clone().unwrap(), key));
            }
        }
    }

    let deployment: Deployment = m.one();
    let c = container(&deployment);
    let mut used = BTreeSet::new();
    for var in c.env.unwrap_or_default() {
        if let Some(key) = var.value_from.and_then(|f| f.secret_key_ref) {
            used.insert((key.name, key.key));
        }
    }
    for volume in deployment.spec.unwrap().template.spec.unwrap().volumes.unwrap_or_default() {
        if let Some(secret) = volume.secret {
            let name = secret.secret_name.unwrap();
            for item in secret.items.expect("secret volumes pick their keys") {
                used.insert((name.clone(), item.key));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = [
        (SECRET.to_owned(), "registration.yaml".to_owned()),
        (SECRET.to_owned(), "crypto-store-passphrase".to_owned()),
    ]
    .into();
    assert_eq!(used, expected, "the keys the Deployment reads");
    assert_eq!(keys, expected, "secret.example.yaml shows every key the Deployment reads, as a placeholder");
}

/// The Dockerfile as instructions: continuation lines joined, comments dropped, split in stages.
fn dockerfile_stages() -> Vec<Vec<(String, String)>> {
    let text = read(&repo().join("Dockerfile"));
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                instructions.push((word.to_ascii_uppercase(), rest.trim().to_owned()));
                current.clear();
            }
        }
    }
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    for (word, rest) in instructions {
        if word == "FROM" {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push((word, rest));
        }
    }
    stages
}

fn instruction<'a>(stage: &'a [(String, String)], word: &str) -> Vec<&'a str> {
    stage.iter().filter(|(w, _)| w == word).map(|(_, rest)| rest.as_str()).collect()
}

#[test]
fn the_dockerfile_builds_locked_and_runs_a_numeric_non_root_user_on_distroless() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let builds: Vec<&str> =
        stages.iter().flat_map(|s| instruction(s, "RUN")).filter(|r| r.contains("cargo build")).collect();
    assert_eq!(builds.len(), 1, "one cargo build");
    for flag in ["--locked", "--release", "-p matrix-k8s-toggle"] {
        assert!(builds[0].contains(flag), "cargo build {flag}");
    }

    let last = stages.last().unwrap();
    let base = instruction(last, "FROM")[0];
    assert!(base.starts_with("gcr.io/distroless/"), "the final stage is distroless: {base}");
    assert!(base.ends_with(":nonroot") || base.contains("/static"), "a nonroot or static base: {base}");

    let users = instruction(last, "USER");
    assert_eq!(users.len(), 1, "the final stage sets USER once");
    let ids: Vec<u32> = users[0].split(':').map(|id| id.parse().expect("a numeric user (and group)")).collect();
    assert!(ids.iter().all(|&id| id != 0), "not root: {}", users[0]);

    let entrypoint: Vec<String> =
        serde_json::from_str(instruction(last, "ENTRYPOINT")[0]).expect("ENTRYPOINT in exec form");
    let binary = entrypoint[0].clone();
    assert!(
        instruction(last, "COPY").iter().any(|c| c.contains("--from=") && c.ends_with(&format!(" {binary}"))),
        "the entrypoint {binary} is copied from the builder"
    );
    let cmd: Vec<String> = serde_json::from_str(instruction(last, "CMD")[0]).expect("CMD in exec form");
    assert_eq!(cmd, ["serve"]);
    assert_eq!(instruction(last, "ENV"), ["STATE_DIR=/data"]);
    assert_eq!(instruction(last, "VOLUME"), ["/data"]);

    let deployment: Deployment = Manifests::from_resource_files().one();
    let port = container_port(&container(&deployment), "http");
    assert_eq!(instruction(last, "EXPOSE"), [port.to_string()], "EXPOSE the container's port");
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.security_context.unwrap().run_as_user, Some(i64::from(ids[0])), "the pod runs as the image's user");
}

/// `.dockerignore` as (exclude?, pattern) in order; the last matching pattern wins.
fn dockerignore() -> Vec<(bool, String)> {
    read(&repo().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.strip_prefix('!') {
            Some(p) => (false, p.trim_matches('/').to_owned()),
            None => (true, l.trim_matches('/').to_owned()),
        })
        .collect()
}

/// Docker's pattern match, for `*`, `?` and `**` segments.
fn glob(pattern: &[&str], path: &[&str]) -> bool {
    fn segment(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => segment(&p[1..], s) || (!s.is_empty() && segment(p, &s[1..])),
            (Some(b'?'), Some(_)) => segment(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => segment(&p[1..], &s[1..]),
            _ => false,
        }
    }
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(&"**"), _) => glob(&pattern[1..], path) || (!path.is_empty() && glob(pattern, &path[1..])),
        (Some(p), Some(s)) => segment(p.as_bytes(), s.as_bytes()) && glob(&pattern[1..], &path[1..]),
        _ => false,
    }
}

/// Whether `.dockerignore` keeps `path` (relative, `/`-separated) out of the build context.
fn ignored(rules: &[(bool, String)], path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let mut out = false;
    for (exclude, pattern) in rules {
        let pattern: Vec<&str> = pattern.split('/').collect();
        if (1..=parts.len()).any(|n| glob(&pattern, &parts[..n])) {
            out = *exclude;
        }
    }
    out
}

/// A COPY destination as a path inside the build's work directory; it cannot climb out of it.
fn inside(destination: &str) -> PathBuf {
    Path::new(destination).components().filter(|c| matches!(c, Component::Normal(_))).collect()
}

/// Copies what `.dockerignore` lets through of `from` (relative to the repo) to `to`.
fn copy_context(rules: &[(bool, String)], from: &str, to: &Path) {
    let source = repo().join(from);
    if source.is_dir() {
        for entry in std::fs::read_dir(&source).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let relative = format!("{from}/{name}");
            if !ignored(rules, &relative) {
                copy_context(rules, &relative, &to.join(&name));
            }
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&source, to).unwrap();
    }
}

#[test]
fn the_docker_build_context_holds_the_sources_and_keeps_out_build_output_and_git() {
    let rules = dockerignore();
    for kept in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/lib.rs",
        "test-apiserver/Cargo.toml",
        "test-apiserver/src/lib.rs",
    ] {
        assert!(!ignored(&rules, kept), "{kept} must reach the build");
    }
    for left_out in [
        "target/release/matrix-k8s-toggle",
        ".git/HEAD",
        ".local-stack/synapse/homeserver.yaml",
        ".testbed/venv",
        "test-apiserver/target/debug/x",
    ] {
        assert!(ignored(&rules, left_out), "{left_out} must stay out of the build context");
    }

    let stages = dockerfile_stages();
    let builder = &stages[0];
    let mut sources = Vec::new();
    for copy in instruction(builder, "COPY").into_iter().filter(|c| !c.contains("--from=")) {
        let words: Vec<&str> = copy.split_whitespace().filter(|w| !w.starts_with("--")).collect();
        let (destination, from) = words.split_last().expect("COPY has a destination");
        for source in from {
            assert!(repo().join(source).exists(), "the Dockerfile copies {source}, which does not exist");
            assert!(!ignored(&rules, source), "the Dockerfile copies {source}, which .dockerignore leaves out");
            let mut into = inside(destination);
            if from.len() > 1 || destination.ends_with('/') {
                into.push(Path::new(source).file_name().unwrap());
            }
            sources.push((source.to_string(), into));
        }
    }

    // NB: the build context must hold every workspace member and every declared target (a new
    // member or [[bench]] breaks `cargo build --locked` in the image). `cargo metadata` does not
    // check targets, so ask `cargo build` for a bin that does not exist: it loads the workspace,
    // checks the lock file, then stops at that name before compiling anything.
    let dir = tempfile::tempdir().unwrap();
    for (source, into) in &sources {
        copy_context(&rules, source, &dir.path().join(into));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let missing_bin = "no-such-bin-manifest-check";
    let output = Command::new(cargo)
        .args(["build", "--locked", "--offline", "--release", "-p", "matrix-k8s-toggle", "--bin", missing_bin])
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("no bin target named `{missing_bin}`")),
        "cargo cannot load the workspace from what the Dockerfile copies (add it to the COPY lines and to .dockerignore):\n{stderr}"
    );
}

#[test]
fn every_test_security_md_names_exists() {
    let security = read(&repo().join("SECURITY.md"));
    let mut sources = String::new();
    let mut dirs = vec![repo().join("src"), repo().join("tests")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&read(&path));
            }
        }
    }
    let named: BTreeSet<&str> = security
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| {
            w.matches('_').count() >= 4 && w.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(named.len() >= 20, "SECURITY.md names its tests: {named:?}");
    let missing: Vec<_> = named.iter().filter(|n| !sources.contains(&format!("fn {n}("))).collect();
    assert!(missing.is_empty(), "SECURITY.md names tests that do not exist: {missing:?}");
}
