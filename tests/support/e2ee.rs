//! A real end-to-end encrypted Matrix client (matrix-sdk with its SQLite crypto store) for the
//! people in the encryption tests. It syncs in the background and records every message it
//! can decrypt.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use matrix_sdk::{
    Client, Room,
    config::SyncSettings,
    deserialized_responses::EncryptionInfo,
    ruma::{
        OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId,
        api::client::room::create_room::v3::{Request as CreateRoom, RoomPreset},
        events::{
            InitialStateEvent,
            room::{
                encryption::RoomEncryptionEventContent,
                message::{MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent},
            },
        },
    },
};

use super::eventually;

/// A message this client received and decrypted (or read in the clear).
#[derive(Debug, Clone)]
pub struct Received {
    /// The room.
    pub room_id: OwnedRoomId,
    /// The sender.
    pub sender: OwnedUserId,
    /// The text.
    pub body: String,
    /// `m.notice`, `m.text`, ...
    pub msgtype: String,
    /// The event replied to, if any.
    pub in_reply_to: Option<OwnedEventId>,
    /// Whether it arrived encrypted.
    pub encrypted: bool,
}

/// One logged-in device of a user.
pub struct E2eeClient {
    /// The SDK client.
    pub client: Client,
    received: Arc<Mutex<Vec<Received>>>,
    sync: tokio::task::JoinHandle<()>,
}

impl E2eeClient {
    /// Logs in `localpart` (registered with the test bed's password) as a new device.
    pub async fn login(homeserver: &str, localpart: &str, store: &Path) -> Self {
        let client = Client::builder().homeserver_url(homeserver).sqlite_store(store, None).build().await.unwrap();
        client
            .matrix_auth()
            .login_username(localpart, &format!("pw-{localpart}-secret"))
            .initial_device_display_name("e2ee test client")
            .send()
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room, info: Option<EncryptionInfo>| {
            let sink = sink.clone();
            async move {
                let (body, msgtype) = match &ev.content.msgtype {
                    MessageType::Text(t) => (t.body.clone(), "m.text"),
                    MessageType::Notice(n) => (n.body.clone(), "m.notice"),
                    other => (other.body().to_owned(), "other"),
                };
                let in_reply_to = match &ev.content.relates_to {
                    Some(matrix_sdk::ruma::events::room::message::Relation::Reply(r)) => {
                        Some(r.in_reply_to.event_id.clone())
                    }
                    _ => None,
                };
                sink.lock().unwrap().push(Received {
                    room_id: room.room_id().to_owned(),
                    sender: ev.sender.clone(),
                    body,
                    msgtype: msgtype.into(),
                    in_reply_to,
                    encrypted: info.is_some(),
                });
            }
        });
        let first = client.sync_once(SyncSettings::default()).await.unwrap();
        let syncing = client.clone();
        // NB: our own loop, not Client::sync: that one sleeps a second after any sync that
        // returned within a second, which would add up to 1 s to every message seen here.
        let sync = tokio::spawn(async move {
            let mut settings = SyncSettings::default().timeout(Duration::from_millis(500)).token(first.next_batch);
            loop {
                match syncing.sync_once(settings.clone()).await {
                    Ok(response) => settings = settings.token(response.next_batch),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        E2eeClient { client, received, sync }
    }

    /// The user id.
    pub fn user_id(&self) -> OwnedUserId {
        self.client.user_id().unwrap().to_owned()
    }

    /// Creates an encrypted room inviting `invite`; returns its id.
    pub async fn create_encrypted_room(&self, invite: &[&UserId]) -> OwnedRoomId {
        let mut request = CreateRoom::new();
        request.preset = Some(RoomPreset::PrivateChat);
        request.invite = invite.iter().map(|u| (*u).to_owned()).collect();
        request.initial_state = vec![
            InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
                .to_raw_any(),
        ];
        let room = self.client.create_room(request).await.unwrap();
        room.room_id().to_owned()
    }

    /// Creates an unencrypted room inviting `invite`; returns its id.
    pub async fn create_plain_room(&self, invite: &[&UserId]) -> OwnedRoomId {
        let mut request = CreateRoom::new();
        request.preset = Some(RoomPreset::PrivateChat);
        request.invite = invite.iter().map(|u| (*u).to_owned()).collect();
        self.client.create_room(request).await.unwrap().room_id().to_owned()
    }

    /// The room, once this client's sync has seen it.
    pub async fn room(&self, room_id: &RoomId) -> Room {
        eventually(Duration::from_secs(30), "the client to know the room", || async { self.client.get_room(room_id) })
            .await
    }

    /// Waits until `user` has joined `room`, as this client sees it.
    pub async fn wait_for_join(&self, room_id: &RoomId, user: &UserId) {
        let room = self.room(room_id).await;
        eventually(Duration::from_secs(30), &format!("{user} to join"), || async {
            room.get_member_no_sync(user)
                .await
                .ok()
                .flatten()
                .filter(|m| *m.membership() == matrix_sdk::ruma::events::room::member::MembershipState::Join)
                .map(|_| ())
        })
        .await
    }

    /// Joins a room this user was invited to.
    pub async fn join(&self, room_id: &RoomId) {
        self.client.join_room_by_id(room_id).await.unwrap();
    }

    /// Sends a text message (encrypted when the room is); returns its event id.
    pub async fn send_text(&self, room_id: &RoomId, body: &str) -> OwnedEventId {
        let room = self.room(room_id).await;
        room.send(RoomMessageEventContent::text_plain(body)).await.unwrap().response.event_id
    }

    /// Everything received from `sender` in `room` so far.
    pub fn received_from(&self, room_id: &RoomId, sender: &UserId) -> Vec<Received> {
        self.received.lock().unwrap().iter().filter(|r| r.room_id == room_id && r.sender == sender).cloned().collect()
    }

    /// Waits until `count` messages from `sender` in `room` were decrypted; returns them.
    pub async fn wait_for_messages(&self, room_id: &RoomId, sender: &UserId, count: usize) -> Vec<Received> {
        eventually(Duration::from_secs(40), &format!("{count} decrypted message(s) from {sender}"), || async {
            let got = self.received_from(room_id, sender);
            (got.len() >= count).then_some(got)
        })
        .await
    }

    /// Whether this client sees every device of `user` as cross-signed by its owner; returns
    /// the device ids.
    pub async fn devices_of(&self, user: &UserId) -> Vec<(String, bool)> {
        let encryption = self.client.encryption();
        let _ = encryption.request_user_identity(user).await;
        let devices = encryption.get_user_devices(user).await.unwrap();
        devices.devices().map(|d| (d.device_id().to_string(), d.is_cross_signed_by_owner())).collect()
    }
}

impl Drop for E2eeClient {
    fn drop(&mut self) {
        self.sync.abort();
    }
}
