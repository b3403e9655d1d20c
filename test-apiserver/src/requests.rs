//! The request log: every API request as it arrived, for tests to assert on.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// One request to the Kubernetes API (the `/_test/` admin API is not logged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedRequest {
    /// `GET`, `PATCH`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string, without `?`; empty when there was none.
    pub query: String,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The body as text (lossy UTF-8).
    pub body: String,
    /// When the request arrived (before any injected latency or fault), for latency benchmarks.
    pub received_at: SystemTime,
}

impl RecordedRequest {
    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, key: &str) -> Option<String> {
        serde_urlencoded::from_str::<Vec<(String, String)>>(&self.query)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_percent_decoded() {
        let request = RecordedRequest {
            method: "GET".to_owned(),
            path: "/".to_owned(),
            query: "&fieldSelector=metadata.name%3Dweb&limit=500".to_owned(),
            content_type: None,
            body: String::new(),
            received_at: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(request.query_param("fieldSelector").as_deref(), Some("metadata.name=web"));
        assert_eq!(request.query_param("watch"), None);
    }
}
