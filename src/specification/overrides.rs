//! `--set key.path=value` overrides: which paths may be set, and how a value is parsed.

use super::err;
use super::source::Sourced;
use crate::error::{Origin, SpecError};

/// Parse a `--set` value as TOML, falling back to a bare string (`--set a.b=pan`).
pub fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

pub(super) fn apply_override(src: &mut Sourced, arg: &str) -> Result<(), SpecError> {
    let origin = Origin::Override {
        arg: arg.to_string(),
    };
    let Some((path, value)) = arg.split_once('=') else {
        return Err(err(
            origin,
            arg,
            "an override must look like key.path=value",
        ));
    };
    let path = path.trim();
    let value = parse_value(value.trim());
    set_path(&mut src.table, path, value).map_err(|m| err(origin.clone(), path, m))?;
    let sub = format!("{path}.");
    src.origins.retain(|p, _| !p.starts_with(&sub));
    src.origins.insert(path.to_string(), origin);
    Ok(())
}

pub(super) const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "seeds",
    "device",
    "dtype",
    "summary",
    "stages",
    "sweep",
];

/// Set a dotted path in a config table. Only paths into existing stages and known top-level
/// keys are accepted; unknown parameter names inside a stage are caught by its kind.
pub(super) fn set_path(
    table: &mut toml::Table,
    path: &str,
    value: toml::Value,
) -> Result<(), String> {
    let parts: Vec<&str> = path.split('.').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("unknown path `{path}`: empty segment"));
    }
    if !TOP_KEYS.contains(&parts[0]) {
        return Err(format!(
            "unknown path `{path}`: `{}` is not a spec key (one of {})",
            parts[0],
            TOP_KEYS.join(", ")
        ));
    }
    if parts[0] == "stages" {
        if parts.len() < 3 {
            return Err(format!(
                "unknown path `{path}`: name a stage parameter, as stages.NAME.KEY"
            ));
        }
        let stages = table.get("stages").and_then(|s| s.as_table());
        if !stages.is_some_and(|s| s.contains_key(parts[1])) {
            let names: Vec<String> = stages
                .map(|s| s.keys().cloned().collect())
                .unwrap_or_default();
            return Err(format!(
                "unknown path `{path}`: no stage `{}` in this spec (stages: {})",
                parts[1],
                names.join(", ")
            ));
        }
    } else if parts[0] == "sweep" {
        // Sweep axes can be overridden as a whole: `--set sweep.grid.stages.data.size=[16, 32]`.
        if parts.len() < 3 || !(parts[1] == "grid" || parts[1] == "zip") {
            return Err(format!(
                "unknown path `{path}`: only sweep.grid.PATH and sweep.zip.PATH can be set"
            ));
        }
    } else if parts.len() > 1 {
        return Err(format!(
            "unknown path `{path}`: `{}` has no sub-keys",
            parts[0]
        ));
    }
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("unknown path `{path}`: `{p}` is not a table")),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
