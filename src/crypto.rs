//! The one owner of the `OlmMachine`: it sets up the bot's device and cross-signing, takes in
//! each transaction's to-device events, device lists and key counts, sends the machine's
//! outgoing requests masquerading as our device, decrypts room events, and encrypts replies.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use matrix_sdk_common::deserialized_responses::EncryptionInfo;
use matrix_sdk_crypto::{
    CollectStrategy, DecryptionSettings, EncryptionSettings, EncryptionSyncChanges, OlmMachine,
    RoomEventDecryptionResult, TrustRequirement, UserIdentity,
    store::CryptoStore as _,
    types::{
        events::room::encrypted::EncryptedEvent,
        requests::{AnyIncomingResponse, AnyOutgoingRequest, OutgoingRequest, ToDeviceRequest},
    },
};
use matrix_sdk_sqlite::SqliteCryptoStore;
use rand::{Rng, RngCore};
use ruma::{
    OneTimeKeyAlgorithm, OwnedDeviceId, OwnedRoomId, OwnedTransactionId, OwnedUserId, RoomId, UInt, UserId,
    api::client::{
        device::{delete_device, get_devices, update_device},
        keys::{get_keys, upload_signing_keys},
        message::send_message_event,
        sync::sync_events::DeviceLists,
        to_device::send_event_to_device,
    },
    events::{
        AnyMessageLikeEventContent, AnyTimelineEvent, AnyToDeviceEvent, MessageLikeEventType,
        room::{encryption::RoomEncryptionEventContent, history_visibility::HistoryVisibility},
    },
    serde::Raw,
};
use tokio::sync::Mutex as AsyncMutex;

use crate::{
    appservice::Transaction,
    config::{Config, TrustPolicy},
    matrix::{MatrixClient, MatrixError},
    metrics::Metrics,
    store::{Store, StoreError},
};

/// Errors of the encryption layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The crypto store failed.
    #[error("crypto store: {0}")]
    Store(#[from] matrix_sdk_crypto::CryptoStoreError),
    /// The crypto store could not be unlocked; it was left as it is.
    #[error(
        "cannot unlock the crypto store at {path}: {reason}. The store was left as it is: set CRYPTO_STORE_PASSPHRASE to the passphrase it was made with (or restore STATE_DIR/crypto-store.key), or, to start over with a new device and lose its room keys, move {path} away"
    )]
    Locked {
        /// The store directory.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The crypto store could not be set up.
    #[error("crypto store at {path}: {message}")]
    Open {
        /// The store directory.
        path: String,
        /// What failed.
        message: String,
    },
    /// An Olm operation failed.
    #[error("olm: {0}")]
    Olm(#[from] matrix_sdk_crypto::OlmError),
    /// A Megolm operation failed.
    #[error("megolm: {0}")]
    Megolm(#[from] matrix_sdk_crypto::MegolmError),
    /// A homeserver call failed.
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StoreError),
    /// A file in STATE_DIR could not be read or written.
    #[error("STATE_DIR file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl CryptoError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, CryptoError::Matrix(e) if e.is_transient())
    }
}

/// What became of an encrypted room event.
#[derive(Debug)]
pub enum Decryption {
    /// Decrypted.
    Decrypted {
        /// The decrypted event.
        event: Raw<AnyTimelineEvent>,
        /// Who sent it, from which device, how trusted.
        info: Arc<EncryptionInfo>,
        /// Where in its Megolm session the ciphertext sits; the same position under another
        /// event id is a replay.
        position: Option<MegolmPosition>,
    },
    /// The room key has not arrived (yet).
    MissingKey {
        /// The Megolm session the key belongs to.
        session_id: Option<String>,
    },
    /// It cannot be decrypted, and waiting will not help.
    Failed(String),
}

/// A ciphertext's place in its Megolm session: the session id and the message index. The
/// index is covered by the session's signature, so after a successful decryption it is
/// authentic, unlike the outer event's id and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MegolmPosition {
    /// The Megolm session.
    pub session_id: String,
    /// The message index within the session.
    pub index: u32,
}

impl MegolmPosition {
    /// Reads the position from an `m.room.encrypted` event's content.
    pub fn of_event(event_json: &str) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct Outer {
            content: Content,
        }
        #[derive(serde::Deserialize)]
        struct Content {
            session_id: String,
            ciphertext: String,
        }
        let outer: Outer = serde_json::from_str(event_json).ok()?;
        let message = vodozemac::megolm::MegolmMessage::from_base64(&outer.content.ciphertext).ok()?;
        Some(MegolmPosition { session_id: outer.content.session_id, index: message.message_index() })
    }
}

