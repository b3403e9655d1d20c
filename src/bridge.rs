//! The glue, and the only module that knows both Matrix and Kubernetes: a queued event →
//! (invite → join or reject) / (message → parse → authorize → scale → reply).

use std::{sync::Arc, time::Duration};

use ruma::{
    OwnedRoomId,
    api::client::membership::{join_room_by_id, leave_room},
    events::{AnyStateEvent, AnyTimelineEvent, room::member::MembershipState},
    serde::Raw,
};

use crate::{
    config::Config,
    matrix::{MatrixClient, MatrixError},
    metrics::Metrics,
    store::{Job, Store},
    worker::{JobHandler, Outcome},
};

/// The bridge: everything it needs to act on an event.
pub struct Bridge {
    config: Arc<Config>,
    matrix: Arc<MatrixClient>,
    #[allow(dead_code)]
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

impl Bridge {
    /// A bridge acting with these parts.
    pub fn new(
        config: Arc<Config>,
        matrix: Arc<MatrixClient>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            matrix,
            store,
            metrics,
        }
    }

    async fn handle_invite(
        &self,
        room_id: OwnedRoomId,
        inviter: &ruma::UserId,
    ) -> Result<(), MatrixError> {
        if self.config.allowed_users.allows(inviter) {
            tracing::info!(room_id = %room_id, inviter = %inviter, "joining on invite");
            self.matrix
                .send(join_room_by_id::v3::Request::new(room_id))
                .await?;
        } else {
            tracing::info!(room_id = %room_id, inviter = %inviter, "rejecting an invite from a user who is not allowed");
            let mut request = leave_room::v3::Request::new(room_id);
            request.reason = Some("only allowed users can invite this bot".into());
            self.matrix.send(request).await?;
        }
        Ok(())
    }

    async fn handle_event(&self, event: AnyTimelineEvent) -> Result<(), MatrixError> {
        if event.sender() == self.matrix.bot() {
            return Ok(());
        }
        if let AnyTimelineEvent::State(AnyStateEvent::RoomMember(member)) = &event
            && member.state_key() == self.matrix.bot()
            && *member.membership() == MembershipState::Invite
        {
            return self
                .handle_invite(member.room_id().to_owned(), member.sender())
                .await;
        }
        Ok(())
    }
}

/// How long to wait before retrying after a transient failure.
const RETRY_DELAY: Duration = Duration::from_secs(2);

impl JobHandler for Bridge {
    async fn handle(&self, job: &Job) -> Outcome {
        let event = match Raw::<AnyTimelineEvent>::from_json_string(job.event.clone())
            .and_then(|r| r.deserialize())
        {
            Ok(event) => event,
            Err(e) => {
                tracing::debug!(event_id = %job.event_id, error = %e, "skipping an event we cannot read");
                return Outcome::Done;
            }
        };
        match self.handle_event(event).await {
            Ok(()) => Outcome::Done,
            Err(e) if e.is_transient() => {
                self.metrics.error("homeserver");
                tracing::warn!(event_id = %job.event_id, error = %e, "homeserver unavailable; will retry");
                Outcome::RetryAfter(RETRY_DELAY)
            }
            Err(e) => {
                self.metrics.error("homeserver");
                tracing::warn!(event_id = %job.event_id, error = %e, "could not act on an event");
                Outcome::Done
            }
        }
    }
}
