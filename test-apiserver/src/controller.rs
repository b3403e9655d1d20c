//! The simulated deployment and statefulset controllers: after a spec change, `status` follows
//! over time as a [`ControllerMode`] says. The timing is pure ([`progress`]); the store applies it.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::workload::{Workload, WorkloadKind, nonzero};

/// How pods behave after a workload's replica count changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControllerMode {
    /// Every replica becomes ready `after` the change (a StatefulSet: one pod per `after`);
    /// scaling down finishes `after` the change too.
    Ready {
        /// How long pods take to become ready, or to terminate.
        after: Duration,
    },
    /// Pods are created but never become ready; a Deployment reports
    /// `ProgressDeadlineExceeded` once `progress_deadline` has passed. Scaling down is immediate.
    Never {
        /// When the Progressing condition turns False.
        progress_deadline: Duration,
    },
    /// Only `ready` replicas ever become ready, `after` the change.
    Partial {
        /// How many replicas become ready at most.
        ready: i32,
        /// How long they take.
        after: Duration,
    },
}

impl Default for ControllerMode {
    fn default() -> Self {
        Self::Ready { after: Duration::from_millis(200) }
    }
}

/// A spec change the controller is still acting on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rollout {
    pub started: Instant,
    pub mode: ControllerMode,
    pub from_replicas: i32,
    pub from_ready: i32,
    pub target: i32,
    pub generation: i64,
}

impl Rollout {
    /// A rollout towards `object`'s current spec, starting from its current status.
    pub(crate) fn start(object: &Workload, mode: ControllerMode, now: Instant) -> Self {
        Self {
            started: now,
            mode,
            from_replicas: object.status_replicas(),
            from_ready: object.ready_replicas(),
            target: object.spec_replicas(),
            generation: object.generation(),
        }
    }
}

/// Pod counts: `replicas` exist (all of the current revision), `ready` of them are ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub replicas: i32,
    pub ready: i32,
}

/// Where a rollout stands at some moment, and when that next changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    pub counts: Counts,
    pub deadline_exceeded: bool,
    pub next: Option<Duration>,
}

/// The state of `rollout` of a `kind` workload `elapsed` after it started.
pub(crate) fn progress(kind: WorkloadKind, rollout: &Rollout, elapsed: Duration) -> Progress {
    match kind {
        WorkloadKind::Deployment => deployment_progress(rollout, elapsed),
        WorkloadKind::StatefulSet => statefulset_progress(rollout, elapsed),
    }
}

/// The ready count a scale-up ends at, and how long until it is reached.
fn goal(rollout: &Rollout) -> (i32, Duration) {
    let kept = rollout.from_ready.min(rollout.target);
    match rollout.mode {
        ControllerMode::Ready { after } => (rollout.target, after),
        ControllerMode::Partial { ready, after } => (kept.max(ready.clamp(0, rollout.target)), after),
        ControllerMode::Never { .. } => (kept, Duration::ZERO),
    }
}

fn termination(mode: ControllerMode) -> Duration {
    match mode {
        ControllerMode::Ready { after } | ControllerMode::Partial { after, .. } => after,
        ControllerMode::Never { .. } => Duration::ZERO,
    }
}

fn deployment_progress(rollout: &Rollout, elapsed: Duration) -> Progress {
    let target = rollout.target;
    let kept = rollout.from_ready.min(target);
    if target < rollout.from_replicas {
        let gone = termination(rollout.mode);
        let done = elapsed >= gone;
        return Progress {
            counts: Counts { replicas: if done { target } else { rollout.from_replicas }, ready: kept },
            deadline_exceeded: false,
            next: (!done).then_some(gone),
        };
    }
    let (goal, after) = goal(rollout);
    let ready = if elapsed >= after { goal } else { kept };
    let mut next = (ready != goal).then_some(after);
    let mut deadline_exceeded = false;
    if let ControllerMode::Never { progress_deadline } = rollout.mode
        && ready < target
    {
        if elapsed >= progress_deadline {
            deadline_exceeded = true;
        } else {
            next = Some(progress_deadline);
        }
    }
    Progress { counts: Counts { replicas: target, ready }, deadline_exceeded, next }
}

/// `OrderedReady`: one pod at a time, each waiting for the one before it.
fn statefulset_progress(rollout: &Rollout, elapsed: Duration) -> Progress {
    let target = rollout.target;
    let step = termination(rollout.mode);
    let steps =
        if step.is_zero() { i32::MAX } else { i32::try_from(elapsed.as_nanos() / step.as_nanos()).unwrap_or(i32::MAX) };
    let at_step = |n: i32| Some(step.saturating_mul(u32::try_from(n + 1).unwrap_or(u32::MAX)));
    if target < rollout.from_replicas {
        let replicas = rollout.from_replicas.saturating_sub(steps).max(target);
        let ready =
            if replicas > target { rollout.from_ready.min(replicas - 1) } else { rollout.from_ready.min(target) };
        return Progress {
            counts: Counts { replicas, ready },
            deadline_exceeded: false,
            next: if replicas > target { at_step(steps) } else { None },
        };
    }
    let kept = rollout.from_ready.min(target);
    let (goal, _) = goal(rollout);
    let ready = kept.saturating_add(steps).min(goal);
    let replicas = if ready < target { (ready + 1).max(rollout.from_replicas).min(target) } else { target };
    Progress {
        counts: Counts { replicas, ready },
        deadline_exceeded: false,
        next: if ready < goal { at_step(steps) } else { None },
    }
}

