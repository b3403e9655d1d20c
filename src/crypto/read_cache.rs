//! A read cache for users' cross-signing identities and devices in front of the crypto store.
//!
//! matrix-sdk-crypto rereads the sender's and the bot's own identity from the store for every
//! device it looks at, and a user's devices for every message it decrypts or encrypts: about
//! eleven of a command's thirteen store calls, each a trip through the SQLite pool, a blocking
//! thread and the store cipher. This wrapper answers those reads from memory once made and
//! forwards everything else unchanged.
//!
//! It keeps each identity and device serialized, as matrix-sdk-crypto's own memory store does
//! for identities, so every read hands out a fresh value: an identity's pin and verification
//! flags and a device's trust and deletion flags are shared by its clones, and a change the
//! machine makes to one copy without saving it must not reach the next reader. A user's
//! entries are dropped when `save_changes` carries that user's identity (new, changed or
//! unchanged) or one of their devices (new, changed or deleted), and the whole cache when the
//! store is closed or reopened; a read that raced with such a save does not fill the cache.
//! Past [`MAX_BYTES`] of JSON the cache starts again empty.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use matrix_sdk_common::cross_process_lock::CrossProcessLockGeneration;
use matrix_sdk_crypto::{
    Account, DeviceData, GossipRequest, SecretInfo, UserIdentityData,
    olm::{
        InboundGroupSession, OlmMessageHash, OutboundGroupSession, PrivateCrossSigningIdentity, SenderDataType, Session,
    },
    store::{
        CryptoStore, CryptoStoreError,
        types::{
            BackupKeys, Changes, DehydratedDeviceKey, PendingChanges, RoomKeyCounts, RoomKeyWithheldEntry,
            RoomPendingKeyBundleDetails, RoomSettings, StoredRoomKeyBundleData, TrackedUser,
        },
    },
    vodozemac::Curve25519PublicKey,
};
use ruma::{DeviceId, OwnedDeviceId, OwnedUserId, RoomId, TransactionId, UserId, events::secret::request::SecretName};
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

/// Bytes of JSON kept at most (a few thousand users); past this the cache starts again empty,
/// so users and devices without end (a homeserver can make as many as it likes) cost no more.
const MAX_BYTES: usize = 8 << 20;

type Result<T, E = CryptoStoreError> = std::result::Result<T, E>;

/// A user's devices as JSON, by device id.
type DeviceJson = HashMap<OwnedDeviceId, String>;

/// What the cache holds, behind one lock.
struct Entries {
    /// Each user's identity as JSON, or `None` when the store has none.
    identities: HashMap<OwnedUserId, Option<String>>,
    /// Each user's devices, all of them as the store has them.
    devices: HashMap<OwnedUserId, DeviceJson>,
    /// Bumped by every save or reopen that drops entries, so a read that started before it
    /// does not put back what it read.
    generation: u64,
    /// Bytes of JSON held, and the most that may be.
    bytes: usize,
    max_bytes: usize,
}

impl Default for Entries {
    fn default() -> Self {
        Self { identities: HashMap::new(), devices: HashMap::new(), generation: 0, bytes: 0, max_bytes: MAX_BYTES }
    }
}

fn identity_bytes(json: &Option<String>) -> usize {
    json.as_ref().map_or(0, String::len)
}

fn devices_bytes(devices: &DeviceJson) -> usize {
    devices.values().map(String::len).sum()
}

impl Entries {
    /// Makes room for `bytes` more; false when they would not fit even in an empty cache.
    fn make_room(&mut self, bytes: usize) -> bool {
        if bytes > self.max_bytes {
            return false;
        }
        if self.bytes + bytes > self.max_bytes {
            self.clear();
        }
        true
    }

    fn insert_identity(&mut self, user_id: &UserId, json: Option<String>) {
        if let Some(old) = self.identities.remove(user_id) {
            self.bytes = self.bytes.saturating_sub(identity_bytes(&old));
        }
        if self.make_room(identity_bytes(&json)) {
            self.bytes += identity_bytes(&json);
            self.identities.insert(user_id.to_owned(), json);
        }
    }

    fn insert_devices(&mut self, user_id: &UserId, devices: DeviceJson) {
        if let Some(old) = self.devices.remove(user_id) {
            self.bytes = self.bytes.saturating_sub(devices_bytes(&old));
        }
        if self.make_room(devices_bytes(&devices)) {
            self.bytes += devices_bytes(&devices);
            self.devices.insert(user_id.to_owned(), devices);
        }
    }

