//! The worker: takes queued events from the store in order and hands each to the bridge.
//! A job is completed only when handled, so a crash resumes where it stopped.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use ruma::{OwnedRoomId, RoomId};
use tokio::sync::{Notify, watch};

use crate::store::{Job, Store};

/// What became of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (or deliberately ignored): remove it from the queue.
    Done,
    /// Could not be handled now (homeserver down, ...): try again after the delay.
    RetryAfter(Duration),
}

/// Handles one job; implemented by the bridge.
pub trait JobHandler: Send + Sync + 'static {
    /// Handles `job` and says what became of it.
    fn handle(&self, job: &Job) -> impl Future<Output = Outcome> + Send;
}

/// Runs until `shutdown` turns true, finishing the job in hand first. Jobs of one room are
/// handled in order; a job that must wait holds back its own room only, never the others.
pub async fn run<H: JobHandler>(
    store: Arc<Store>,
    handler: Arc<H>,
    work: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held: HashMap<OwnedRoomId, Instant> = HashMap::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let now = Instant::now();
        held.retain(|_, until| *until > now);
        let held_rooms: Vec<&RoomId> = held.keys().map(|r| r.as_ref()).collect();
        let jobs = match store.pending_jobs_except(BATCH, &held_rooms) {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the work queue");
                sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                continue;
            }
        };
        if jobs.is_empty() {
            let next_release = held.values().min().copied();
            tokio::select! {
                _ = work.notified() => {}
                _ = shutdown.changed() => {}
                _ = sleep_until(next_release) => {}
            }
            continue;
        }
        for job in jobs {
            // NB: a room held earlier in this batch keeps its later jobs back too (order per room).
            if held.contains_key(&job.room_id) {
                continue;
            }
            match handler.handle(&job).await {
                Outcome::Done => {
                    if let Err(e) = store.complete_job(job.seq) {
                        tracing::error!(error = %e, event_id = %job.event_id, "cannot mark a job done");
                    }
                }
                Outcome::RetryAfter(delay) => {
                    let _ = store.postpone_job(job.seq);
                    tracing::debug!(room_id = %job.room_id, delay_ms = delay.as_millis() as u64, "holding back a room");
                    held.insert(job.room_id.clone(), Instant::now() + delay);
                }
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }
    tracing::debug!("worker stopped");
}

/// How many jobs are read from the queue at once.
const BATCH: usize = 64;

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn sleep_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::QueuedEvent;

    /// Records what it handles; postpones the jobs of `stuck_room`, or only the first
    /// attempt of `$b`.
    struct Recorder {
        seen: Mutex<Vec<String>>,
        fail_first: Mutex<bool>,
        stuck_room: Option<&'static str>,
    }

    impl Recorder {
        fn new(stuck_room: Option<&'static str>) -> Arc<Self> {
            Arc::new(Recorder { seen: Mutex::new(vec![]), fail_first: Mutex::new(stuck_room.is_none()), stuck_room })
        }
    }

    impl JobHandler for Recorder {
        async fn handle(&self, job: &Job) -> Outcome {
            if self.stuck_room == Some(job.room_id.as_str()) {
                return Outcome::RetryAfter(Duration::from_secs(3600));
            }
            let mut fail = self.fail_first.lock().unwrap();
            if *fail && job.event_id == "$b" {
                *fail = false;
                return Outcome::RetryAfter(Duration::from_millis(10));
            }
            self.seen.lock().unwrap().push(job.event_id.to_string());
            Outcome::Done
        }
    }

    fn ev(id: &str, room: &str) -> QueuedEvent {
        QueuedEvent { event_id: id.try_into().unwrap(), room_id: room.try_into().unwrap(), json: "{}".to_owned() }
    }

    async fn run_until(store: &Arc<Store>, handler: &Arc<Recorder>, done: impl Fn(&[String]) -> bool) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(store.clone(), handler.clone(), Arc::new(Notify::new()), rx));
        for _ in 0..400 {
            if done(&handler.seen.lock().unwrap()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn jobs_are_handled_in_order_and_a_postponed_job_holds_back_the_later_ones_of_its_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        store.record_transaction("t", "h", &[ev("$a", "!r"), ev("$b", "!r"), ev("$c", "!r")], 0).unwrap();
        let handler = Recorder::new(None);
        run_until(&store, &handler, |seen| seen.len() == 3).await;
        assert_eq!(*handler.seen.lock().unwrap(), ["$a", "$b", "$c"]);
        assert!(store.pending_jobs(10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_room_whose_job_must_wait_does_not_hold_up_the_other_rooms() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let events =
            [ev("$stuck1", "!stuck"), ev("$plain1", "!plain"), ev("$stuck2", "!stuck"), ev("$plain2", "!plain")];
        store.record_transaction("t", "h", &events, 0).unwrap();
        let handler = Recorder::new(Some("!stuck"));
        run_until(&store, &handler, |seen| seen.len() == 2).await;
        assert_eq!(*handler.seen.lock().unwrap(), ["$plain1", "$plain2"]);
        let waiting: Vec<String> =
            store.pending_jobs(10).unwrap().into_iter().map(|j| j.event_id.to_string()).collect();
        assert_eq!(waiting, ["$stuck1", "$stuck2"], "the held room keeps its order and its jobs");
    }
}
