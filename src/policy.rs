//! Who may do what: allowed-user patterns and their matching.

use std::{fmt, str::FromStr};

use ruma::{OwnedServerName, OwnedUserId, ServerName, UserId};
use serde::{Deserialize, Deserializer};

/// One `ALLOWED_USERS` entry: a full user id, or `@*:domain` for everyone on a server.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum UserPattern {
    /// Exactly this user.
    User(OwnedUserId),
    /// Every user on this server.
    Domain(OwnedServerName),
}

impl UserPattern {
    /// Whether `user` matches this pattern.
    pub fn matches(&self, user: &UserId) -> bool {
        match self {
            UserPattern::User(u) => u == user,
            UserPattern::Domain(d) => user.server_name() == d,
        }
    }
}

impl FromStr for UserPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(domain) = s.strip_prefix("@*:") {
            return ServerName::parse(domain)
                .map(UserPattern::Domain)
                .map_err(|e| format!("{s:?}: {domain:?} is not a valid server name ({e})"));
        }
        UserId::parse(s)
            .map(UserPattern::User)
            .map_err(|e| format!("{s:?} is not a full user id like @alice:example.org or @*:example.org ({e})"))
    }
}

impl fmt::Display for UserPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserPattern::User(u) => write!(f, "{u}"),
            UserPattern::Domain(d) => write!(f, "@*:{d}"),
        }
    }
}

impl fmt::Debug for UserPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl<'de> Deserialize<'de> for UserPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A list of user patterns; a user is allowed when any pattern matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<UserPattern>);

impl AllowList {
    /// Parses a comma- (or whitespace-) separated list such as `ALLOWED_USERS`.
    pub fn parse_list(s: &str) -> Result<Self, String> {
        s.split([',', ' ', '\n', '\t'])
            .filter(|p| !p.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(AllowList)
    }

    /// Whether `user` matches any entry.
    pub fn allows(&self, user: &UserId) -> bool {
        self.0.iter().any(|p| p.matches(user))
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Commands per user per minute; a sliding window over the arrival times (ms).
#[derive(Debug, Default)]
pub struct RateLimiter {
    per_minute: u32,
    seen: std::sync::Mutex<std::collections::HashMap<OwnedUserId, std::collections::VecDeque<i64>>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` commands per user (0 = no limit).
    pub fn new(per_minute: u32) -> Self {
        RateLimiter { per_minute, seen: Default::default() }
    }

    /// The configured limit.
    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Whether `user` may run a command arriving at `now_ms`; counts it when so.
    pub fn allow(&self, user: &UserId, now_ms: i64) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let times = seen.entry(user.to_owned()).or_default();
        while times.front().is_some_and(|t| now_ms - t >= 60_000) {
            times.pop_front();
        }
        if times.len() >= self.per_minute as usize {
            return false;
        }
        times.push_back(now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> OwnedUserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn an_exact_entry_allows_only_that_user() {
        let list = AllowList::parse_list("@alice:example.org").unwrap();
        assert!(list.allows(&user("@alice:example.org")));
        assert!(!list.allows(&user("@alice:evil.org")));
        assert!(!list.allows(&user("@bob:example.org")));
    }

    #[test]
    fn a_domain_entry_allows_everyone_on_that_server_only() {
        let list = AllowList::parse_list("@*:example.org").unwrap();
        assert!(list.allows(&user("@bob:example.org")));
        assert!(!list.allows(&user("@bob:example.org.evil")));
        assert!(!list.allows(&user("@bob:evil.org")));
    }

    #[test]
    fn a_list_accepts_commas_and_spaces() {
        let list = AllowList::parse_list(" @a:x.org, @b:y.org ,@*:z.org").unwrap();
        assert_eq!(list.0.len(), 3);
    }

    #[test]
    fn the_rate_limit_counts_per_user_over_a_sliding_minute() {
        let limiter = RateLimiter::new(2);
        let (a, b) = (user("@a:x.org"), user("@b:x.org"));
        assert!(limiter.allow(&a, 0));
        assert!(limiter.allow(&a, 1_000));
        assert!(!limiter.allow(&a, 2_000));
        assert!(limiter.allow(&b, 2_000), "another user has their own budget");
        assert!(limiter.allow(&a, 60_000), "the first command left the window");
        assert!(!limiter.allow(&a, 60_500));
    }

    #[test]
    fn a_zero_rate_limit_allows_everything() {
        let limiter = RateLimiter::new(0);
        assert!((0..1000).all(|i| limiter.allow(&user("@a:x.org"), i)));
    }

    #[test]
    fn a_bare_localpart_is_refused_with_an_example() {
        let err = AllowList::parse_list("alice").unwrap_err();
        assert!(err.contains("@alice:example.org"), "{err}");
    }
}