    /// Drops everything cached for `user_id`.
    fn remove(&mut self, user_id: &UserId) {
        let identity = self.identities.remove(user_id).map_or(0, |j| identity_bytes(&j));
        let devices = self.devices.remove(user_id).map_or(0, |d| devices_bytes(&d));
        self.bytes = self.bytes.saturating_sub(identity + devices);
    }

    fn clear(&mut self) {
        self.identities.clear();
        self.devices.clear();
        self.bytes = 0;
    }
}

/// The answer of the cache alone.
enum Lookup<T> {
    /// Cached: a fresh copy of what the store holds.
    Hit(Result<T>),
    /// Not cached; the generation a read from the store must bring back to fill it.
    Miss(u64),
}

/// A crypto store whose user-identity and device reads are answered from memory once made.
pub struct ReadCache<S> {
    inner: S,
    entries: Mutex<Entries>,
    store_reads: AtomicU64,
}

impl<S> ReadCache<S> {
    /// Wraps `inner`, with nothing cached yet.
    pub fn new(inner: S) -> Self {
        Self { inner, entries: Mutex::default(), store_reads: AtomicU64::new(0) }
    }

    /// How many identity and device reads reached the wrapped store.
    #[cfg(test)]
    pub fn store_reads(&self) -> u64 {
        self.store_reads.load(Ordering::Relaxed)
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the entries of `users` (all entries when `None`) and fences off reads in flight.
    fn forget(&self, users: Option<Vec<OwnedUserId>>) {
        let mut entries = self.entries();
        entries.generation += 1;
        match users {
            Some(users) => {
                for user in users {
                    entries.remove(&user);
                }
            }
            None => entries.clear(),
        }
    }

    /// Answers from the cache alone: `read` decodes what it needs, or says it is not cached.
    fn lookup<T>(&self, read: impl FnOnce(&Entries) -> Option<Result<T>>) -> Lookup<T> {
        let entries = self.entries();
        match read(&entries) {
            Some(hit) => Lookup::Hit(hit),
            None => Lookup::Miss(entries.generation),
        }
    }

    fn lookup_identity(&self, user_id: &UserId) -> Lookup<Option<UserIdentityData>> {
        self.lookup(|entries| entries.identities.get(user_id).map(|json| json.as_deref().map(decode).transpose()))
    }

    /// Caches what a store read that began at `generation` returned, unless a save or reopen
    /// came in between.
    fn fill(&self, generation: u64, fill: impl FnOnce(&mut Entries)) {
        let mut entries = self.entries();
        if entries.generation == generation {
            fill(&mut entries);
        }
    }
}

impl<S: CryptoStore> ReadCache<S> {
    /// All of `user_id`'s devices from the store, cached unless a save came since `generation`.
    async fn read_devices(&self, user_id: &UserId, generation: u64) -> Result<HashMap<OwnedDeviceId, DeviceData>> {
        self.store_reads.fetch_add(1, Ordering::Relaxed);
        let devices = self.inner.get_user_devices(user_id).await.map_err(Into::into)?;
        let json: DeviceJson =
            devices.iter().map(|(id, d)| Ok((id.clone(), serde_json::to_string(d)?))).collect::<Result<_>>()?;
        self.fill(generation, |entries| entries.insert_devices(user_id, json));
        Ok(devices)
    }
}

/// Drops the entries of `users` from `cache` when it goes out of scope.
struct ForgetOnDrop<'a, S> {
    cache: &'a ReadCache<S>,
    users: Vec<OwnedUserId>,
}

impl<S> Drop for ForgetOnDrop<'_, S> {
    fn drop(&mut self) {
        self.cache.forget(Some(std::mem::take(&mut self.users)));
    }
}

impl<S: fmt::Debug> fmt::Debug for ReadCache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadCache").field("inner", &self.inner).finish_non_exhaustive()
    }
}

fn decode<T: DeserializeOwned>(json: &str) -> Result<T> {
    Ok(serde_json::from_str(json)?)
}

#[async_trait]
impl<S: CryptoStore> CryptoStore for ReadCache<S> {
    type Error = CryptoStoreError;

