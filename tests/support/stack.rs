//! The end-to-end stack every Synapse test starts: a real Synapse, our bridge as a process, the
//! test API server with Deployment `clawdbot/clawdbot`, and optionally a proxy on one of the two
//! homeserver links. One builder for all of them, so a test names only what it changes.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;
use test_apiserver::{ControllerMode, TestApiServer};

use super::{
    bridge::{BridgeProcess, BridgeSetup, tokens},
    client::User,
    e2ee::E2eeClient,
    eventually, free_port,
    proxy::Proxy,
    scratch_dir,
    synapse::Synapse,
};

/// The bot's user id on the test homeserver.
pub const BOT: &str = "@toggle:localhost";

/// How long a step waits for the homeserver or the bridge before the test fails.
pub const WAIT: Duration = Duration::from_secs(40);

/// Where the stack's proxy sits, if it has one.
enum ProxyAt {
    None,
    /// Synapse → proxy → bridge: transactions can be held or dropped.
    BeforeBridge,
    /// Bridge → proxy → Synapse: the bridge's calls can be refused or recorded; the function
    /// sets it up before the bridge's first call.
    BeforeSynapse(Box<dyn FnOnce(&Proxy) + Send>),
}

/// How to start a [`Stack`]; [`Stack::build`] makes one with the defaults.
pub struct StackBuilder {
    api: Option<TestApiServer>,
    env: Vec<(String, String)>,
    config_file: Option<String>,
    proxy: ProxyAt,
}

/// The running parts; dropped in field order, so the scratch directory outlives the processes.
pub struct Stack {
    /// The bridge process.
    pub bridge: BridgeProcess,
    /// The proxy, where the builder asked for one (see [`Stack::proxy`]).
    pub proxy: Option<Proxy>,
    /// The homeserver.
    pub synapse: Synapse,
    /// The Kubernetes API.
    pub api: TestApiServer,
    /// The token Synapse sends transactions with.
    pub hs_token: String,
    /// The scratch directory: registration, state, logs, clients' stores.
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// A builder with the defaults: Deployment `clawdbot/clawdbot` at 0 replicas whose pods are
    /// ready 200 ms after a change, the bridge's default settings, no proxy.
    pub fn build() -> StackBuilder {
        StackBuilder { api: None, env: Vec::new(), config_file: None, proxy: ProxyAt::None }
    }

    /// The stack with every default.
    pub async fn start() -> Stack {
        Self::build().start().await
    }

    /// The proxy; panics when the builder asked for none.
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("this stack was built without a proxy")
    }

    /// The registration file Synapse and the bridge share.
    pub fn registration(&self) -> PathBuf {
        self.dir.path().join("registration.yaml")
    }

    /// The bodies of the scale PATCHes the API server received, in order.
    pub fn scale_patches(&self) -> Vec<Value> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/scale"))
            .map(|r| serde_json::from_str(&r.body).unwrap())
            .collect()
    }

    /// Waits until the API server received a scale PATCH.
    pub async fn wait_for_patch(&self) {
        self.wait_for_patches(1).await;
    }

    /// Waits until the API server received `n` scale PATCHes.
    pub async fn wait_for_patches(&self, n: usize) {
        eventually(WAIT, "the scale PATCHes to reach the apiserver", || async {
            (self.scale_patches().len() >= n).then_some(())
        })
        .await;
    }

    /// Registers `name` and returns them as a plain client-server API user.
    pub async fn user(&self, name: &str) -> User {
        let (id, token) = self.synapse.register(name).await;
        User::new(&self.synapse.url, id, token)
    }

    /// A DM between `user` and the bot, joined.
    pub async fn dm(&self, user: &User) -> String {
        let room = user.create_room(&[BOT], false).await;
        user.wait_for_membership(&room, BOT, "join", WAIT).await;
        room
    }

    /// A room of `user`, `other` and the bot, all joined.
    pub async fn group_room(&self, user: &User, other: &User) -> String {
        let room = user.create_room(&[BOT, &other.user_id], false).await;
        user.wait_for_membership(&room, BOT, "join", WAIT).await;
        other.join(&room).await;
        room
    }

    /// `name`'s E2EE client on device number `device`; device `"1"` registers them first.
    pub async fn person(&self, name: &str, device: &str) -> E2eeClient {
        if device == "1" {
            self.synapse.register(name).await;
        }
        E2eeClient::login(&self.synapse.url, name, &self.dir.path().join(format!("client-{name}-{device}"))).await
    }
}

impl StackBuilder {
    /// Uses `api` instead of the default API server.
    pub fn api(mut self, api: TestApiServer) -> Self {
        self.api = Some(api);
        self
    }

    /// Sets the bridge's environment variable `key`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets each of the bridge's environment variables in `vars`.
    pub fn envs(self, vars: &[(&str, &str)]) -> Self {
        vars.iter().fold(self, |b, (k, v)| b.env(k, v))
    }

    /// Gives the bridge this config file (`CONFIG_PATH`).
    pub fn config_file(mut self, yaml: &str) -> Self {
        self.config_file = Some(yaml.to_owned());
        self
    }

    /// Puts a proxy between Synapse and the bridge, so transactions can be held.
    pub fn proxy_before_bridge(mut self) -> Self {
        self.proxy = ProxyAt::BeforeBridge;
        self
    }

    /// Puts a proxy between the bridge and Synapse, set up by `configure` before the bridge's
    /// first call.
    pub fn proxy_before_synapse(mut self, configure: impl FnOnce(&Proxy) + Send + 'static) -> Self {
        self.proxy = ProxyAt::BeforeSynapse(Box::new(configure));
        self
    }

    /// Starts everything and waits until the bridge serves.
    pub async fn start(self) -> Stack {
        let dir = scratch_dir();
        let api = match self.api {
            Some(api) => api,
            None => {
                let api = TestApiServer::start().await.unwrap();
                api.add_deployment("clawdbot", "clawdbot", 0);
                api.set_controller(ControllerMode::Ready { after: Duration::from_millis(200) });
                api
            }
        };
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).unwrap();
        let mut setup = BridgeSetup::new(dir.path()).env("KUBECONFIG", kubeconfig.to_str().unwrap());
        if let Some(yaml) = &self.config_file {
            let path = dir.path().join("config.yaml");
            std::fs::write(&path, yaml).unwrap();
            setup = setup.env("CONFIG_PATH", path.to_str().unwrap());
        }
        for (k, v) in &self.env {
            setup = setup.env(k, v);
        }
        let (hs_token, _) = tokens(&setup.registration);
        let (bridge, proxy, synapse) = match self.proxy {
            ProxyAt::None => {
                let synapse = Synapse::start(dir.path(), &setup.registration);
                (setup.start(&synapse.url).await, None, synapse)
            }
            ProxyAt::BeforeBridge => {
                let behind = free_port();
                let proxy = Proxy::start(setup.port, &format!("http://127.0.0.1:{behind}")).await;
                setup = setup.env("LISTEN_ADDRESS", &format!("127.0.0.1:{behind}"));
                let synapse = Synapse::start(dir.path(), &setup.registration);
                (setup.start(&synapse.url).await, Some(proxy), synapse)
            }
            ProxyAt::BeforeSynapse(configure) => {
                let synapse = Synapse::start(dir.path(), &setup.registration);
                let port = free_port();
                let proxy = Proxy::start(port, &synapse.url).await;
                configure(&proxy);
                (setup.start(&format!("http://127.0.0.1:{port}")).await, Some(proxy), synapse)
            }
        };
        Stack { bridge, proxy, synapse, api, hs_token, dir }
    }
}
