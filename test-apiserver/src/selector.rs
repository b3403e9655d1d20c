//! `fieldSelector` and `labelSelector` query parameters, parsed and matched.

use std::collections::{BTreeMap, BTreeSet};

/// A `fieldSelector` over the fields apps/v1 workloads support.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct FieldSelector {
    terms: Vec<FieldTerm>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldTerm {
    field: Field,
    equal: bool,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Namespace,
}

impl FieldSelector {
    /// Parses `metadata.name=x,metadata.namespace!=y`; other fields are a 400 as on the real server.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in text.split(',').filter(|t| !t.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: '{text}'; can't understand '{term}'"));
            };
            let field = match field.trim() {
                "metadata.name" => Field::Name,
                "metadata.namespace" => Field::Namespace,
                other => return Err(format!("field label not supported: {other}")),
            };
            terms.push(FieldTerm { field, equal, value: value.trim().to_owned() });
        }
        Ok(Self { terms })
    }

    pub(crate) fn matches(&self, namespace: &str, name: &str) -> bool {
        self.terms.iter().all(|t| {
            let actual = match t.field {
                Field::Name => name,
                Field::Namespace => namespace,
            };
            (actual == t.value) == t.equal
        })
    }

    /// The name an exact `metadata.name=` term pins, which RBAC then checks against.
    pub(crate) fn exact_name(&self) -> Option<&str> {
        self.terms.iter().find(|t| t.field == Field::Name && t.equal).map(|t| t.value.as_str())
    }
}

/// A set-based `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LabelSelector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e,!f,g in (h,i),j notin (k)`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let requirements = split_top_level(text)
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|term| parse_requirement(term).ok_or_else(|| format!("unable to parse requirement: {term:?}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { requirements })
    }

    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, set) => labels.get(k).is_some_and(|v| set.contains(v)),
            Requirement::NotIn(k, set) => labels.get(k).is_none_or(|v| !set.contains(v)),
        })
    }
}

fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn parse_requirement(term: &str) -> Option<Requirement> {
    let set = |rest: &str| -> Option<BTreeSet<String>> {
        let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    if let Some((key, rest)) = term.split_once(" notin ") {
        return Some(Requirement::NotIn(key.trim().to_owned(), set(rest)?));
    }
    if let Some((key, rest)) = term.split_once(" in ") {
        return Some(Requirement::In(key.trim().to_owned(), set(rest)?));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return Some(Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Some(Requirement::Equals(k.trim().to_owned(), v.trim().to_owned()));
    }
    if let Some(key) = term.strip_prefix('!') {
        return Some(Requirement::NotExists(key.trim().to_owned()));
    }
    let valid = term.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    valid.then(|| Requirement::Exists(term.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_field_selector_matches_only_that_name_and_pins_it() {
        let selector = FieldSelector::parse("metadata.name=web").unwrap();
        assert!(selector.matches("apps", "web"));
        assert!(!selector.matches("apps", "db"));
        assert_eq!(selector.exact_name(), Some("web"));
    }

    #[test]
    fn an_unsupported_field_is_refused_with_the_real_message() {
        assert_eq!(FieldSelector::parse("spec.replicas=1"), Err("field label not supported: spec.replicas".to_owned()));
    }

    #[test]
    fn label_selectors_support_equality_sets_and_existence() {
        let labels = BTreeMap::from([("app".to_owned(), "web".to_owned()), ("tier".to_owned(), "front".to_owned())]);
        for (selector, expected) in [
            ("app=web", true),
            ("app==web,tier!=back", true),
            ("app in (web,db),!missing", true),
            ("tier notin (front)", false),
            ("missing", false),
            ("", true),
        ] {
            assert_eq!(LabelSelector::parse(selector).unwrap().matches(&labels), expected, "{selector}");
        }
    }
}
