//! Patch formats a PATCH may carry: JSON merge patch (RFC 7386), a strategic merge patch
//! reduced to what scaling and annotations need, and JSON patch (RFC 6902).

use serde_json::{Map, Value};

/// A patch format, from the request's `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    Merge,
    StrategicMerge,
    Json,
}

impl PatchType {
    /// Reads a content type, ignoring parameters such as `charset`; `None` is a 415.
    pub(crate) fn from_content_type(content_type: Option<&str>) -> Option<Self> {
        let media = content_type?.split(';').next()?.trim();
        match media {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/strategic-merge-patch+json" => Some(Self::StrategicMerge),
            "application/json-patch+json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// Why a patch could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PatchError {
    /// The body is not JSON.
    #[error("error decoding patch: {0}")]
    Decode(String),
    /// A merge patch that is not a JSON object.
    #[error("patch must be a JSON object")]
    NotAnObject,
    /// A JSON patch that is not an array of operations.
    #[error("json patch must be an array of operations")]
    NotAnArray,
    /// A JSON patch operation that is malformed.
    #[error("invalid json patch operation at index {index}: {why}")]
    BadOperation { index: usize, why: String },
    /// A JSON patch path that does not exist in the document.
    #[error("json patch {op} operation does not apply: doc is missing path: \"{path}\"")]
    MissingPath { op: String, path: String },
    /// A JSON patch `test` operation that did not hold.
    #[error("testing value {path} failed: test failed")]
    TestFailed { path: String },
}

/// Applies `body` in the given format to `target`.
pub(crate) fn apply(kind: PatchType, target: &mut Value, body: &[u8]) -> Result<(), PatchError> {
    let patch: Value = serde_json::from_slice(body).map_err(|e| PatchError::Decode(e.to_string()))?;
    match kind {
        PatchType::Merge | PatchType::StrategicMerge if !patch.is_object() => Err(PatchError::NotAnObject),
        PatchType::Merge => {
            merge(target, &patch);
            Ok(())
        }
        PatchType::StrategicMerge => {
            strategic_merge(target, &patch);
            Ok(())
        }
        PatchType::Json => json_patch(target, &patch),
    }
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub(crate) fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else { return };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Merge patch semantics, except that `$patch` directives are honoured and lists of objects
/// with a `name` merge by name (as containers, env and volumes do).
fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (target @ Value::Object(_), Value::Object(patch)) => {
            match patch.get("$patch").and_then(Value::as_str) {
                Some("delete") => {
                    *target = Value::Object(Map::new());
                    return;
                }
                Some("replace") => {
                    let mut replaced = patch.clone();
                    replaced.remove("$patch");
                    *target = Value::Object(replaced);
                    return;
                }
                _ => {}
            }
            let Value::Object(map) = target else { return };
            for (key, value) in patch {
                if key.starts_with('$') {
                    continue;
                }
                if value.is_null() {
                    map.remove(key);
                } else {
                    strategic_merge(map.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (Value::Array(items), Value::Array(patch)) if named(items) && named(patch) => {
            for element in patch {
                let name = &element["name"];
                match items.iter_mut().position(|item| &item["name"] == name) {
                    Some(i) if element.get("$patch").and_then(Value::as_str) == Some("delete") => {
                        items.remove(i);
                    }
                    Some(i) => strategic_merge(&mut items[i], element),
                    None => items.push(element.clone()),
                }
            }
        }
        (target, patch) => {
            *target = patch.clone();
            if let Value::Object(_) = patch {
                strip_directives(target);
            }
        }
    }
}

fn named(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i.get("name").is_some_and(Value::is_string))
}

fn strip_directives(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|k, _| !k.starts_with('$'));
        map.values_mut().for_each(strip_directives);
    }
}

/// RFC 6902 with the six operations.
fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops = patch.as_array().ok_or(PatchError::NotAnArray)?;
    for (index, op) in ops.iter().enumerate() {
        let bad = |why: &str| PatchError::BadOperation { index, why: why.to_owned() };
        let name = op.get("op").and_then(Value::as_str).ok_or_else(|| bad("missing op"))?;
        let path = op.get("path").and_then(Value::as_str).ok_or_else(|| bad("missing path"))?;
        let missing = || PatchError::MissingPath { op: name.to_owned(), path: path.to_owned() };
        let value = || op.get("value").cloned().ok_or_else(|| bad("missing value"));
        let from = || op.get("from").and_then(Value::as_str).ok_or_else(|| bad("missing from"));
        match name {
            "add" => add(target, path, value()?).ok_or_else(missing)?,
            "remove" => {
                remove(target, path).ok_or_else(missing)?;
            }
            "replace" => {
                *target.pointer_mut(path).ok_or_else(missing)? = value()?;
            }
            "move" => {
                let moved = remove(target, from()?).ok_or_else(missing)?;
                add(target, path, moved).ok_or_else(missing)?;
            }
            "copy" => {
                let copied = target.pointer(from()?).cloned().ok_or_else(missing)?;
                add(target, path, copied).ok_or_else(missing)?;
            }
            "test" => {
                if target.pointer(path) != Some(&value()?) {
                    return Err(PatchError::TestFailed { path: path.to_owned() });
                }
            }
            _ => return Err(bad("unknown op")),
        }
    }
    Ok(())
}

fn split(path: &str) -> Option<(&str, String)> {
    let (parent, last) = path.rsplit_once('/')?;
    Some((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn add(target: &mut Value, path: &str, value: Value) -> Option<()> {
    if path.is_empty() {
        *target = value;
        return Some(());
    }
    let (parent, key) = split(path)?;
    match target.pointer_mut(parent)? {
        Value::Object(map) => {
            map.insert(key, value);
        }
        Value::Array(items) if key == "-" => items.push(value),
        Value::Array(items) => {
            let i: usize = key.parse().ok()?;
            (i <= items.len()).then(|| items.insert(i, value))?;
        }
        _ => return None,
    }
    Some(())
}

fn remove(target: &mut Value, path: &str) -> Option<Value> {
    let (parent, key) = split(path)?;
    match target.pointer_mut(parent)? {
        Value::Object(map) => map.remove(&key),
        Value::Array(items) => {
            let i: usize = key.parse().ok()?;
            (i < items.len()).then(|| items.remove(i))
        }
        _ => None,
    }
}

/// The `fieldsV1` set a merge patch (or replaced object) sets, e.g. `{"f:spec":{"f:replicas":{}}}`.
pub(crate) fn fields_v1(patch: &Value) -> Value {
    let Value::Object(map) = patch else {
        return Value::Object(Map::new());
    };
    Value::Object(
        map.iter()
            .filter(|(k, v)| !v.is_null() && !k.starts_with('$'))
            .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
            .collect(),
    )
}

/// The `fieldsV1` set a patch body of `kind` touches.
pub(crate) fn touched_fields(kind: PatchType, body: &[u8]) -> Value {
    let patch: Value = serde_json::from_slice(body).unwrap_or_default();
    match kind {
        PatchType::Merge | PatchType::StrategicMerge => fields_v1(&patch),
        PatchType::Json => {
            let mut fields = Value::Object(Map::new());
            let paths = patch.as_array().into_iter().flatten();
            for path in paths.filter_map(|op| op.get("path").and_then(Value::as_str)) {
                let keys: Vec<&str> = path.split('/').skip(1).collect();
                let leaf = keys.into_iter().rev().fold(Value::Object(Map::new()), |inner, key| {
                    let key = key.replace("~1", "/").replace("~0", "~");
                    Value::Object(Map::from_iter([(format!("f:{key}"), inner)]))
                });
                union(&mut fields, &leaf);
            }
            fields
        }
    }
}

/// The union of two `fieldsV1` sets.
pub(crate) fn union(into: &mut Value, other: &Value) {
    merge(into, other);
}

/// Removes from the field set `from` every leaf field of `taken` (FieldsV1 objects), and the
/// objects that leaves empty: what an updater takes over is no longer another manager's.
pub(crate) fn subtract(from: &mut Value, taken: &Value) {
    let (Some(from), Some(taken)) = (from.as_object_mut(), taken.as_object()) else { return };
    for (key, sub) in taken {
        let leaf = sub.as_object().is_none_or(|o| o.is_empty());
        if leaf {
            from.remove(key);
        } else if let Some(inner) = from.get_mut(key) {
            subtract(inner, sub);
            if inner.as_object().is_some_and(|o| o.is_empty()) {
                from.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_taken_field_leaves_the_other_managers_set_and_empty_parents_go_too() {
        let mut fields = json!({"f:spec": {"f:replicas": {}, "f:template": {"f:x": {}}}});
        subtract(&mut fields, &json!({"f:spec": {"f:replicas": {}}}));
        assert_eq!(fields, json!({"f:spec": {"f:template": {"f:x": {}}}}));
        let mut only = json!({"f:spec": {"f:replicas": {}}});
        subtract(&mut only, &json!({"f:spec": {"f:replicas": {}}}));
        assert_eq!(only, json!({}));
    }

    #[test]
    fn merge_patch_follows_the_rfc_7386_examples() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));

        let mut doc = json!({"a": ["b"]});
        merge(&mut doc, &json!({"a": "c"}));
        assert_eq!(doc, json!({"a": "c"}));
    }

    #[test]
    fn strategic_merge_merges_named_lists_by_name() {
        let mut doc = json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]});
        strategic_merge(&mut doc, &json!({"containers": [{"name": "b", "image": "z"}]}));
        assert_eq!(doc, json!({"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "z"}]}));
    }

    #[test]
    fn json_patch_replaces_adds_and_tests() {
        let mut doc = json!({"spec": {"replicas": 1}, "metadata": {}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/spec/replicas", "value": 1},
                {"op": "replace", "path": "/spec/replicas", "value": 3},
                {"op": "add", "path": "/metadata/annotations", "value": {"a~b/c": "1"}},
                {"op": "copy", "from": "/spec/replicas", "path": "/metadata/copy"}
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"spec": {"replicas": 3}, "metadata": {"annotations": {"a~b/c": "1"}, "copy": 3}}));
    }

    #[test]
    fn json_patch_on_a_missing_path_fails() {
        let mut doc = json!({});
        assert_eq!(
            json_patch(&mut doc, &json!([{"op": "replace", "path": "/spec/replicas", "value": 3}])),
            Err(PatchError::MissingPath { op: "replace".to_owned(), path: "/spec/replicas".to_owned() })
        );
    }

    #[test]
    fn content_types_ignore_parameters_and_reject_apply() {
        assert_eq!(
            PatchType::from_content_type(Some("application/merge-patch+json; charset=utf-8")),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type(Some("application/apply-patch+yaml")), None);
        assert_eq!(PatchType::from_content_type(None), None);
    }

    #[test]
    fn json_patch_fields_follow_the_operation_paths() {
        let body = br#"[{"op":"replace","path":"/spec/replicas","value":2}]"#;
        assert_eq!(touched_fields(PatchType::Json, body), json!({"f:spec": {"f:replicas": {}}}));
    }

    #[test]
    fn fields_v1_names_every_set_leaf() {
        assert_eq!(
            fields_v1(&json!({"spec": {"replicas": 2}, "metadata": {"annotations": {"x": null}}})),
            json!({"f:spec": {"f:replicas": {}}, "f:metadata": {"f:annotations": {}}})
        );
    }
}