    async fn get_user_identity(&self, user_id: &UserId) -> Result<Option<UserIdentityData>> {
        let generation = match self.lookup_identity(user_id) {
            Lookup::Hit(identity) => return identity,
            Lookup::Miss(generation) => generation,
        };
        self.store_reads.fetch_add(1, Ordering::Relaxed);
        let identity = self.inner.get_user_identity(user_id).await.map_err(Into::into)?;
        let json = identity.as_ref().map(serde_json::to_string).transpose()?;
        self.fill(generation, |entries| entries.insert_identity(user_id, json));
        Ok(identity)
    }

    async fn get_user_devices(&self, user_id: &UserId) -> Result<HashMap<OwnedDeviceId, DeviceData>> {
        let cached = self.lookup(|entries| {
            let devices = entries.devices.get(user_id)?;
            Some(devices.iter().map(|(id, json)| Ok((id.clone(), decode(json)?))).collect())
        });
        match cached {
            Lookup::Hit(devices) => devices,
            Lookup::Miss(generation) => self.read_devices(user_id, generation).await,
        }
    }

    async fn get_device(&self, user_id: &UserId, device_id: &DeviceId) -> Result<Option<DeviceData>> {
        let cached = self.lookup(|entries| {
            let devices = entries.devices.get(user_id)?;
            Some(devices.get(device_id).map(|json| decode(json)).transpose())
        });
        match cached {
            Lookup::Hit(device) => device,
            Lookup::Miss(generation) => Ok(self.read_devices(user_id, generation).await?.remove(device_id)),
        }
    }

    async fn save_changes(&self, changes: Changes) -> Result<()> {
        let (ids, devices) = (&changes.identities, &changes.devices);
        let identity_users = ids.new.iter().chain(&ids.changed).chain(&ids.unchanged).map(|i| i.user_id());
        let device_users = devices.new.iter().chain(&devices.changed).chain(&devices.deleted).map(|d| d.user_id());
        let touched: Vec<OwnedUserId> = identity_users.chain(device_users).map(ToOwned::to_owned).collect();
        // NB: dropped after the save, or when the save is cancelled halfway, so that what it
        // may have written is never shadowed by what was cached before.
        let _forget = (!touched.is_empty()).then(|| ForgetOnDrop { cache: self, users: touched });
        self.inner.save_changes(changes).await.map_err(Into::into)
    }

    async fn close(&self) -> Result<()> {
        self.forget(None);
        self.inner.close().await.map_err(Into::into)
    }

    async fn reopen(&self) -> Result<()> {
        let reopened = self.inner.reopen().await.map_err(Into::into);
        self.forget(None);
        reopened
    }

    // Everything below is forwarded unchanged.

    async fn load_account(&self) -> Result<Option<Account>> {
        self.inner.load_account().await.map_err(Into::into)
    }

    async fn load_identity(&self) -> Result<Option<PrivateCrossSigningIdentity>> {
        self.inner.load_identity().await.map_err(Into::into)
    }

    async fn save_pending_changes(&self, changes: PendingChanges) -> Result<()> {
        self.inner.save_pending_changes(changes).await.map_err(Into::into)
    }

    async fn save_inbound_group_sessions(
        &self,
        sessions: Vec<InboundGroupSession>,
        backed_up_to_version: Option<&str>,
    ) -> Result<()> {
        self.inner.save_inbound_group_sessions(sessions, backed_up_to_version).await.map_err(Into::into)
    }

    async fn get_sessions(&self, sender_key: &str) -> Result<Option<Vec<Session>>> {
        self.inner.get_sessions(sender_key).await.map_err(Into::into)
    }

    async fn get_inbound_group_session(
        &self,
        room_id: &RoomId,
        session_id: &str,
    ) -> Result<Option<InboundGroupSession>> {
        self.inner.get_inbound_group_session(room_id, session_id).await.map_err(Into::into)
    }

    async fn get_withheld_info(&self, room_id: &RoomId, session_id: &str) -> Result<Option<RoomKeyWithheldEntry>> {
        self.inner.get_withheld_info(room_id, session_id).await.map_err(Into::into)
    }

    async fn get_withheld_sessions_by_room_id(&self, room_id: &RoomId) -> Result<Vec<RoomKeyWithheldEntry>> {
        self.inner.get_withheld_sessions_by_room_id(room_id).await.map_err(Into::into)
    }

