//! Runs the bridge: opens the state, binds the listener, starts the worker and the start-up
//! calls, serves until a shutdown signal, then drains in-flight work.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

use crate::{
    appservice::{self, AppState},
    bridge::Bridge,
    config::Config,
    crypto::{self, CryptoCell},
    matrix::MatrixClient,
    metrics::Metrics,
    rooms::Rooms,
    scaler::{RetryPolicy, Scaler},
    startup,
    store::{self, Store, StoreError},
    worker,
};

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The state directory or database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another bridge uses the state directory.
    #[error(transparent)]
    Lock(#[from] store::LockError),
    /// The crypto store could not be unlocked.
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
    /// The listen address could not be bound.
    #[error("LISTEN_ADDRESS {address}: cannot listen: {source}")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("server: {0}")]
    Serve(#[source] std::io::Error),
}

/// How long shutdown waits for the job in hand.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServiceError> {
    let started = std::time::Instant::now();
    let config = Arc::new(config);
    // NB: held until the process ends, and taken before anything in the directory is opened: a
    // second replica on it stops here, before it could run a command or a timer twice.
    let _lock = store::StateLock::acquire(&config.state_dir)?;
    let store = Arc::new(Store::open(&config.state_dir)?);
    // NB: before serving: a wrong passphrase must stop start-up, not set the store aside.
    let unlocked = crypto::UnlockedStore::open(&config).await?;
    let metrics = Arc::new(Metrics::new());
    let matrix = Arc::new(MatrixClient::new(
        &config.homeserver,
        config.registration.as_token.clone(),
        config.bot_user_id.clone(),
    ));
    let work = Arc::new(Notify::new());
    let reachable = Arc::new(AtomicBool::new(false));
    let crypto = Arc::new(CryptoCell::new(store.clone(), work.clone()));
    let state = AppState::new(
        config.registration.hs_token.clone(),
        store.clone(),
        metrics.clone(),
        crypto.clone(),
        work.clone(),
        reachable.clone(),
    )
    .ignoring_events_from(config.bot_user_id.clone());

    let listener = tokio::net::TcpListener::bind(config.listen_address)
        .await
        .map_err(|source| ServiceError::Bind { address: config.listen_address, source })?;
    let local = listener.local_addr().map_err(ServiceError::Serve)?;
    tracing::info!(
        address = %local,
        bot = %config.bot_user_id,
        homeserver = %config.homeserver,
        targets = config.targets.len(),
        ready_ms = started.elapsed().as_millis() as u64,
        "listening"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let scaler = Scaler::infer(RetryPolicy::default()).await;
    if let Err(e) = &scaler {
        tracing::error!(error = %e, "Kubernetes is not configured; commands will answer with this error");
    }
    let rooms = Arc::new(Rooms::default());
    let bridge = Arc::new(Bridge::new(
        config.clone(),
        matrix.clone(),
        store.clone(),
        metrics.clone(),
        rooms,
        crypto.clone(),
        scaler,
    ));
    let encryption = tokio::spawn(crypto::start_in_background(
        crypto.clone(),
        unlocked,
        config.clone(),
        store.clone(),
        matrix.clone(),
        metrics.clone(),
        work.clone(),
    ));
    let sweeper = tokio::spawn(sweep_undecryptable(bridge.clone(), stop_rx.clone()));
    let drift_watches = bridge.watch_for_drift();
    let timers = tokio::spawn(run_timers(bridge.clone(), stop_rx.clone()));
    let pruner = tokio::spawn(prune_state(store.clone(), stop_rx.clone()));
    let interrupted = bridge.interrupted_rollouts();
    let resume = {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.resume_rollouts(interrupted).await })
    };
    let worker = tokio::spawn(worker::run(store.clone(), bridge.clone(), work, stop_rx.clone()));
    let startup = {
        let (matrix, config) = (matrix.clone(), config.clone());
        tokio::spawn(async move {
            startup::run(&matrix, &config.registration.id, &config.registration.url, &config.display_name).await;
        })
    };
    let probe = tokio::spawn(probe_homeserver(matrix.base_url().to_owned(), reachable, stop_rx.clone()));

    let server = axum::serve(listener, appservice::app(state)).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new requests, finishing work in hand");
    });
    let served = server.await.map_err(ServiceError::Serve);
    let _ = stop_tx.send(true);
    startup.abort();
    probe.abort();
    encryption.abort();
    sweeper.abort();
    drift_watches.iter().for_each(|w| w.abort());
    timers.abort();
    pruner.abort();
    resume.abort();
    if tokio::time::timeout(DRAIN_TIMEOUT, worker).await.is_err() {
        tracing::warn!("the worker did not finish within {DRAIN_TIMEOUT:?}; its job resumes at the next start");
    }
    tracing::info!("stopped");
    served
}

/// Every few seconds, answers encrypted commands whose room key never came.
async fn sweep_undecryptable(bridge: Arc<Bridge>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
        bridge.report_undecryptable(store::now_ms()).await;
    }
}

/// Plans the schedules, then runs each timer when it is due, until `stop`.
async fn run_timers(bridge: Arc<Bridge>, mut stop: watch::Receiver<bool>) {
    if let Err(e) = bridge.plan_schedules() {
        tracing::warn!(error = %e, "could not plan the schedules; retrying at the next start");
    }
    loop {
        bridge.run_due_timers().await;
        let now = store::now_ms();
        // NB: a timer still due after a run failed (the homeserver is down, say): try again soon,
        // not in a tight loop.
        let wait = match bridge.next_timer_due() {
            Some(due) if due <= now => TIMER_RETRY,
            Some(due) => Duration::from_millis((due - now) as u64).min(TIMER_IDLE),
            None => TIMER_IDLE,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = bridge.timers_changed() => {}
            _ = stop.changed() => return,
        }
    }
}

/// How soon a timer that could not finish is tried again.
const TIMER_RETRY: Duration = Duration::from_secs(5);

/// How long the timer loop sleeps at most, so a changed clock is noticed.
const TIMER_IDLE: Duration = Duration::from_secs(60);

/// How often old transactions and handled jobs are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(60 * 60);

/// At start and then hourly, forgets state older than [`crate::store::RETENTION_MS`].
async fn prune_state(store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    loop {
        match store.prune(crate::store::now_ms() - crate::store::RETENTION_MS) {
            Ok(pruned) if pruned != Default::default() => {
                tracing::info!(transactions = pruned.transactions, jobs = pruned.jobs, "forgot old handled work");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not prune the state database; retrying in an hour"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Keeps `reachable` up to date by asking the homeserver for its versions.
async fn probe_homeserver(base: String, reachable: Arc<AtomicBool>, mut stop: watch::Receiver<bool>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("static client settings");
    let url = format!("{base}/_matrix/client/versions");
    loop {
        let ok = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
        if reachable.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("homeserver reachable");
            } else {
                tracing::warn!(url = %url, "homeserver unreachable");
            }
        }
        let wait = if ok { Duration::from_secs(15) } else { Duration::from_secs(2) };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
