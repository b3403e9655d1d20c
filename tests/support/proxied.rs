//! A stack where the bridge reaches Synapse through the test proxy, so a test can refuse or
//! record what the bridge asks of the homeserver.

use super::{
    bridge::{BridgeProcess, BridgeSetup},
    free_port,
    proxy::Proxy,
    scratch_dir,
    synapse::Synapse,
};
use test_apiserver::TestApiServer;

/// The parts, dropped in this order: the bridge first, the scratch directory last.
pub struct ProxiedStack {
    /// The bridge.
    pub bridge: BridgeProcess,
    /// Between the bridge and Synapse.
    pub proxy: Proxy,
    /// The homeserver.
    pub synapse: Synapse,
    /// The Kubernetes API, with Deployment clawdbot/clawdbot at 0 replicas.
    pub api: TestApiServer,
    /// The scratch directory.
    pub dir: tempfile::TempDir,
}

/// Starts the stack; `configure` sets up the proxy before the bridge first calls Synapse.
pub async fn start(configure: impl FnOnce(&Proxy)) -> ProxiedStack {
    let dir = scratch_dir();
    let api = TestApiServer::start().await.unwrap();
    api.add_deployment("clawdbot", "clawdbot", 0);
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let setup = BridgeSetup::new(dir.path()).env("KUBECONFIG", kubeconfig.to_str().unwrap());
    let synapse = Synapse::start(dir.path(), &setup.registration);
    let proxy_port = free_port();
    let proxy = Proxy::start(proxy_port, &synapse.url).await;
    configure(&proxy);
    let bridge = setup.start(&format!("http://127.0.0.1:{proxy_port}")).await;
    ProxiedStack { bridge, proxy, synapse, api, dir }
}
