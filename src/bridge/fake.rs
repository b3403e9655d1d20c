//! An in-memory homeserver and a bridge wired to it, for unit tests of the bridge's decisions
//! (who is refused, what is answered, what is scaled) without Synapse. Kubernetes is the test
//! API server's router, called in-process.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use super::*;
use crate::{clock::ManualClock, scaler::RetryPolicy};

/// What the fake homeserver was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    /// Joined the room.
    Join(OwnedRoomId),
    /// Left the room (or rejected its invite), with the reason.
    Leave(OwnedRoomId, String),
    /// Sent a message: its room, transaction id and text.
    Send(OwnedRoomId, OwnedTransactionId, String),
}

/// A homeserver in memory: rooms with members, a log of calls, and sends that can be made to fail.
pub(super) struct FakeHomeserver {
    bot: OwnedUserId,
    members: Mutex<HashMap<OwnedRoomId, BTreeMap<OwnedUserId, MembershipState>>>,
    calls: Mutex<Vec<Call>>,
    failing_sends: AtomicUsize,
    /// The Kubernetes API, to note what it held at each send.
    cluster: std::sync::OnceLock<test_apiserver::Cluster>,
    events_at_send: Mutex<Vec<usize>>,
}

impl FakeHomeserver {
    fn new(bot: OwnedUserId) -> Self {
        Self {
            bot,
            members: Mutex::default(),
            calls: Mutex::default(),
            failing_sends: AtomicUsize::new(0),
            cluster: std::sync::OnceLock::new(),
            events_at_send: Mutex::default(),
        }
    }

    /// How many Kubernetes Events the cluster held when each message was sent.
    pub(super) fn events_at_send(&self) -> Vec<usize> {
        self.events_at_send.lock().unwrap().clone()
    }

    /// Puts `users` (and the bot) in `room` as joined members.
    pub(super) fn room(&self, room: &RoomId, users: &[&UserId]) {
        let mut members: BTreeMap<_, _> = users.iter().map(|u| ((*u).to_owned(), MembershipState::Join)).collect();
        members.insert(self.bot.clone(), MembershipState::Join);
        self.members.lock().unwrap().insert(room.to_owned(), members);
    }

    /// The next `n` sends fail as a homeserver that is down (503).
    pub(super) fn fail_sends(&self, n: usize) {
        self.failing_sends.store(n, Ordering::SeqCst);
    }

    /// Every call so far.
    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The texts sent so far.
    pub(super) fn sent(&self) -> Vec<String> {
        self.sent_where(|_| true)
    }

    /// The texts sent to `room` so far.
    pub(super) fn sent_in(&self, room: &RoomId) -> Vec<String> {
        self.sent_where(|r| r == room)
    }

    fn sent_where(&self, keep: impl Fn(&RoomId) -> bool) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Send(r, _, text) if keep(&r) => Some(text),
                _ => None,
            })
            .collect()
    }

    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }
}

impl Homeserver for FakeHomeserver {
    fn bot(&self) -> &UserId {
        &self.bot
    }

    async fn join(&self, room: &RoomId) -> Result<(), MatrixError> {
        self.record(Call::Join(room.to_owned()));
        Ok(())
    }

    async fn leave(&self, room: &RoomId, reason: &str) -> Result<(), MatrixError> {
        self.record(Call::Leave(room.to_owned(), reason.to_owned()));
        Ok(())
    }

    async fn members(&self, room: &RoomId) -> Result<BTreeMap<OwnedUserId, MembershipState>, MatrixError> {
        Ok(self.members.lock().unwrap().get(room).cloned().unwrap_or_default())
    }

    async fn state(&self, _room: &RoomId, _kind: StateEventType) -> Result<Option<serde_json::Value>, MatrixError> {
        Ok(None)
    }

    async fn send_message(
        &self,
        room: &RoomId,
        txn: &TransactionId,
        content: &RoomMessageEventContent,
    ) -> Result<(), MatrixError> {
        if self.failing_sends.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(MatrixError::Api { status: 503, errcode: "M_UNKNOWN".into(), message: "down".into() });
        }
        // NB: like Synapse, a transaction id seen before is not sent again.
        let seen = self.calls().iter().any(|c| matches!(c, Call::Send(r, t, _) if r == room && t == txn));
        if !seen {
            let events = self.cluster.get().map_or(0, |c| c.events().len());
            self.events_at_send.lock().unwrap().push(events);
            self.record(Call::Send(room.to_owned(), txn.to_owned(), content.body().to_owned()));
        }
        Ok(())
    }
}

/// A bridge on the fake homeserver and an in-process Kubernetes API holding the Deployments
/// `web` and `db` in namespace `apps`, with 2 replicas each.
pub(super) struct Harness {
    pub(super) bridge: Bridge<FakeHomeserver>,
    pub(super) homeserver: Arc<FakeHomeserver>,
    pub(super) cluster: test_apiserver::Cluster,
    pub(super) clock: Arc<ManualClock>,
    pub(super) store: Arc<Store>,
    pub(super) metrics: Arc<Metrics>,
    config: Arc<Config>,
    next_event: AtomicI64,
    _dir: tempfile::TempDir,
}

/// The server every test user is on.
pub(super) const SERVER: &str = "example.org";

/// The user id `@name:example.org`.
pub(super) fn user(name: &str) -> OwnedUserId {
    UserId::parse(format!("@{name}:{SERVER}")).unwrap()
}

/// Wednesday 2026-12-02 10:00 UTC: where a harness's clock starts unless a test says otherwise.
const WEDNESDAY_10AM: i64 = 1_796_205_600_000;

/// The room id `!name:example.org`.
pub(super) fn room(name: &str) -> OwnedRoomId {
    RoomId::parse(format!("!{name}:{SERVER}")).unwrap()
}

