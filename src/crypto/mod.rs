//! The one owner of the `OlmMachine`: it takes in each transaction's to-device events, device
//! lists and key counts, sends the machine's outgoing requests masquerading as our device,
//! decrypts room events, checks trust, and encrypts replies. It knows neither the state
//! database nor the worker. Also here: `device` (the device lifecycle: store key, create, set
//! aside, cross-signing), `read_cache` (identities and devices read once from the crypto
//! store, not on every message) and `sink` (the transaction sink, requeueing and the MSC3202
//! warning).

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

mod device;
mod read_cache;
mod sink;

pub use device::{RETRY_SETUP, UnlockedStore, start_in_background};
use read_cache::ReadCache;
pub use sink::CryptoCell;
use sink::is_news;

use crate::{
    appservice::Transaction,
    config::{Config, TrustPolicy},
    matrix::{MatrixClient, MatrixError},
    metrics::Metrics,
    policy::TrustRefusal,
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

/// The bot's encryption state.
pub struct Crypto {
    machine: OlmMachine,
    matrix: Arc<MatrixClient>,
    metrics: Arc<Metrics>,
    outgoing: AsyncMutex<()>,
    room_locks: std::sync::Mutex<HashMap<OwnedRoomId, Arc<AsyncMutex<()>>>>,
    fed_key_counts: std::sync::Mutex<Option<KeyCounts>>,
    /// Bumped whenever news of devices comes from outside a message's preparation: encryption
    /// data taken in from a transaction, or a keys query of the trust check.
    devices_epoch: std::sync::atomic::AtomicU64,
    /// Per room, the members a message was last encrypted for and the `devices_epoch` then:
    /// while both are the same, their devices are tracked and have Olm sessions already.
    prepared: std::sync::Mutex<HashMap<OwnedRoomId, (Vec<OwnedUserId>, u64)>>,
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

impl Crypto {
    /// The bot's device id.
    pub fn device_id(&self) -> &ruma::DeviceId {
        self.machine.device_id()
    }

    /// Takes in a transaction's end-to-end encryption data (to-device events, device lists,
    /// key counts) for our device. `None` when there was nothing new; else the Megolm session
    /// ids of the room keys that came (the caller requeues what waited for them). Never fails
    /// the transaction.
    pub async fn ingest(&self, txn: &Transaction) -> Option<Vec<String>> {
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
            return None;
        }
        self.devices_changed();
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
                for _ in &room_keys {
                    self.metrics.crypto("room_key_received");
                }
                Some(room_keys.into_iter().map(|k| k.session_id).collect())
            }
            Err(e) => {
                self.metrics.error("crypto");
                tracing::error!(error = %e, "could not take in the transaction's encryption data");
                Some(Vec::new())
            }
        }
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
                // NB: no devices_changed() here: a query in flight when a message is prepared
                // ends before its own flush (one at a time), so the preparation sees its answer.
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
        self.devices_changed();
        self.machine.mark_request_as_sent(&id, &response).await?;
        Ok(())
    }

    /// Notes that what the machine knows of devices may have changed, so the next message to
    /// each room checks its members' devices again.
    fn devices_changed(&self) {
        self.devices_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Checks the sending device against the trust policy; `Err` is the reply to give. Under
    /// both policies the sender's cross-signing identity is pinned on first sight (the machine
    /// keeps the pin): while it differs from the pinned one, the sender is refused until another
    /// allowed user approves the new one. `cross-signed` also needs the device to be signed by
    /// that identity.
    pub async fn check_trust(&self, info: &EncryptionInfo, policy: TrustPolicy) -> Result<(), TrustRefusal> {
        let sender = &info.sender;
        let identity = match self.machine.get_identity(sender, None).await {
            Ok(identity) => identity,
            Err(e) => return Err(TrustRefusal::CheckFailed(e.to_string())),
        };
        if let Some(UserIdentity::Other(identity)) = &identity
            && identity.identity_needs_user_approval()
        {
            let key = identity.master_key().get_first_key().map(|k| k.to_base64()).unwrap_or_default();
            return Err(TrustRefusal::IdentityChanged { user: sender.clone(), key: grouped(&key) });
        }
        match policy {
            TrustPolicy::Tofu => Ok(()),
            TrustPolicy::CrossSigned => {
                let Some(device_id) = &info.sender_device else {
                    return Err(TrustRefusal::UnknownDevice);
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
                    Ok(false) => Err(TrustRefusal::DeviceNotCrossSigned { device: device_id.clone() }),
                    Err(e) => Err(TrustRefusal::CheckFailed(e.to_string())),
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
        let epoch = self.devices_epoch.load(std::sync::atomic::Ordering::SeqCst);
        let prepared = self.prepared.lock().unwrap_or_else(|e| e.into_inner()).remove(room);
        // NB: with the same members and no device news since the last message here, tracking
        // them, querying their keys and claiming one-time keys would find nothing to do: three
        // crypto-store passes saved per message. share_room_key still runs, for rotation and
        // for what it checks of each device.
        if prepared.as_ref() != Some(&(members.clone(), epoch)) {
            // NB: boxed as Send: awaiting this directly inside a spawned task does not compile.
            let track: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send + '_>> =
                Box::pin(self.machine.update_tracked_users(members.iter().map(AsRef::as_ref)));
            track.await?;
            self.flush().await;
            if let Some((id, claim)) = self.machine.get_missing_sessions(members.iter().map(AsRef::as_ref)).await? {
                let response = self.matrix.send(claim).await?;
                self.machine.mark_request_as_sent(&id, &response).await?;
            }
        } else {
            self.metrics.crypto("devices_unchanged");
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
        self.prepared.lock().unwrap_or_else(|e| e.into_inner()).insert(room.to_owned(), (members, epoch));
        Ok(())
    }
}