/// What the controller has seen and writes into `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observed {
    pub generation: i64,
    pub target: i32,
    pub counts: Counts,
    pub deadline_exceeded: bool,
}

impl Observed {
    /// A finished rollout of the object's current spec.
    pub(crate) fn settled(object: &Workload) -> Self {
        let target = object.spec_replicas();
        Self {
            generation: object.generation(),
            target,
            counts: Counts { replicas: target, ready: target },
            deadline_exceeded: false,
        }
    }

    pub(crate) fn of(rollout: &Rollout, progress: &Progress) -> Self {
        Self {
            generation: rollout.generation,
            target: rollout.target,
            counts: progress.counts,
            deadline_exceeded: progress.deadline_exceeded,
        }
    }
}

/// Writes what the controller observed into `object.status`, omitting zeros where Go's
/// `omitempty` does (a StatefulSet's `replicas` and `availableReplicas` have none).
pub(crate) fn apply(object: &mut Workload, observed: &Observed, now: Timestamp) {
    let revision = object.revision_name();
    let Counts { replicas, ready } = observed.counts;
    match object {
        Workload::Deployment(d) => {
            let status = d.status.get_or_insert_default();
            status.observed_generation = Some(observed.generation);
            status.replicas = nonzero(replicas);
            status.updated_replicas = nonzero(replicas);
            status.ready_replicas = nonzero(ready);
            status.available_replicas = nonzero(ready);
            status.unavailable_replicas = nonzero((observed.target - ready).max(0));
            set_conditions(status, observed, &revision, now);
        }
        Workload::StatefulSet(s) => {
            let status = s.status.get_or_insert_default();
            status.observed_generation = Some(observed.generation);
            status.replicas = replicas;
            status.ready_replicas = nonzero(ready);
            status.current_replicas = nonzero(replicas);
            status.updated_replicas = nonzero(replicas);
            status.available_replicas = Some(ready);
            status.current_revision = Some(revision.clone());
            status.update_revision = Some(revision);
            status.collision_count = Some(0);
        }
    }
}

fn set_conditions(status: &mut DeploymentStatus, observed: &Observed, rs: &str, now: Timestamp) {
    let target = observed.target;
    let Counts { replicas, ready } = observed.counts;
    let max_unavailable = target / 4;
    let available = if ready >= target - max_unavailable {
        ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.".to_owned())
    } else {
        ("False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.".to_owned())
    };
    let progressing = if observed.deadline_exceeded {
        ("False", "ProgressDeadlineExceeded", format!("ReplicaSet \"{rs}\" has timed out progressing."))
    } else if replicas == target && ready == target {
        ("True", "NewReplicaSetAvailable", format!("ReplicaSet \"{rs}\" has successfully progressed."))
    } else {
        ("True", "ReplicaSetUpdated", format!("ReplicaSet \"{rs}\" is progressing."))
    };
    set_condition(status, "Available", available, now);
    set_condition(status, "Progressing", progressing, now);
}

/// `SetDeploymentCondition`: unchanged if status and reason match; otherwise moved to the end,
/// keeping `lastTransitionTime` when only the reason changed.
fn set_condition(
    status: &mut DeploymentStatus,
    type_: &str,
    (state, reason, message): (&str, &str, String),
    now: Timestamp,
) {
    let conditions = status.conditions.get_or_insert_default();
    let current = conditions.iter().position(|c| c.type_ == type_);
    let mut transition = Time(now);
    if let Some(i) = current {
        let c = &conditions[i];
        if c.status == state && c.reason.as_deref() == Some(reason) {
            return;
        }
        if c.status == state
            && let Some(t) = &c.last_transition_time
        {
            transition = t.clone();
        }
        conditions.remove(i);
    }
    conditions.push(DeploymentCondition {
        type_: type_.to_owned(),
        status: state.to_owned(),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(transition),
        reason: Some(reason.to_owned()),
        message: Some(message),
    });
}