impl Harness {
    /// A bridge configured by the YAML `file` (targets `web` and `db` unless it names others),
    /// its clock at Wednesday 2026-12-02 10:00 UTC, so the times it writes read the same any day.
    pub(super) fn new(file: &str) -> Self {
        Self::at(file, WEDNESDAY_10AM)
    }

    /// The same, with the clock at `start_ms`.
    pub(super) fn at(file: &str, start_ms: i64) -> Self {
        let config = Arc::new(crate::config::testing::config(file, &[]));
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let homeserver = Arc::new(FakeHomeserver::new(config.bot_user_id.clone()));
        let cluster = test_apiserver::Cluster::new("token", test_apiserver::ControllerMode::default());
        let _ = homeserver.cluster.set(cluster.clone());
        cluster.add_deployment("apps", "web", 2);
        cluster.add_deployment("apps", "db", 2);
        let clock = ManualClock::at(start_ms);
        let metrics = Arc::new(Metrics::default());
        let bridge = build(&config, &homeserver, &cluster, &store, &metrics, &clock);
        Harness { bridge, homeserver, cluster, clock, store, metrics, config, next_event: AtomicI64::new(1), _dir: dir }
    }

    /// Runs the cluster's controller in the background, so rollouts move on with tokio's clock.
    pub(super) fn run_controller(&self) {
        tokio::spawn(self.cluster.run_controller());
    }

    /// A new bridge on the same state, homeserver, cluster and clock: a restart.
    pub(super) fn restart(&mut self) {
        self.metrics = Arc::new(Metrics::default());
        self.bridge = build(&self.config, &self.homeserver, &self.cluster, &self.store, &self.metrics, &self.clock);
    }

    /// The job of `event` (a room event without its id, which is added) as the queue holds it.
    pub(super) fn job(&self, room: &RoomId, mut event: serde_json::Value) -> Job {
        let seq = self.next_event.fetch_add(1, Ordering::SeqCst);
        let event_id = EventId::parse(format!("$event{seq}")).unwrap();
        event["event_id"] = event_id.as_str().into();
        event["room_id"] = room.as_str().into();
        Job {
            seq,
            event_id,
            event: event.to_string(),
            attempts: 0,
            received_ms: self.clock.now_ms(),
            room_id: room.to_owned(),
        }
    }

    /// The job of a text message `body` from `sender` in `room`, sent now.
    pub(super) fn message(&self, room: &RoomId, sender: &UserId, body: &str) -> Job {
        self.job(
            room,
            serde_json::json!({
                "type": "m.room.message",
                "sender": sender,
                "origin_server_ts": self.clock.now_ms(),
                "content": { "msgtype": "m.text", "body": body },
            }),
        )
    }

    /// Handles `job` as the worker would.
    pub(super) async fn handle(&self, job: &Job) -> Outcome {
        self.bridge.handle(job).await
    }

    /// Sends `body` from `sender` in `room`, handles it, and returns what the bot said.
    pub(super) async fn say(&self, room: &RoomId, sender: &UserId, body: &str) -> Vec<String> {
        let before = self.homeserver.sent().len();
        let job = self.message(room, sender, body);
        assert_eq!(self.handle(&job).await, Outcome::Done, "{body:?} from {sender}");
        self.homeserver.sent().split_off(before)
    }

    /// The desired replicas of the Deployment `name` in `apps`.
    pub(super) fn replicas(&self, name: &str) -> i32 {
        self.cluster.replicas(test_apiserver::WorkloadKind::Deployment, "apps", name).unwrap().0
    }

    /// The Deployment `name` in `apps`, as a watch would deliver it.
    pub(super) async fn object(&self, name: &str) -> kube::api::DynamicObject {
        let resource = kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&());
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(kube_client(&self.cluster), "apps", &resource);
        api.get(name).await.unwrap()
    }

    /// Scales the Deployment `name` to `replicas` as the field manager `manager`, as Argo CD or
    /// a person with kubectl would.
    pub(super) async fn scale_as(&self, manager: &str, name: &str, replicas: i32) {
        let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
            kube::Api::namespaced(kube_client(&self.cluster), "apps");
        let params = kube::api::PatchParams { field_manager: Some(manager.into()), ..Default::default() };
        let patch = kube::api::Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}}));
        api.patch_scale(name, &params, &patch).await.unwrap();
    }

    /// How many times the bridge patched a workload's scale.
    pub(super) fn patches(&self) -> usize {
        self.cluster.requests().iter().filter(|r| r.method == "PATCH").count()
    }
}

use crate::clock::Clock;

/// A kube-rs client that calls the test API server's router in-process.
pub(super) fn kube_client(cluster: &test_apiserver::Cluster) -> kube::Client {
    let api = tower::ServiceBuilder::new()
        .map_request(|mut r: http::Request<kube::client::Body>| {
            r.headers_mut().insert(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer token"));
            r
        })
        .service(test_apiserver::app(cluster.clone()));
    kube::Client::new(api, "default")
}

fn build(
    config: &Arc<Config>,
    homeserver: &Arc<FakeHomeserver>,
    cluster: &test_apiserver::Cluster,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    clock: &Arc<ManualClock>,
) -> Bridge<FakeHomeserver> {
    let scaler = Scaler::new(kube_client(cluster), RetryPolicy { attempts: 1, first_delay: Duration::from_millis(1) });
    let crypto = Arc::new(CryptoCell::new(store.clone(), Arc::new(tokio::sync::Notify::new())));
    Bridge::new(
        config.clone(),
        homeserver.clone(),
        store.clone(),
        metrics.clone(),
        Arc::new(Rooms::default()),
        crypto,
        Ok(scaler),
    )
    .with_clock(clock.clone())
}