/// What `approve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// The new identity is pinned; the user's commands work again.
    Approved,
    /// The user's identity did not change: nothing to approve.
    NothingToApprove,
    /// The quoted key is not the start of the new identity's key (shown grouped); nothing
    /// changed.
    KeyMismatch {
        /// The new identity's key, in groups of four.
        key: String,
    },
}

/// A key in groups of four characters, as people read it aloud.
pub fn grouped(key: &str) -> String {
    key.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join(" ")
}

/// Key of the state database holding our device id.
const DEVICE_ID_KEY: &str = "device_id";

/// The bot's encryption state.
pub struct Crypto {
    machine: OlmMachine,
    matrix: Arc<MatrixClient>,
    metrics: Arc<Metrics>,
    store: Arc<Store>,
    work: Arc<tokio::sync::Notify>,
    outgoing: AsyncMutex<()>,
    room_locks: std::sync::Mutex<HashMap<OwnedRoomId, Arc<AsyncMutex<()>>>>,
    fed_key_counts: std::sync::Mutex<Option<KeyCounts>>,
}

/// One-time-key counts and unused fallback key types, as last fed to the machine.
type KeyCounts = (BTreeMap<OneTimeKeyAlgorithm, UInt>, Option<Vec<OneTimeKeyAlgorithm>>);

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto").field("device_id", &self.machine.device_id()).finish_non_exhaustive()
    }
}

fn decryption_settings() -> DecryptionSettings {
    // NB: trust is decided by our own policy from the encryption info; requiring
    // cross-signing here would refuse every device of users who never set it up.
    DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted }
}

/// How the crypto store is unlocked.
#[derive(Clone)]
enum StoreKey {
    Passphrase(String),
    Key(Box<[u8; 32]>),
}

/// The file of the crypto store's database inside its directory.
const CRYPTO_DATABASE: &str = "matrix-sdk-crypto.sqlite3";

