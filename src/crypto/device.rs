//! The device lifecycle: the crypto store's key (passphrase or key file), unlocking the store,
//! creating or keeping the bot's device, setting a store aside, deleting stale devices, and
//! cross-signing the bot once.

use super::*;

/// Key of the state database holding our device id.
pub(super) const DEVICE_ID_KEY: &str = "device_id";

/// How the crypto store is unlocked.
#[derive(Clone)]
pub(super) enum StoreKey {
    Passphrase(String),
    Key(Box<[u8; 32]>),
}

/// The file of the crypto store's database inside its directory.
pub(super) const CRYPTO_DATABASE: &str = "matrix-sdk-crypto.sqlite3";

/// The key to the crypto store: `CRYPTO_STORE_PASSPHRASE`, or the key file in STATE_DIR,
/// generated only when there is no store yet to unlock.
pub(super) fn store_key(config: &Config, store_exists: bool, dir: &Path) -> Result<StoreKey, CryptoError> {
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

pub(super) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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

    pub(super) async fn open_with(dir: PathBuf, key: StoreKey) -> Result<Self, CryptoError> {
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
    pub(super) async fn replace(self, why: &str) -> Result<Self, CryptoError> {
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

pub(super) fn new_device_id() -> OwnedDeviceId {
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
    ) -> Result<Arc<Crypto>, CryptoError> {
        for attempt in 0..2 {
            let fresh = unlocked.device.is_none();
            let crypto = Self::open(unlocked, config, &store, &matrix, &metrics).await?;
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

    pub(super) async fn open(
        unlocked: &mut UnlockedStore,
        config: &Config,
        store: &Arc<Store>,
        matrix: &Arc<MatrixClient>,
        metrics: &Arc<Metrics>,
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
        let machine =
            OlmMachine::with_store(&config.bot_user_id, &device_id, ReadCache::new(unlocked.store.clone()), None)
                .await?;
        unlocked.device = Some(device_id.clone());
        matrix.set_device_id(Some(device_id.clone()));
        tracing::info!(device_id = %device_id, ed25519 = %machine.identity_keys().ed25519, "encryption ready");
        Ok(Crypto {
            machine,
            matrix: matrix.clone(),
            metrics: metrics.clone(),
            outgoing: AsyncMutex::new(()),
            room_locks: Default::default(),
            fed_key_counts: Default::default(),
            devices_epoch: Default::default(),
            prepared: Default::default(),
        })
    }

    pub(super) async fn server_has_our_keys(&self) -> Result<bool, CryptoError> {
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

    pub(super) async fn ensure_cross_signing(&self) -> Result<(), CryptoError> {
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
}

/// Moves a crypto store directory aside so a new one can be made.
pub(super) fn set_aside(dir: &Path) -> Result<(), CryptoError> {
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
pub(super) async fn delete_other_devices(matrix: &MatrixClient, keep: &ruma::DeviceId) {
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
        match Crypto::start(&config, &mut unlocked, store.clone(), matrix.clone(), metrics.clone()).await {
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
