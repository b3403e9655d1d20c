//! Injected faults: the next N matching requests answer with an error status instead.

use serde::{Deserialize, Serialize};

/// "The next `times` requests (matching `method` and `path_contains`, if given) answer `status`."
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// 401, 403, 404, 409, 429, 500, 503 or 504 get the real server's Status body.
    pub status: u16,
    /// How many requests it answers before it is used up.
    pub times: usize,
    /// Only requests whose `path?query` contains this.
    #[serde(default)]
    pub path_contains: Option<String>,
    /// Only requests with this method (any case).
    #[serde(default)]
    pub method: Option<String>,
}

impl Fault {
    /// A fault for the next `times` requests of any kind.
    pub fn new(status: u16, times: usize) -> Self {
        Self { status, times, path_contains: None, method: None }
    }

    /// Limits the fault to requests whose `path?query` contains `fragment`.
    pub fn on_path(mut self, fragment: &str) -> Self {
        self.path_contains = Some(fragment.to_owned());
        self
    }

    /// Limits the fault to requests with `method`.
    pub fn on_method(mut self, method: &str) -> Self {
        self.method = Some(method.to_owned());
        self
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self.path_contains.as_ref().is_none_or(|p| target.contains(p.as_str()))
    }
}

/// Faults waiting to fire, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct Faults {
    pending: Vec<Fault>,
}

impl Faults {
    pub(crate) fn push(&mut self, fault: Fault) {
        if fault.times > 0 {
            self.pending.push(fault);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
    }

    /// Uses up one firing of the first fault matching the request, and returns its status.
    pub(crate) fn take(&mut self, method: &str, target: &str) -> Option<u16> {
        let i = self.pending.iter().position(|f| f.matches(method, target))?;
        let fault = &mut self.pending[i];
        let status = fault.status;
        fault.times -= 1;
        if fault.times == 0 {
            self.pending.remove(i);
        }
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_fires_exactly_times_then_is_gone() {
        let mut faults = Faults::default();
        faults.push(Fault::new(503, 2));
        assert_eq!(faults.take("GET", "/x"), Some(503));
        assert_eq!(faults.take("GET", "/x"), Some(503));
        assert_eq!(faults.take("GET", "/x"), None);
    }

    #[test]
    fn a_fault_only_fires_on_matching_method_and_path() {
        let mut faults = Faults::default();
        faults.push(Fault::new(409, 1).on_method("patch").on_path("/scale"));
        assert_eq!(faults.take("GET", "/a/scale"), None);
        assert_eq!(faults.take("PATCH", "/a"), None);
        assert_eq!(faults.take("PATCH", "/a/scale?fieldManager=x"), Some(409));
    }
}