/// The key to the crypto store: `CRYPTO_STORE_PASSPHRASE`, or the key file in STATE_DIR,
/// generated only when there is no store yet to unlock.
fn store_key(config: &Config, store_exists: bool, dir: &Path) -> Result<StoreKey, CryptoError> {
    if let Some(p) = &config.crypto_store_passphrase {
        return Ok(StoreKey::Passphrase(p.expose().to_owned()));
    }
    let path = config.state_dir.join("crypto-store.key");
    let locked = |reason: String| CryptoError::Locked { path: dir.display().to_string(), reason };
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut key = [0u8; 32];
            key.copy_from_slice(&bytes);
            Ok(StoreKey::Key(Box::new(key)))
        }
        Ok(bytes) => Err(locked(format!("the key file {} holds {} bytes, not 32", path.display(), bytes.len()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && store_exists => {
            Err(locked(format!("CRYPTO_STORE_PASSPHRASE is not set and the key file {} is missing", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            write_private(&path, &key)
                .map_err(|source| CryptoError::File { path: path.display().to_string(), source })?;
            tracing::warn!(
                path = %path.display(),
                "no CRYPTO_STORE_PASSPHRASE given: generated a random key for the crypto store next to it; back up STATE_DIR as a whole, or set CRYPTO_STORE_PASSPHRASE"
            );
            Ok(StoreKey::Key(Box::new(key)))
        }
        Err(e) => Err(locked(format!("the key file {} cannot be read: {e}", path.display()))),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

/// The crypto store, unlocked. It is opened before the service serves, so a wrong passphrase
/// or an unreadable key file stops start-up and leaves the store as it is.
#[derive(Clone)]
pub struct UnlockedStore {
    dir: PathBuf,
    key: StoreKey,
    store: SqliteCryptoStore,
    /// The device of the store's own account; `None` for a new, empty store.
    device: Option<OwnedDeviceId>,
}

impl std::fmt::Debug for UnlockedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnlockedStore").field("dir", &self.dir).field("device", &self.device).finish_non_exhaustive()
    }
}

impl UnlockedStore {
    /// Opens and unlocks `STATE_DIR/crypto`, creating it when it does not exist.
    pub async fn open(config: &Config) -> Result<Self, CryptoError> {
        let dir = config.state_dir.join("crypto");
        let exists = dir.join(CRYPTO_DATABASE).exists();
        let key = store_key(config, exists, &dir)?;
        Self::open_with(dir, key).await
    }

    async fn open_with(dir: PathBuf, key: StoreKey) -> Result<Self, CryptoError> {
        let locked = |reason: String| CryptoError::Locked { path: dir.display().to_string(), reason };
        let store = match &key {
            StoreKey::Passphrase(p) => SqliteCryptoStore::open(&dir, Some(p)).await,
            StoreKey::Key(k) => SqliteCryptoStore::open_with_key(&dir, Some(k)).await,
        }
        .map_err(|e| locked(e.to_string()))?;
        let account = store.load_account().await.map_err(|e| locked(e.to_string()))?;
        let device = account.map(|a| a.device_id().to_owned());
        Ok(Self { dir, key, store, device })
    }

    /// The device of the store's own account, if it has one.
    pub fn device_id(&self) -> Option<&ruma::DeviceId> {
        self.device.as_deref()
    }

    /// Sets this store aside and opens a new, empty one in its place, with the same key.
    async fn replace(self, why: &str) -> Result<Self, CryptoError> {
        let Self { dir, key, store, .. } = self;
        drop(store);
        set_aside(&dir)?;
        tracing::warn!(
            reason = why,
            "starting over with a new crypto store and a new device: messages encrypted for the old device can no longer be read, and the encryption identities pinned for users (TRUST_POLICY=tofu) are forgotten"
        );
        Self::open_with(dir, key).await
    }
}

fn new_device_id() -> OwnedDeviceId {
    let mut rng = rand::thread_rng();
    let suffix: String = (0..8).map(|_| rng.gen_range(b'A'..=b'Z') as char).collect();
    format!("TOGGLE{suffix}").into()
}

impl Crypto {
    /// Sets up the machine on the unlocked store, uploads keys and cross-signs the bot once.
    /// The store is replaced only when its device no longer exists on the homeserver; the
    /// bot's other devices are deleted only once a new device's machine is up.
    pub async fn start(
        config: &Config,
        unlocked: &mut UnlockedStore,
        store: Arc<Store>,
        matrix: Arc<MatrixClient>,
        metrics: Arc<Metrics>,
        work: Arc<tokio::sync::Notify>,
    ) -> Result<Arc<Crypto>, CryptoError> {
        for attempt in 0..2 {
            let fresh = unlocked.device.is_none();
            let crypto = Self::open(unlocked, config, &store, &matrix, &metrics, &work).await?;
            crypto.flush().await;
            if crypto.server_has_our_keys().await? {
                if fresh {
                    delete_other_devices(&matrix, crypto.device_id()).await;
                }
                crypto.ensure_cross_signing().await?;
                crypto.machine.mark_all_tracked_users_as_dirty().await?;
                crypto.flush().await;
                return Ok(Arc::new(crypto));
            }
            tracing::warn!(
                device_id = %crypto.machine.device_id(),
                attempt,
                "the homeserver does not hold this device's keys (was the device deleted?)"
            );
            drop(crypto);
            *unlocked = unlocked.clone().replace("the device no longer exists on the homeserver").await?;
        }
        Err(CryptoError::Open {
            path: unlocked.dir.display().to_string(),
            message: "the homeserver keeps refusing our device keys".into(),
        })
    }

    async fn open(
        unlocked: &mut UnlockedStore,
        config: &Config,
        store: &Arc<Store>,
        matrix: &Arc<MatrixClient>,
        metrics: &Arc<Metrics>,
        work: &Arc<tokio::sync::Notify>,
    ) -> Result<Crypto, CryptoError> {
        let known_device = store.get(DEVICE_ID_KEY)?;
        let device_id = match &unlocked.device {
            Some(device) => {
                if known_device.as_deref() != Some(device.as_str()) {
                    tracing::info!(device_id = %device, "the state database does not name this device (was state.sqlite3 lost?); using the crypto store's own");
                    store.set(DEVICE_ID_KEY, device.as_str())?;
                }
                device.clone()
            }
            None => {
                if let Some(old) = &known_device {
                    tracing::warn!(device_id = %old, "the crypto store for this device is gone; making a new device");
                }
                let device = new_device_id();
                matrix
                    .send_without_device({
                        let mut r = update_device::v3::Request::new(device.clone());
                        r.display_name = Some(config.display_name.clone());
                        r
                    })
                    .await?;
                store.set(DEVICE_ID_KEY, device.as_str())?;
                tracing::info!(device_id = %device, "created the bot's device");
                device
            }
        };
        let machine = OlmMachine::with_store(&config.bot_user_id, &device_id, unlocked.store.clone(), None).await?;
        unlocked.device = Some(device_id.clone());
        matrix.set_device_id(Some(device_id.clone()));
        tracing::info!(device_id = %device_id, ed25519 = %machine.identity_keys().ed25519, "encryption ready");
        Ok(Crypto {
            machine,
            matrix: matrix.clone(),
            metrics: metrics.clone(),
            store: store.clone(),
            work: work.clone(),
            outgoing: AsyncMutex::new(()),
            room_locks: Default::default(),
            fed_key_counts: Default::default(),
        })
    }

    /// The bot's device id.
    pub fn device_id(&self) -> &ruma::DeviceId {
        self.machine.device_id()
    }

    async fn server_has_our_keys(&self) -> Result<bool, CryptoError> {
        let mut request = get_keys::v3::Request::new();
        request.device_keys.insert(self.matrix.bot().clone(), vec![self.machine.device_id().to_owned()]);
        // NB: not as our device: Synapse refuses to masquerade as a device it no longer has.
        let response = self.matrix.send_without_device(request).await?;
        let ours = self.machine.identity_keys().ed25519.to_base64();
        let found = response
            .device_keys
            .get(self.matrix.bot())
            .and_then(|d| d.get(self.machine.device_id()))
            .and_then(|raw| raw.deserialize().ok())
            .map(|keys| keys.keys.values().any(|k| *k == ours));
        Ok(found.unwrap_or(false))
    }

    async fn ensure_cross_signing(&self) -> Result<(), CryptoError> {
        if self.machine.cross_signing_status().await.is_complete() {
            return Ok(());
        }
        let requests = self.machine.bootstrap_cross_signing(false).await?;
        if let Some(upload) = requests.upload_keys_req {
            self.send_request(&upload).await?;
        }
        let signing = requests.upload_signing_keys_req;
        let mut upload = upload_signing_keys::v3::Request::new();
        upload.master_key = signing.master_key.map(|k| k.to_raw());
        upload.self_signing_key = signing.self_signing_key.map(|k| k.to_raw());
        upload.user_signing_key = signing.user_signing_key.map(|k| k.to_raw());
        self.matrix.send(upload).await?;
        self.matrix.send(requests.upload_signatures_req).await?;
        tracing::info!("cross-signed the bot's device");
        Ok(())
    }

    /// Takes in a transaction's end-to-end encryption data (to-device events, device lists,
    /// key counts) for our device and says whether the machine had anything new to take in.
    /// Never fails the transaction.
    pub async fn ingest(&self, txn: &Transaction) -> bool {
        let bot = self.matrix.bot();
        let device = self.machine.device_id();
        let to_device: Vec<Raw<AnyToDeviceEvent>> = txn
            .to_device
            .iter()
            .filter(|raw| {
                raw.get_field::<String>("to_user_id").ok().flatten().as_deref() == Some(bot.as_str())
                    && raw.get_field::<String>("to_device_id").ok().flatten().as_deref() == Some(device.as_str())
            })
            .map(|raw| raw.clone().cast())
            .collect();
        let mut counts: BTreeMap<OneTimeKeyAlgorithm, UInt> = BTreeMap::new();
        if let Some(ours) = txn.device_one_time_keys_count.get(bot).and_then(|d| d.get(device)) {
            counts = ours.clone();
            // NB: 0.18.0 reads a missing signed_curve25519 as "no change"; Synapse sends `{}`
            // when none are left, which must read as zero or keys are never replenished.
            counts.entry(OneTimeKeyAlgorithm::SignedCurve25519).or_insert(UInt::MIN);
        }
        let fallback = txn.device_unused_fallback_key_types.get(bot).and_then(|d| d.get(device)).cloned();
        let mut lists = DeviceLists::new();
        lists.changed = txn.device_lists.changed.clone();
        lists.left = txn.device_lists.left.clone();
        let key_counts = (counts, fallback);
        let news =
            is_news(to_device.len(), &lists, &key_counts, self.fed_key_counts.lock().expect("not poisoned").as_ref());
        if !news {
            return false;
        }
        let (counts, fallback) = &key_counts;
        let changes = EncryptionSyncChanges {
            to_device_events: to_device,
            changed_devices: &lists,
            one_time_keys_counts: counts,
            unused_fallback_keys: fallback.as_deref(),
            next_batch_token: None,
        };
        match self.machine.receive_sync_changes(changes, &decryption_settings()).await {
            Ok((_, room_keys)) => {
                *self.fed_key_counts.lock().expect("not poisoned") = Some(key_counts);
                let mut requeued = 0;
                for key in room_keys {
                    self.metrics.crypto("room_key_received");
                    match self.store.requeue_undecrypted(&key.session_id) {
                        Ok(n) => requeued += n,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot requeue events waiting for a room key")
                        }
                    }
                }
                if requeued > 0 {
                    tracing::debug!(events = requeued, "room keys arrived for waiting events");
                    self.work.notify_one();
                }
            }
            Err(e) => {
                self.metrics.error("crypto");
                tracing::error!(error = %e, "could not take in the transaction's encryption data");
            }
        }
        true
    }

    /// Sends every outgoing request of the machine (serialised) and marks each sent.
    pub async fn flush(&self) {
        let _serial = self.outgoing.lock().await;
        let requests = match self.machine.outgoing_requests().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the crypto machine's outgoing requests");
                return;
            }
        };
        for request in requests {
            if let Err(e) = self.send_request(&request).await {
                self.metrics.error("crypto_request");
                tracing::warn!(error = %e, request_id = %request.request_id(), "an encryption request failed; it is retried later");
            }
        }
    }

    async fn send_request(&self, request: &OutgoingRequest) -> Result<(), CryptoError> {
        let id = request.request_id();
        match request.request() {
            AnyOutgoingRequest::KeysUpload(r) => {
                let response = self.matrix.send(r.clone()).await?;
                self.metrics.crypto("keys_uploaded");
                self.machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::KeysQuery(r) => {
                let mut query = get_keys::v3::Request::new();
                query.device_keys = r.device_keys.clone();
                query.timeout = r.timeout;
                let response = self.matrix.send(query).await?;
                self.machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::KeysClaim(r) => {
                let response = self.matrix.send(r.clone()).await?;
                self.machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::ToDeviceRequest(r) => {
                let response = self.send_to_device(r).await?;
                self.machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::SignatureUpload(r) => {
                let response = self.matrix.send(r.clone()).await?;
                self.machine.mark_request_as_sent(id, &response).await?;
            }
            AnyOutgoingRequest::RoomMessage(r) => {
                let send = send_message_event::v3::Request::new(r.room_id.clone(), r.txn_id.clone(), &*r.content)
                    .map_err(|e| MatrixError::Build(e.to_string()))?;
                let response = self.matrix.send(send).await?;
                self.machine.mark_request_as_sent(id, AnyIncomingResponse::RoomMessage(&response)).await?;
            }
        }
        Ok(())
    }

    async fn send_to_device(&self, r: &ToDeviceRequest) -> Result<send_event_to_device::v3::Response, MatrixError> {
        let request =
            send_event_to_device::v3::Request::new_raw(r.event_type.clone(), r.txn_id.clone(), r.messages.clone());
        self.matrix.send(request).await
    }

    /// Decrypts an `m.room.encrypted` event of `room`.
    pub async fn decrypt(&self, event_json: &str, room: &RoomId) -> Decryption {
        let raw = match Raw::<EncryptedEvent>::from_json_string(event_json.to_owned()) {
            Ok(raw) => raw,
            Err(e) => return Decryption::Failed(e.to_string()),
        };
        match self.machine.try_decrypt_room_event(&raw, room, &decryption_settings()).await {
            Ok(RoomEventDecryptionResult::Decrypted(d)) => {
                let position = MegolmPosition::of_event(event_json).filter(|p| {
                    // NB: the session id in the outer content is the one the machine used.
                    d.encryption_info.session_id() == Some(p.session_id.as_str())
                });
                Decryption::Decrypted { event: d.event, info: d.encryption_info, position }
            }
            Ok(RoomEventDecryptionResult::UnableToDecrypt(info)) => {
                self.metrics.crypto("decryption_failed");
                use matrix_sdk_common::deserialized_responses::UnableToDecryptReason as R;
                match info.reason {
                    R::MissingMegolmSession { .. } | R::UnknownMegolmMessageIndex => {
                        Decryption::MissingKey { session_id: info.session_id }
                    }
                    other => Decryption::Failed(format!("{other:?}")),
                }
            }
            Err(e) => Decryption::Failed(e.to_string()),
        }
    }

    /// Asks the homeserver for `user`'s current devices (a device that just appeared may
    /// not be known yet when its first message arrives).
    pub async fn refresh_devices(&self, user: &UserId) -> Result<(), CryptoError> {
        let (id, request) = self.machine.query_keys_for_users([user]);
        let mut query = get_keys::v3::Request::new();
        query.device_keys = request.device_keys;
        let response = self.matrix.send(query).await?;
        self.machine.mark_request_as_sent(&id, &response).await?;
        Ok(())
    }

    /// Checks the sending device against the trust policy; `Err` is the reply to give. Under
    /// both policies the sender's cross-signing identity is pinned on first sight (the machine
    /// keeps the pin): while it differs from the pinned one, the sender is refused until another
    /// allowed user approves the new one. `cross-signed` also needs the device to be signed by
    /// that identity.
    pub async fn check_trust(&self, info: &EncryptionInfo, policy: TrustPolicy) -> Result<(), String> {
        let sender = &info.sender;
        let identity = match self.machine.get_identity(sender, None).await {
            Ok(identity) => identity,
            Err(e) => return Err(format!("I could not check {sender}'s encryption identity ({e}); try again.")),
        };
        if let Some(UserIdentity::Other(identity)) = &identity
            && identity.identity_needs_user_approval()
        {
            let key = identity.master_key().get_first_key().map(|k| k.to_base64()).unwrap_or_default();
            return Err(format!(
                "I won't act on commands from {sender} right now: their encryption identity changed since I first saw it. \
                 The new identity's key is {}. If that is expected (a new login after a reset), another allowed user who \
                 has checked this key with {sender} can send `approve {sender} KEY` with at least its first {} characters.",
                grouped(&key),
                crate::commands::MIN_FINGERPRINT
            ));
        }
        match policy {
            TrustPolicy::Tofu => Ok(()),
            TrustPolicy::CrossSigned => {
                let Some(device_id) = &info.sender_device else {
                    return Err("I cannot tell which device sent this, so I won't act on it.".into());
                };
                let signed = || async {
                    self.machine
                        .get_device(sender, device_id, None)
                        .await
                        .map(|d| d.is_some_and(|d| d.is_cross_signed_by_owner()))
                };
                let mut answer = signed().await;
                if matches!(answer, Ok(false)) {
                    // NB: what we know of the sender's keys may predate the signature (seen with
                    // a device signed just before its first message): ask once more.
                    if let Err(e) = self.refresh_devices(sender).await {
                        tracing::debug!(error = %e, "could not refresh the sender's devices");
                    }
                    answer = signed().await;
                }
                match answer {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "I only take commands from devices their owner has verified (TRUST_POLICY=cross-signed), and {device_id} is not: \
                         verify this session from one of your other sessions, then send the command again."
                    )),
                    Err(e) => Err(format!("I could not check your device ({e}); try again.")),
                }
            }
        }
    }

    /// Accepts `user`'s changed identity if its key starts with `quoted` (the `approve`
    /// command).
    pub async fn approve_identity(&self, user: &UserId, quoted: &str) -> Result<Approval, CryptoError> {
        match self.machine.get_identity(user, None).await? {
            Some(UserIdentity::Other(identity)) if identity.identity_needs_user_approval() => {
                let key = identity.master_key().get_first_key().map(|k| k.to_base64()).unwrap_or_default();
                if quoted.len() < crate::commands::MIN_FINGERPRINT || !key.starts_with(quoted) {
                    return Ok(Approval::KeyMismatch { key: grouped(&key) });
                }
                identity.pin_current_master_key().await?;
                Ok(Approval::Approved)
            }
            _ => Ok(Approval::NothingToApprove),
        }
    }

    fn room_lock(&self, room: &RoomId) -> Arc<AsyncMutex<()>> {
        let mut locks = self.room_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(room.to_owned()).or_default().clone()
    }

    /// Encrypts `content` for the room's members and sends it as `m.room.encrypted`.
    pub async fn send_encrypted(
        &self,
        room: &RoomId,
        members: &[OwnedUserId],
        history_visibility: HistoryVisibility,
        content: Raw<AnyMessageLikeEventContent>,
        txn_id: OwnedTransactionId,
    ) -> Result<(), CryptoError> {
        let lock = self.room_lock(room);
        let _serial = lock.lock().await;
        let members: Vec<OwnedUserId> = members.iter().filter(|u| *u != self.matrix.bot()).cloned().collect();
        // NB: boxed as Send: awaiting this directly inside a spawned task does not compile.
        let track: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
            Box::pin(self.machine.update_tracked_users(members.iter().map(AsRef::as_ref)));
        track.await?;
        self.flush().await;
        if let Some((id, claim)) = self.machine.get_missing_sessions(members.iter().map(AsRef::as_ref)).await? {
            let response = self.matrix.send(claim).await?;
            self.machine.mark_request_as_sent(&id, &response).await?;
        }
        let settings = EncryptionSettings::new(
            RoomEncryptionEventContent::with_recommended_defaults(),
            history_visibility,
            CollectStrategy::ErrorOnVerifiedUserProblem,
        );
        let shares = self.machine.share_room_key(room, members.iter().map(AsRef::as_ref), settings).await?;
        for share in shares {
            match self.send_to_device(&share).await {
                Ok(response) => {
                    self.metrics.crypto("room_key_shared");
                    self.machine.mark_request_as_sent(&share.txn_id, &response).await?;
                }
                Err(e) => {
                    // NB: a session some members never got must not be used again.
                    self.machine.discard_room_key(room).await?;
                    return Err(e.into());
                }
            }
        }
        let encrypted = self.machine.encrypt_room_event_raw(room, "m.room.message", &content).await?;
        let request = send_message_event::v3::Request::new_raw(
            room.to_owned(),
            txn_id,
            MessageLikeEventType::RoomEncrypted,
            encrypted.content.cast(),
        );
        self.matrix.send(request).await?;
        Ok(())
    }
}

/// Moves a crypto store directory aside so a new one can be made.
fn set_aside(dir: &Path) -> Result<(), CryptoError> {
    if !dir.exists() {
        return Ok(());
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let aside = PathBuf::from(format!("{}.replaced-{stamp}", dir.display()));
    std::fs::rename(dir, &aside).map_err(|source| CryptoError::File { path: dir.display().to_string(), source })?;
    tracing::warn!(moved_to = %aside.display(), "set the old crypto store aside");
    Ok(())
}

/// Deletes the bot's devices other than `keep` (left over from lost stores).
async fn delete_other_devices(matrix: &MatrixClient, keep: &ruma::DeviceId) {
    let devices = match matrix.send_without_device(get_devices::v3::Request::new()).await {
        Ok(r) => r.devices,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the bot's devices");
            return;
        }
    };
    for device in devices.into_iter().filter(|d| d.device_id != keep) {
        match matrix.send_without_device(delete_device::v3::Request::new(device.device_id.clone())).await {
            Ok(_) => tracing::info!(device_id = %device.device_id, "deleted an old bot device"),
            Err(e) => {
                tracing::warn!(device_id = %device.device_id, error = %e, "could not delete an old bot device")
            }
        }
    }
}

/// How long a refused E2EE setup waits before trying again.
pub const RETRY_SETUP: Duration = Duration::from_secs(5);

/// Where the crypto machine becomes available once set up; it also takes in transactions.
#[derive(Debug)]
pub struct CryptoCell {
    tx: tokio::sync::watch::Sender<Option<Arc<Crypto>>>,
    without_key_counts: std::sync::atomic::AtomicU32,
}

impl Default for CryptoCell {
    fn default() -> Self {
        Self { tx: tokio::sync::watch::channel(None).0, without_key_counts: Default::default() }
    }
}

/// Transactions with room events but no key counts after which the MSC3202 settings are
/// reported missing.
const MISSING_COUNTS_WARNING_AFTER: u32 = 3;

/// How long a transaction waits for the crypto machine to be set up.
const INGEST_WAIT: Duration = Duration::from_secs(30);

impl CryptoCell {
    /// Makes the machine available.
    pub fn set(&self, crypto: Arc<Crypto>) {
        self.tx.send_replace(Some(crypto));
    }

    /// The machine, if set up.
    pub fn get(&self) -> Option<Arc<Crypto>> {
        self.tx.borrow().clone()
    }

    /// The machine, waiting up to `timeout` for it to be set up.
    pub async fn wait(&self, timeout: Duration) -> Option<Arc<Crypto>> {
        let mut rx = self.tx.subscribe();
        let ready = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
        ready.ok().and_then(|r| r.ok().map(|v| v.clone())).flatten()
    }
}

impl CryptoCell {
    /// Warns once when Synapse sends room events but never key counts: the MSC3202 settings
    /// are missing on one side (there is no other way to detect them).
    fn notice_missing_key_counts(&self, txn: &Transaction) {
        use std::sync::atomic::Ordering;
        if !txn.device_one_time_keys_count.is_empty() {
            self.without_key_counts.store(u32::MAX, Ordering::Relaxed);
            return;
        }
        if txn.events.is_empty() || self.get().is_none() {
            return;
        }
        let seen = self.without_key_counts.load(Ordering::Relaxed);
        if seen == u32::MAX {
            return;
        }
        self.without_key_counts.store(seen + 1, Ordering::Relaxed);
        if seen + 1 == MISSING_COUNTS_WARNING_AFTER {
            tracing::warn!(
                "Synapse sends no one-time-key counts or device lists, so encrypted rooms will fail: set \
                 `experimental_features: {{msc3202_transaction_extensions: true, msc2409_to_device_messages_enabled: true}}` \
                 in homeserver.yaml and `org.matrix.msc3202: true` and `receive_ephemeral: true` in the registration, then restart Synapse"
            );
        }
    }
}

impl crate::appservice::TransactionSink for CryptoCell {
    fn is_ready(&self) -> bool {
        self.get().is_some()
    }

    fn ingest<'a>(
        &'a self,
        txn: &'a Transaction,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            self.notice_missing_key_counts(txn);
            let has_crypto_data =
                !txn.to_device.is_empty() || !txn.device_one_time_keys_count.is_empty() || !txn.device_lists.is_empty();
            if !has_crypto_data {
                return;
            }
            let Some(crypto) = self.wait(INGEST_WAIT).await else {
                tracing::error!("encryption is not set up; this transaction's room keys are lost");
                return;
            };
            if crypto.ingest(txn).await {
                tokio::spawn(async move { crypto.flush().await });
            }
        })
    }
}