    async fn get_inbound_group_sessions(&self) -> Result<Vec<InboundGroupSession>> {
        self.inner.get_inbound_group_sessions().await.map_err(Into::into)
    }

    async fn inbound_group_session_counts(&self, backup_version: Option<&str>) -> Result<RoomKeyCounts> {
        self.inner.inbound_group_session_counts(backup_version).await.map_err(Into::into)
    }

    async fn get_inbound_group_sessions_by_room_id(&self, room_id: &RoomId) -> Result<Vec<InboundGroupSession>> {
        self.inner.get_inbound_group_sessions_by_room_id(room_id).await.map_err(Into::into)
    }

    async fn get_inbound_group_sessions_for_device_batch(
        &self,
        curve_key: Curve25519PublicKey,
        sender_data_type: SenderDataType,
        after_session_id: Option<String>,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inner
            .get_inbound_group_sessions_for_device_batch(curve_key, sender_data_type, after_session_id, limit)
            .await
            .map_err(Into::into)
    }

    async fn inbound_group_sessions_for_backup(
        &self,
        backup_version: &str,
        limit: usize,
    ) -> Result<Vec<InboundGroupSession>> {
        self.inner.inbound_group_sessions_for_backup(backup_version, limit).await.map_err(Into::into)
    }

    async fn mark_inbound_group_sessions_as_backed_up(
        &self,
        backup_version: &str,
        room_and_session_ids: &[(&RoomId, &str)],
    ) -> Result<()> {
        self.inner
            .mark_inbound_group_sessions_as_backed_up(backup_version, room_and_session_ids)
            .await
            .map_err(Into::into)
    }

    async fn reset_backup_state(&self) -> Result<()> {
        self.inner.reset_backup_state().await.map_err(Into::into)
    }

    async fn load_backup_keys(&self) -> Result<BackupKeys> {
        self.inner.load_backup_keys().await.map_err(Into::into)
    }

    async fn load_dehydrated_device_pickle_key(&self) -> Result<Option<DehydratedDeviceKey>> {
        self.inner.load_dehydrated_device_pickle_key().await.map_err(Into::into)
    }

    async fn delete_dehydrated_device_pickle_key(&self) -> Result<()> {
        self.inner.delete_dehydrated_device_pickle_key().await.map_err(Into::into)
    }

    async fn get_outbound_group_session(&self, room_id: &RoomId) -> Result<Option<OutboundGroupSession>> {
        self.inner.get_outbound_group_session(room_id).await.map_err(Into::into)
    }

    async fn load_tracked_users(&self) -> Result<Vec<TrackedUser>> {
        self.inner.load_tracked_users().await.map_err(Into::into)
    }

    async fn save_tracked_users(&self, users: &[(&UserId, bool)]) -> Result<()> {
        self.inner.save_tracked_users(users).await.map_err(Into::into)
    }

    async fn get_own_device(&self) -> Result<DeviceData> {
        self.inner.get_own_device().await.map_err(Into::into)
    }

    async fn is_message_known(&self, message_hash: &OlmMessageHash) -> Result<bool> {
        self.inner.is_message_known(message_hash).await.map_err(Into::into)
    }

    async fn get_outgoing_secret_requests(&self, request_id: &TransactionId) -> Result<Option<GossipRequest>> {
        self.inner.get_outgoing_secret_requests(request_id).await.map_err(Into::into)
    }

    async fn get_secret_request_by_info(&self, secret_info: &SecretInfo) -> Result<Option<GossipRequest>> {
        self.inner.get_secret_request_by_info(secret_info).await.map_err(Into::into)
    }

    async fn get_unsent_secret_requests(&self) -> Result<Vec<GossipRequest>> {
        self.inner.get_unsent_secret_requests().await.map_err(Into::into)
    }

    async fn delete_outgoing_secret_requests(&self, request_id: &TransactionId) -> Result<()> {
        self.inner.delete_outgoing_secret_requests(request_id).await.map_err(Into::into)
    }

    async fn get_secrets_from_inbox(&self, secret_name: &SecretName) -> Result<Vec<Zeroizing<String>>> {
        self.inner.get_secrets_from_inbox(secret_name).await.map_err(Into::into)
    }

