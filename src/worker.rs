//! The worker: takes queued events from the store in order and hands each to the bridge.
//! A job is completed only when handled, so a crash resumes where it stopped.

use std::{future::Future, sync::Arc, time::Duration};

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

/// Runs until `shutdown` turns true, finishing the job in hand first.
pub async fn run<H: JobHandler>(
    store: Arc<Store>,
    handler: Arc<H>,
    work: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if *shutdown.borrow() {
            break;
        }
        let jobs = match store.pending_jobs(64) {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the work queue");
                sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                continue;
            }
        };
        if jobs.is_empty() {
            tokio::select! {
                _ = work.notified() => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        for job in jobs {
            match handler.handle(&job).await {
                Outcome::Done => {
                    if let Err(e) = store.complete_job(job.seq) {
                        tracing::error!(error = %e, event_id = %job.event_id, "cannot mark a job done");
                    }
                }
                Outcome::RetryAfter(delay) => {
                    let _ = store.postpone_job(job.seq);
                    sleep_or_shutdown(delay, &mut shutdown).await;
                    break;
                }
            }
            if *shutdown.borrow() {
                break;
            }
        }
    }
    tracing::debug!("worker stopped");
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

    struct Recorder {
        seen: Mutex<Vec<String>>,
        fail_first: Mutex<bool>,
    }

    impl JobHandler for Recorder {
        async fn handle(&self, job: &Job) -> Outcome {
            let mut fail = self.fail_first.lock().unwrap();
            if *fail && job.event_id == "$b" {
                *fail = false;
                return Outcome::RetryAfter(Duration::from_millis(10));
            }
            self.seen.lock().unwrap().push(job.event_id.clone());
            Outcome::Done
        }
    }

    #[tokio::test]
    async fn jobs_are_handled_in_order_and_a_postponed_job_holds_back_the_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let ev = |id: &str| (id.to_owned(), "{}".to_owned());
        store.record_transaction("t", &[ev("$a"), ev("$b"), ev("$c")], 0).unwrap();
        let handler = Arc::new(Recorder { seen: Mutex::new(vec![]), fail_first: Mutex::new(true) });
        let (tx, rx) = watch::channel(false);
        let work = Arc::new(Notify::new());
        let task = tokio::spawn(run(store.clone(), handler.clone(), work, rx));
        for _ in 0..200 {
            if store.pending_jobs(10).unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tx.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(*handler.seen.lock().unwrap(), ["$a", "$b", "$c"]);
        assert!(store.pending_jobs(10).unwrap().is_empty());
    }
}