/// Whether a transaction tells the machine anything: to-device events, device-list changes,
/// or key counts other than the ones it was last given. Synapse repeats the counts in every
/// transaction, and feeding the same ones again costs a crypto store write for nothing.
fn is_news(to_device: usize, lists: &DeviceLists, counts: &KeyCounts, last: Option<&KeyCounts>) -> bool {
    let no_counts = counts.0.is_empty() && counts.1.is_none();
    to_device > 0 || !lists.is_empty() || (!no_counts && last != Some(counts))
}

/// Sets up encryption on the unlocked store in the background, retrying while the homeserver
/// is unreachable.
pub async fn start_in_background(
    cell: Arc<CryptoCell>,
    mut unlocked: UnlockedStore,
    config: Arc<Config>,
    store: Arc<Store>,
    matrix: Arc<MatrixClient>,
    metrics: Arc<Metrics>,
    work: Arc<tokio::sync::Notify>,
) {
    loop {
        match Crypto::start(&config, &mut unlocked, store.clone(), matrix.clone(), metrics.clone(), work.clone()).await
        {
            Ok(crypto) => {
                cell.set(crypto);
                work.notify_one();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_s = RETRY_SETUP.as_secs(), "could not set up encryption; retrying");
                tokio::time::sleep(RETRY_SETUP).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::owned_user_id;

    use super::*;

    fn counts(signed: u32, fallback: bool) -> KeyCounts {
        let counts = BTreeMap::from([(OneTimeKeyAlgorithm::SignedCurve25519, UInt::from(signed))]);
        (counts, fallback.then(|| vec![OneTimeKeyAlgorithm::SignedCurve25519]))
    }

    #[test]
    fn the_same_key_counts_again_are_not_news_but_changed_ones_are() {
        let none = DeviceLists::new();
        assert!(is_news(0, &none, &counts(50, true), None));
        assert!(!is_news(0, &none, &counts(50, true), Some(&counts(50, true))));
        assert!(is_news(0, &none, &counts(49, true), Some(&counts(50, true))));
        assert!(is_news(0, &none, &counts(50, false), Some(&counts(50, true))));
    }

    #[test]
    fn to_device_events_and_device_list_changes_are_news_even_with_the_same_counts() {
        let same = counts(50, true);
        assert!(is_news(1, &DeviceLists::new(), &same, Some(&same)));
        let mut changed = DeviceLists::new();
        changed.changed.push(owned_user_id!("@alice:localhost"));
        assert!(is_news(0, &changed, &same, Some(&same)));
    }

    #[test]
    fn a_transaction_without_any_encryption_data_is_not_news() {
        let empty: KeyCounts = (BTreeMap::new(), None);
        assert!(!is_news(0, &DeviceLists::new(), &empty, None));
    }
}