    async fn delete_secrets_from_inbox(&self, secret_name: &SecretName) -> Result<()> {
        self.inner.delete_secrets_from_inbox(secret_name).await.map_err(Into::into)
    }

    async fn get_room_settings(&self, room_id: &RoomId) -> Result<Option<RoomSettings>> {
        self.inner.get_room_settings(room_id).await.map_err(Into::into)
    }

    async fn get_received_room_key_bundle_data(
        &self,
        room_id: &RoomId,
        user_id: &UserId,
    ) -> Result<Option<StoredRoomKeyBundleData>> {
        self.inner.get_received_room_key_bundle_data(room_id, user_id).await.map_err(Into::into)
    }

    async fn get_pending_key_bundle_details_for_room(
        &self,
        room_id: &RoomId,
    ) -> Result<Option<RoomPendingKeyBundleDetails>> {
        self.inner.get_pending_key_bundle_details_for_room(room_id).await.map_err(Into::into)
    }

    async fn get_all_rooms_pending_key_bundles(&self) -> Result<Vec<RoomPendingKeyBundleDetails>> {
        self.inner.get_all_rooms_pending_key_bundles().await.map_err(Into::into)
    }

    async fn has_downloaded_all_room_keys(&self, room_id: &RoomId) -> Result<bool> {
        self.inner.has_downloaded_all_room_keys(room_id).await.map_err(Into::into)
    }