/// Runs the controller until the cluster shuts down: reconcile, then sleep until the next due
/// change or a new spec change.
pub(crate) async fn run(cluster: Cluster) {
    let stopped = cluster.stopped();
    tokio::pin!(stopped);
    loop {
        let wake = cluster.controller_wakeup();
        let next = cluster.reconcile(Instant::now());
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            () = wake => {}
            () = tokio::time::sleep_until(next.unwrap_or(far)) => {}
            () = &mut stopped => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn rollout(mode: ControllerMode, from: i32, target: i32) -> Rollout {
        Rollout { started: Instant::now(), mode, from_replicas: from, from_ready: from, target, generation: 2 }
    }

    fn at(kind: WorkloadKind, r: &Rollout, ms: u64) -> (i32, i32) {
        let p = progress(kind, r, MS * u32::try_from(ms).unwrap());
        (p.counts.replicas, p.counts.ready)
    }

    #[test]
    fn a_ready_deployment_creates_pods_at_once_and_readies_them_after_the_delay() {
        let r = rollout(ControllerMode::Ready { after: MS * 100 }, 0, 3);
        assert_eq!(at(WorkloadKind::Deployment, &r, 0), (3, 0));
        assert_eq!(progress(WorkloadKind::Deployment, &r, MS).next, Some(MS * 100));
        assert_eq!(at(WorkloadKind::Deployment, &r, 100), (3, 3));
        assert_eq!(progress(WorkloadKind::Deployment, &r, MS * 100).next, None);
    }

    #[test]
    fn scaling_a_deployment_to_zero_keeps_status_replicas_until_pods_terminate() {
        let r = rollout(ControllerMode::Ready { after: MS * 100 }, 2, 0);
        assert_eq!(at(WorkloadKind::Deployment, &r, 10), (2, 0));
        assert_eq!(at(WorkloadKind::Deployment, &r, 100), (0, 0));
    }

    #[test]
    fn a_never_ready_deployment_exceeds_its_progress_deadline() {
        let mode = ControllerMode::Never { progress_deadline: MS * 500 };
        let r = rollout(mode, 0, 1);
        let early = progress(WorkloadKind::Deployment, &r, MS * 10);
        assert_eq!((early.counts.ready, early.deadline_exceeded), (0, false));
        assert_eq!(early.next, Some(MS * 500));
        let late = progress(WorkloadKind::Deployment, &r, MS * 500);
        assert!(late.deadline_exceeded);
        assert_eq!(late.next, None);
    }

    #[test]
    fn a_partial_deployment_stops_at_the_given_ready_count() {
        let mode = ControllerMode::Partial { ready: 1, after: MS * 50 };
        let r = rollout(mode, 0, 3);
        assert_eq!(at(WorkloadKind::Deployment, &r, 60), (3, 1));
        assert_eq!(progress(WorkloadKind::Deployment, &r, MS * 60).next, None);
    }

    #[test]
    fn a_statefulset_brings_pods_up_one_at_a_time() {
        let r = rollout(ControllerMode::Ready { after: MS * 100 }, 0, 3);
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 0), (1, 0));
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 100), (2, 1));
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 250), (3, 2));
        assert_eq!(progress(WorkloadKind::StatefulSet, &r, MS * 250).next, Some(MS * 300));
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 300), (3, 3));
    }

    #[test]
    fn a_statefulset_removes_pods_one_at_a_time_from_the_highest_ordinal() {
        let r = rollout(ControllerMode::Ready { after: MS * 100 }, 3, 1);
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 0), (3, 2));
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 100), (2, 1));
        assert_eq!(at(WorkloadKind::StatefulSet, &r, 200), (1, 1));
    }

    #[test]
    fn a_stopped_statefulset_keeps_replicas_and_available_replicas_but_omits_the_rest() {
        let mut object = Workload::new(
            WorkloadKind::StatefulSet,
            crate::workload::Created {
                namespace: "a",
                name: "db",
                replicas: 0,
                uid: "u".to_owned(),
                now: Timestamp::UNIX_EPOCH,
            },
        );
        let settled = Observed::settled(&object);
        apply(&mut object, &settled, Timestamp::UNIX_EPOCH);
        let status = &object.to_value()["status"];
        assert_eq!(status["replicas"], 0);
        assert_eq!(status["availableReplicas"], 0);
        assert!(status.get("readyReplicas").is_none() && status.get("currentReplicas").is_none());
    }

    #[test]
    fn conditions_follow_set_deployment_condition() {
        let mut status = DeploymentStatus::default();
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::from_second(60).unwrap();
        let observed = |ready| Observed {
            generation: 1,
            target: 1,
            counts: Counts { replicas: 1, ready },
            deadline_exceeded: false,
        };
        set_conditions(&mut status, &observed(0), "web-abc", t0);
        set_conditions(&mut status, &observed(1), "web-abc", t1);
        let conditions = status.conditions.unwrap();
        let progressing = conditions.iter().find(|c| c.type_ == "Progressing").unwrap();
        assert_eq!(progressing.reason.as_deref(), Some("NewReplicaSetAvailable"));
        assert_eq!(progressing.last_transition_time, Some(Time(t0)));
        assert_eq!(progressing.last_update_time, Some(Time(t1)));
        let available = conditions.iter().find(|c| c.type_ == "Available").unwrap();
        assert_eq!(available.status, "True");
        assert_eq!(available.last_transition_time, Some(Time(t1)));
    }
}
