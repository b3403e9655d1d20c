//! `?watch=true`: a chunked stream of newline-delimited JSON events, with bookmarks, an
//! in-stream 410 for a compacted resourceVersion, and a close at `timeoutSeconds`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::request::Query;
use crate::status::Status;
use crate::store::{Event, Filter, WatchStart};
use crate::workload::WorkloadKind;

/// How long a watch without `timeoutSeconds` stays open (the real server's minimum).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// How often an idle watch gets a BOOKMARK, as the watch cache's heartbeat.
const BOOKMARK_EVERY: Duration = Duration::from_secs(60);

/// One line of the stream, `type` before `object` as the real server writes it.
#[derive(Serialize)]
struct Line<'a, T> {
    #[serde(rename = "type")]
    type_: &'a str,
    object: &'a T,
}

fn line(type_: &str, object: &impl Serialize) -> Bytes {
    let mut bytes = serde_json::to_vec(&Line { type_, object }).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn bookmark(kind: WorkloadKind, resource_version: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line("BOOKMARK", &json!({"kind": kind.kind(), "apiVersion": "apps/v1", "metadata": metadata}))
}

/// What one watch wants.
struct Watch {
    kind: WorkloadKind,
    filter: Filter,
    bookmarks: bool,
    initial_events_end: bool,
    deadline: Instant,
    events: broadcast::Receiver<Arc<Event>>,
}

/// Starts a watch and answers 200 with its stream.
pub(crate) fn serve(cluster: &Cluster, kind: WorkloadKind, filter: Filter, query: &Query) -> Result<Response, Status> {
    let from = match query.resource_version.as_deref() {
        _ if query.send_initial_events => None,
        None | Some("0") => None,
        Some(rv) => {
            Some(rv.parse::<u64>().map_err(|_| Status::bad_request(format!("invalid resource version: {rv}")))?)
        }
    };
    let (start, events) = cluster.store().watch(kind, &filter, from);
    let timeout = query.timeout_seconds.map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let watch = Watch {
        kind,
        filter,
        bookmarks: query.allow_watch_bookmarks,
        initial_events_end: query.send_initial_events && query.allow_watch_bookmarks,
        deadline: Instant::now() + timeout,
        events,
    };
    let (lines, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream(cluster.clone(), watch, start, lines));
    let body = Body::from_stream(futures_util::stream::unfold(receiver, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(|e| Status::internal(&e.to_string()))
}

async fn stream(cluster: Cluster, mut watch: Watch, start: WatchStart, lines: mpsc::Sender<Bytes>) {
    let (initial, initial_rv) = match start {
        WatchStart::Expired(requested, oldest) => {
            let error = Status::expired(requested, oldest);
            let _ = send(&lines, line("ERROR", &error)).await;
            return;
        }
        WatchStart::Now { events, resource_version } => (events, Some(resource_version)),
        WatchStart::Replay(events) => (events, None),
    };
    for event in initial {
        if send_event(&watch, &lines, &event).await.is_err() {
            return;
        }
    }
    if let Some(rv) = initial_rv.filter(|_| watch.initial_events_end)
        && send(&lines, bookmark(watch.kind, rv, true)).await.is_err()
    {
        return;
    }
    let timeout = watch.deadline.saturating_duration_since(Instant::now());
    let mut last_bookmark =
        watch.deadline.checked_sub(Duration::from_secs(2).min(timeout / 2)).filter(|_| watch.bookmarks);
    let mut heartbeat = Instant::now() + BOOKMARK_EVERY;
    let stopped = cluster.stopped();
    tokio::pin!(stopped);
    loop {
        let bookmark_at = last_bookmark.map_or(heartbeat, |l| l.min(heartbeat));
        tokio::select! {
            received = watch.events.recv() => match received {
                Ok(event) => {
                    if send_event(&watch, &lines, &event).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            () = tokio::time::sleep_until(bookmark_at), if watch.bookmarks => {
                if last_bookmark.is_some_and(|l| l <= Instant::now()) {
                    last_bookmark = None;
                }
                heartbeat = Instant::now() + BOOKMARK_EVERY;
                if send_bookmark(&cluster, &mut watch, &lines).await.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(watch.deadline) => return,
            () = &mut stopped => return,
            () = lines.closed() => return,
        }
    }
}

/// The client went away, or fell too far behind to be caught up.
struct Closed;

async fn send(lines: &mpsc::Sender<Bytes>, bytes: Bytes) -> Result<(), Closed> {
    lines.send(bytes).await.map_err(|_| Closed)
}

async fn send_event(watch: &Watch, lines: &mpsc::Sender<Bytes>, event: &Event) -> Result<(), Closed> {
    if event.key.kind != watch.kind || !watch.filter.matches(&event.key, &event.labels) {
        return Ok(());
    }
    send(lines, line(event.type_.as_str(), &event.object)).await
}

/// Sends what is already queued, then a BOOKMARK at the current resourceVersion, so the
/// bookmark never overtakes an event older than it.
async fn send_bookmark(cluster: &Cluster, watch: &mut Watch, lines: &mpsc::Sender<Bytes>) -> Result<(), Closed> {
    let rv = cluster.resource_version();
    loop {
        match watch.events.try_recv() {
            Ok(event) => send_event(watch, lines, &event).await?,
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(_) => return Err(Closed),
        }
    }
    send(lines, bookmark(watch.kind, rv, false)).await
}