    async fn get_custom_value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.inner.get_custom_value(key).await.map_err(Into::into)
    }

    async fn set_custom_value(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.inner.set_custom_value(key, value).await.map_err(Into::into)
    }

    async fn remove_custom_value(&self, key: &str) -> Result<()> {
        self.inner.remove_custom_value(key).await.map_err(Into::into)
    }

    async fn try_take_leased_lock(
        &self,
        lease_duration_ms: u32,
        key: &str,
        holder: &str,
    ) -> Result<Option<CrossProcessLockGeneration>> {
        self.inner.try_take_leased_lock(lease_duration_ms, key, holder).await.map_err(Into::into)
    }

    async fn next_batch_token(&self) -> Result<Option<String>> {
        self.inner.next_batch_token().await.map_err(Into::into)
    }

    async fn get_size(&self) -> Result<Option<usize>> {
        self.inner.get_size().await.map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use matrix_sdk_crypto::{
        LocalTrust,
        store::types::{DeviceChanges, IdentityChanges},
        vodozemac::Ed25519SecretKey,
    };
    use matrix_sdk_sqlite::SqliteCryptoStore;
    use serde_json::json;

    use super::*;

    fn alice() -> OwnedUserId {
        "@alice:example.org".try_into().unwrap()
    }

    fn key(user: &UserId, usage: &str) -> (String, serde_json::Value) {
        let public = Ed25519SecretKey::new().public_key().to_base64();
        let value = json!({ "user_id": user, "usage": [usage], "keys": { format!("ed25519:{public}"): public }, "signatures": {} });
        (public, value)
    }

    /// Another user's identity with a fresh master key; returns it and that key.
    fn identity(user: &UserId, previously_verified: bool) -> (UserIdentityData, String) {
        let (master, master_json) = key(user, "master");
        let (_, self_signing) = key(user, "self_signing");
        let data = json!({ "Other": {
            "version": "2", "user_id": user, "master_key": master_json, "self_signing_key": self_signing,
            "pinned_master_key": master_json, "previously_verified": previously_verified,
        }});
        (serde_json::from_value(data).unwrap(), master)
    }

    fn master_of(identity: &UserIdentityData) -> String {
        identity.master_key().get_first_key().unwrap().to_base64()
    }

    async fn save(cache: &ReadCache<SqliteCryptoStore>, identity: UserIdentityData, as_new: bool) {
        let identities = if as_new {
            IdentityChanges { new: vec![identity], ..Default::default() }
        } else {
            IdentityChanges { changed: vec![identity], ..Default::default() }
        };
        cache.save_changes(Changes { identities, ..Default::default() }).await.unwrap();
    }

    async fn cache(dir: &tempfile::TempDir) -> ReadCache<SqliteCryptoStore> {
        ReadCache::new(SqliteCryptoStore::open(dir.path(), Some("passphrase")).await.unwrap())
    }

    #[tokio::test]
    async fn a_second_read_of_an_identity_is_answered_from_memory_as_a_copy_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let (saved, master) = identity(&alice(), true);
        save(&cache, saved, true).await;

        let first = cache.get_user_identity(&alice()).await.unwrap().unwrap();
        let UserIdentityData::Other(first_other) = &first else { panic!("not another user's identity") };
        first_other.withdraw_verification();
        let second = cache.get_user_identity(&alice()).await.unwrap().unwrap();

        assert_eq!(cache.store_reads(), 1);
        assert_eq!(master_of(&second), master);
        let UserIdentityData::Other(second) = second else { panic!("not another user's identity") };
        assert!(second.was_previously_verified(), "a change to one reader's copy reached the next reader");
    }

    #[tokio::test]
    async fn an_identity_saved_as_changed_is_what_the_next_read_returns() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let (old, _) = identity(&alice(), false);
        save(&cache, old, true).await;
        cache.get_user_identity(&alice()).await.unwrap();

        let (new, new_master) = identity(&alice(), false);
        save(&cache, new, false).await;
        let read = cache.get_user_identity(&alice()).await.unwrap().unwrap();

        assert_eq!(master_of(&read), new_master);
        assert_eq!(cache.store_reads(), 2);
    }

    #[tokio::test]
    async fn a_user_read_without_an_identity_gets_the_one_saved_later() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        assert!(cache.get_user_identity(&alice()).await.unwrap().is_none());
        assert!(cache.get_user_identity(&alice()).await.unwrap().is_none());
        assert_eq!(cache.store_reads(), 1, "the absence of an identity is cached too");

        let (new, master) = identity(&alice(), false);
        save(&cache, new, true).await;

        assert_eq!(master_of(&cache.get_user_identity(&alice()).await.unwrap().unwrap()), master);
    }

    #[tokio::test]
    async fn a_read_that_began_before_a_save_does_not_put_back_the_old_identity() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let (old, _) = identity(&alice(), false);
        save(&cache, old.clone(), true).await;
        let Lookup::Miss(generation) = cache.lookup_identity(&alice()) else { panic!("cached before any read") };

        let (new, new_master) = identity(&alice(), false);
        save(&cache, new, false).await;
        let old = serde_json::to_string(&old).unwrap();
        cache.fill(generation, |entries| {
            entries.insert_identity(&alice(), Some(old));
        });

        assert_eq!(master_of(&cache.get_user_identity(&alice()).await.unwrap().unwrap()), new_master);
    }

    #[tokio::test]
    async fn reopening_the_store_forgets_what_was_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let (saved, _) = identity(&alice(), false);
        save(&cache, saved, true).await;
        cache.get_user_identity(&alice()).await.unwrap();

        cache.reopen().await.unwrap();
        cache.get_user_identity(&alice()).await.unwrap();

        assert_eq!(cache.store_reads(), 2);
    }

    fn device(user: &UserId, id: &str, trust: LocalTrust) -> DeviceData {
        let account = Account::with_device_id(user, id.into());
        DeviceData::new(account.device_keys(), trust)
    }

    async fn save_devices(cache: &ReadCache<SqliteCryptoStore>, devices: DeviceChanges) {
        cache.save_changes(Changes { devices, ..Default::default() }).await.unwrap();
    }

    #[tokio::test]
    async fn a_users_devices_are_read_from_the_store_once_and_each_read_gets_its_own_copy() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let phone = device(&alice(), "PHONE", LocalTrust::Unset);
        let laptop = device(&alice(), "LAPTOP", LocalTrust::Unset);
        save_devices(&cache, DeviceChanges { new: vec![phone, laptop], ..Default::default() }).await;

        assert_eq!(cache.get_user_devices(&alice()).await.unwrap().len(), 2);
        let first = cache.get_device(&alice(), "PHONE".into()).await.unwrap().unwrap();
        let again = cache.get_device(&alice(), "PHONE".into()).await.unwrap().unwrap();

        assert_eq!(cache.store_reads(), 1);
        assert!(!std::ptr::eq(first.as_device_keys(), again.as_device_keys()), "two reads share one device");
        assert!(cache.get_device(&alice(), "TABLET".into()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_device_saved_as_changed_or_deleted_is_what_the_next_read_sees() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let phone = device(&alice(), "PHONE", LocalTrust::Unset);
        let laptop = device(&alice(), "LAPTOP", LocalTrust::Unset);
        save_devices(&cache, DeviceChanges { new: vec![phone.clone(), laptop.clone()], ..Default::default() }).await;
        cache.get_user_devices(&alice()).await.unwrap();

        let blocked = DeviceData::new(phone.as_device_keys().clone(), LocalTrust::BlackListed);
        save_devices(&cache, DeviceChanges { changed: vec![blocked], ..Default::default() }).await;
        let read = cache.get_device(&alice(), "PHONE".into()).await.unwrap().unwrap();
        assert!(read.is_blacklisted(), "the change to the device was not seen");

        save_devices(&cache, DeviceChanges { deleted: vec![laptop], ..Default::default() }).await;
        assert!(cache.get_device(&alice(), "LAPTOP".into()).await.unwrap().is_none());
        assert_eq!(cache.get_user_devices(&alice()).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_identity_saved_for_one_user_leaves_the_others_cached() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let bob: OwnedUserId = "@bob:example.org".try_into().unwrap();
        save_devices(
            &cache,
            DeviceChanges { new: vec![device(&bob, "DESK", LocalTrust::Unset)], ..Default::default() },
        )
        .await;
        cache.get_user_devices(&bob).await.unwrap();
        cache.get_user_identity(&alice()).await.unwrap();

        save(&cache, identity(&alice(), false).0, true).await;
        cache.get_user_devices(&bob).await.unwrap();
        assert!(cache.get_user_identity(&alice()).await.unwrap().is_some());

        assert_eq!(cache.store_reads(), 3);
    }

    #[tokio::test]
    async fn a_save_cancelled_halfway_still_empties_the_cache_for_what_it_wrote() {
        use futures_util::FutureExt as _;
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let (old, _) = identity(&alice(), false);
        save(&cache, old, true).await;
        cache.get_user_identity(&alice()).await.unwrap();

        let (new, new_master) = identity(&alice(), false);
        let changes =
            Changes { identities: IdentityChanges { changed: vec![new], ..Default::default() }, ..Default::default() };
        let cancelled = cache.save_changes(changes).now_or_never();
        assert!(cancelled.is_none(), "the save finished at its first poll: nothing was cancelled");
        // The write goes on in SQLite's blocking thread; wait until the store itself has it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while cache.inner.get_user_identity(&alice()).await.unwrap().as_ref().map(master_of) != Some(new_master.clone())
        {
            assert!(std::time::Instant::now() < deadline, "the cancelled save never reached the store");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }

        assert_eq!(master_of(&cache.get_user_identity(&alice()).await.unwrap().unwrap()), new_master);
    }

    #[tokio::test]
    async fn past_its_memory_budget_the_cache_starts_again_empty_and_keeps_answering() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let bob: OwnedUserId = "@bob:example.org".try_into().unwrap();
        save(&cache, identity(&alice(), false).0, true).await;
        save(&cache, identity(&bob, false).0, true).await;
        cache.get_user_identity(&alice()).await.unwrap();
        let one = cache.entries().bytes;
        cache.entries().max_bytes = one + one / 2;

        cache.get_user_identity(&bob).await.unwrap();
        assert!(cache.entries().bytes <= one + one / 2, "the cache holds more than its budget");
        assert!(cache.get_user_identity(&alice()).await.unwrap().is_some());

        assert_eq!(cache.store_reads(), 3, "alice was still cached after bob filled the budget");
    }

    #[tokio::test]
    async fn a_users_identity_and_devices_are_cached_side_by_side_whichever_is_read_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(&dir).await;
        let bob: OwnedUserId = "@bob:example.org".try_into().unwrap();
        for user in [alice(), bob.clone()] {
            save(&cache, identity(&user, false).0, true).await;
            let phone = device(&user, "PHONE", LocalTrust::Unset);
            save_devices(&cache, DeviceChanges { new: vec![phone], ..Default::default() }).await;
        }

        for _ in 0..2 {
            assert!(cache.get_user_identity(&alice()).await.unwrap().is_some());
            assert_eq!(cache.get_user_devices(&alice()).await.unwrap().len(), 1);
            assert!(cache.get_device(&bob, "PHONE".into()).await.unwrap().is_some());
            assert!(cache.get_user_identity(&bob).await.unwrap().is_some());
        }

        assert_eq!(cache.store_reads(), 4, "caching one of a user's identity and devices dropped the other");
    }
}
