//! A small client-server API client for the people in the tests (plain rooms).

use std::time::Duration;

use serde_json::{Value, json};

use super::eventually;

/// A logged-in user.
#[derive(Clone)]
pub struct User {
    http: reqwest::Client,
    base: String,
    /// The user id.
    pub user_id: String,
    token: String,
    txn: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl User {
    /// A user from a registration result.
    pub fn new(base: &str, user_id: String, token: String) -> Self {
        User { http: reqwest::Client::new(), base: base.into(), user_id, token, txn: Default::default() }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn ok(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert!((200..300).contains(&status), "{path}: {status} {v}");
        v
    }

    /// The access token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Creates a room (a DM-like private chat when `invite` is one user) and returns its id.
    pub async fn create_room(&self, invite: &[&str], encrypted: bool) -> String {
        let mut body = json!({ "preset": "private_chat", "invite": invite });
        if encrypted {
            body["initial_state"] = json!([{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }]);
        }
        let v = self.ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(body)).await;
        v["room_id"].as_str().unwrap().to_owned()
    }

    /// Invites `user` into `room`.
    pub async fn invite(&self, room: &str, user: &str) {
        self.ok(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{}/invite", enc(room)),
            Some(json!({ "user_id": user })),
        )
        .await;
    }

    /// Joins `room`.
    pub async fn join(&self, room: &str) {
        self.ok(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{}", enc(room)), Some(json!({}))).await;
    }

    /// Leaves `room`.
    pub async fn leave(&self, room: &str) {
        self.ok(reqwest::Method::POST, &format!("/_matrix/client/v3/rooms/{}/leave", enc(room)), Some(json!({}))).await;
    }

    /// Sends a text message and returns its event id.
    pub async fn send_text(&self, room: &str, body: &str) -> String {
        let txn = self.txn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let v = self
            .ok(
                reqwest::Method::PUT,
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t{txn}-{}", enc(room), std::process::id()),
                Some(json!({ "msgtype": "m.text", "body": body })),
            )
            .await;
        v["event_id"].as_str().unwrap().to_owned()
    }

    /// The membership of `user` in `room` as this user sees it (`join`, `invite`, `leave`, ...).
    pub async fn membership(&self, room: &str, user: &str) -> Option<String> {
        let (status, v) = self
            .call(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(room), enc(user)),
                None,
            )
            .await;
        (status == 200).then(|| v["membership"].as_str().unwrap_or_default().to_owned())
    }

    /// The latest `limit` message events of `room`, oldest first.
    pub async fn messages(&self, room: &str, limit: u32) -> Vec<Value> {
        let v = self
            .ok(
                reqwest::Method::GET,
                &format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit={limit}", enc(room)),
                None,
            )
            .await;
        let mut events: Vec<Value> = v["chunk"].as_array().cloned().unwrap_or_default();
        events.reverse();
        events
    }

    /// Messages in `room` sent by `sender`, oldest first.
    pub async fn messages_from(&self, room: &str, sender: &str) -> Vec<Value> {
        self.messages(room, 100)
            .await
            .into_iter()
            .filter(|e| e["sender"] == sender && e["type"] == "m.room.message")
            .collect()
    }

    /// Waits until `sender` has sent `count` messages into `room`; returns them.
    pub async fn wait_for_messages(&self, room: &str, sender: &str, count: usize, timeout: Duration) -> Vec<Value> {
        eventually(timeout, &format!("{count} message(s) from {sender}"), || async {
            let m = self.messages_from(room, sender).await;
            (m.len() >= count).then_some(m)
        })
        .await
    }

    /// Waits until `user`'s membership in `room` is `membership`.
    pub async fn wait_for_membership(&self, room: &str, user: &str, membership: &str, timeout: Duration) {
        eventually(timeout, &format!("{user} to be {membership} in {room}"), || async {
            (self.membership(room, user).await.as_deref() == Some(membership)).then_some(())
        })
        .await
    }
}

/// Percent-encodes a path segment.
pub fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}
