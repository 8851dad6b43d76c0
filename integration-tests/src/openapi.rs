//! Checks API responses against `vmm/api/openapi.json`: the operation must exist, the status must
//! be documented for it (or fall under `default`), and a JSON body must match its schema.
//!
//! The validator covers the schema subset the document uses: `$ref`, `type`, `properties`,
//! `required`, `additionalProperties: false`, `items`, `enum`, `minimum` and `maximum`.

use std::sync::OnceLock;

use serde_json::Value;

fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let text = include_str!("../../vmm/api/openapi.json");
        serde_json::from_str(text).expect("openapi.json is valid JSON")
    })
}

/// Resolves a local `$ref` such as `#/components/schemas/Error`.
fn resolve(schema: &Value) -> &Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').expect("local $ref");
            resolve(
                document()
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {r}")),
            )
        }
        None => schema,
    }
}

/// Every way `value` breaks `schema`, with JSON-pointer-like locations.
pub fn violations(schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let schema = resolve(schema);
    let mut out = Vec::new();
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return out;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            other => panic!("schema type {other} not supported by this checker"),
        };
        if !ok {
            out.push(format!("{at}: expected {t}, got {value}"));
            return out;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            out.push(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(v)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if v < min {
            out.push(format!("{at}: {v} < minimum {min}"));
        }
    }
    if let (Some(max), Some(v)) = (
        schema.get("maximum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if v > max {
            out.push(format!("{at}: {v} > maximum {max}"));
        }
    }
    if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
        for (i, v) in list.iter().enumerate() {
            out.extend(violations(items, v, &format!("{at}/{i}")));
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap_or_default();
            if !obj.contains_key(name) {
                out.push(format!("{at}: missing required {name}"));
            }
        }
        for (key, v) in obj {
            match props.and_then(|p| p.get(key)) {
                Some(sub) => out.extend(violations(sub, v, &format!("{at}/{key}"))),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    out.push(format!("{at}: undocumented property {key}"))
                }
                None => {}
            }
        }
    }
    out
}

/// The documented operation for `method` on `path` (templated segments match anything).
fn operation(method: &str, path: &str) -> Option<&'static Value> {
    let paths = document()["paths"].as_object()?;
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').collect();
    paths.iter().find_map(|(template, item)| {
        let t: Vec<&str> = template.split('/').collect();
        let matches = t.len() == segments.len()
            && t.iter()
                .zip(&segments)
                .all(|(a, b)| a == b || (a.starts_with('{') && a.ends_with('}')));
        matches.then(|| item.get(method.to_ascii_lowercase()))?
    })
}

/// Panics with the reasons if a response to `method path` does not match the document.
pub fn check_response(method: &str, path: &str, status: u16, body: &str) {
    let op = match operation(method, path) {
        Some(op) => op,
        None => {
            // Undocumented operations may only be refused, with the documented error body.
            assert!(
                status >= 400,
                "{method} {path} answered {status} but is not documented"
            );
            return check_error_body(method, path, status, body);
        }
    };
    let responses = &op["responses"];
    let response = responses
        .get(status.to_string())
        .or_else(|| responses.get("default"))
        .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
    match response.pointer("/content/application~1json/schema") {
        Some(schema) => {
            let value: Value = serde_json::from_str(body).unwrap_or_else(|e| {
                panic!("{method} {path} {status}: body is not JSON ({e}): {body:?}")
            });
            let problems = violations(schema, &value, "");
            assert!(
                problems.is_empty(),
                "{method} {path} {status} does not match openapi.json:\n{}\nbody: {body}",
                problems.join("\n")
            );
        }
        None if response.get("content").is_none() => {
            assert!(
                body.is_empty(),
                "{method} {path} {status}: documented without a body"
            );
        }
        None => {}
    }
}

/// Checks an error response against the `Error` schema.
pub fn check_error_body(method: &str, path: &str, status: u16, body: &str) {
    let value: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} {path} {status}: error body is not JSON ({e})"));
    let problems = violations(&document()["components"]["schemas"]["Error"], &value, "");
    assert!(
        problems.is_empty(),
        "{method} {path} {status}: {}",
        problems.join("; ")
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_checker_catches_each_kind_of_mismatch() {
        let schema = json!({"$ref": "#/components/schemas/MachineConfiguration"});
        assert!(violations(&schema, &json!({"vcpu_count": 2, "mem_size_mib": 64}), "").is_empty());
        let bad = violations(
            &schema,
            &json!({"vcpu_count": 0, "extra": 1, "smt": "no"}),
            "",
        );
        assert_eq!(bad.len(), 4, "{bad:?}"); // minimum, missing mem, extra, smt type
        let state = json!({"$ref": "#/components/schemas/InstanceInfo"});
        let e = violations(
            &state,
            &json!({"id": "a", "state": "Sleeping", "vmm_version": "1", "app_name": "p"}),
            "",
        );
        assert_eq!(e.len(), 1, "{e:?}");
        let devices = json!({"$ref": "#/components/schemas/PredictorStatus"});
        let device =
            json!({"id": 0, "name": "serial", "kind": "console", "bus": "pio", "base": 1016});
        let status =
            |d: Value| json!({"config": {}, "running": true, "windows": 0, "devices": [d]});
        let e = violations(&devices, &status(device.clone()), "");
        assert!(e.iter().all(|e| e.starts_with("/config")), "{e:?}");
        let mut bad = device;
        bad["kind"] = json!("toaster");
        let e = violations(&devices, &status(bad), "");
        assert!(e.iter().any(|e| e.starts_with("/devices/0/kind")), "{e:?}");
    }

    #[test]
    fn every_reference_in_the_document_resolves() {
        fn walk(v: &Value) {
            match v {
                Value::Object(m) => {
                    if m.contains_key("$ref") {
                        resolve(v);
                    }
                    m.values().for_each(walk);
                }
                Value::Array(a) => a.iter().for_each(walk),
                _ => {}
            }
        }
        walk(document());
        assert!(operation("GET", "/").is_some());
        assert!(operation("DELETE", "/").is_none());
    }
}
