//! One bridge per state directory: an exclusive lock on `STATE_DIR/bridge.lock`, held for the
//! process's life, so two replicas never both act on the same queue and timers.

use std::{fs::File, path::Path};

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "STATE_DIR {path} is in use by another bridge (it holds {path}/bridge.lock); run one replica per state directory (the Deployment's `replicas: 1` and `strategy: Recreate` do that)"
    )]
    Held {
        /// The state directory.
        path: String,
    },
    /// The lock file could not be opened or locked.
    #[error("STATE_DIR {path}: cannot lock bridge.lock: {source}; make the directory writable by the bridge's user")]
    Io {
        /// The state directory.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock on `dir` (creating it if need be), or says who holds it.
    pub fn acquire(dir: &Path) -> Result<Self, LockError> {
        let path = dir.display().to_string();
        std::fs::create_dir_all(dir).map_err(|source| LockError::Io { path: path.clone(), source })?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("bridge.lock"))
            .map_err(|source| LockError::Io { path: path.clone(), source })?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LockError::Held { path }),
            Err(std::fs::TryLockError::Error(source)) => Err(LockError::Io { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_bridge_on_the_same_state_directory_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateLock::acquire(dir.path()).unwrap();
        let err = StateLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another bridge") && err.contains("replicas: 1"), "{err}");
        drop(first);
        StateLock::acquire(dir.path()).unwrap();
    }
}
