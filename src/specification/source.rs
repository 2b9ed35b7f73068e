//! Reading spec files: `extends` chains merged into one table, with the file and line of every
//! key path (so any later error can name where a value was set).

use super::err;
use crate::error::{Origin, SpecError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(super) type Origins = BTreeMap<String, Origin>;

/// A merged table with the origin of every key path in it.
#[derive(Debug, Clone, Default)]
pub(super) struct Sourced {
    pub(super) table: toml::Table,
    pub(super) origins: Origins,
}

impl Sourced {
    /// The origin of `path` or of its nearest ancestor that has one.
    pub(super) fn origin_of(&self, path: &str, fallback: &Origin) -> Origin {
        let mut p = path.to_string();
        loop {
            if let Some(o) = self.origins.get(&p) {
                return o.clone();
            }
            match p.rfind('.') {
                Some(i) => p.truncate(i),
                None => return fallback.clone(),
            }
        }
    }
}

pub(super) fn load_file(path: &Path, stack: &mut Vec<PathBuf>) -> Result<Sourced, SpecError> {
    let here = Origin::File {
        path: path.to_path_buf(),
        line: 0,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(here.clone(), "", format!("cannot read spec file: {e}")))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
        // The key written on the offending line, if the line has one.
        let src_line = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
        let key = src_line
            .split_once('=')
            .map(|(k, _)| {
                k.trim()
                    .trim_matches(|c: char| "\"'[]".contains(c))
                    .to_string()
            })
            .unwrap_or_default();
        err(
            Origin::File {
                path: path.to_path_buf(),
                line,
            },
            key,
            format!("invalid TOML: {}", e.message()),
        )
    })?;
    let mut origins = Origins::new();
    if let Ok(doc) = toml_edit::ImDocument::parse(text.clone()) {
        collect_origins(doc.as_table(), "", path, &text, &mut origins);
    }
    let mut own = Sourced { table, origins };
    let Some(ext) = own.table.remove("extends") else {
        return Ok(own);
    };
    let ext_origin = own.origin_of("extends", &here);
    // One base file, or several merged in order (each over the one before), then this file.
    let names: Vec<&str> = match &ext {
        toml::Value::String(s) => vec![s.as_str()],
        toml::Value::Array(a) if !a.is_empty() && a.iter().all(|v| v.is_str()) => {
            a.iter().filter_map(|v| v.as_str()).collect()
        }
        _ => {
            return Err(err(
                ext_origin,
                "extends",
                "must be a path (a string) to the base spec file, or a non-empty list of such \
                 paths (merged in order, each over the one before)",
            ))
        }
    };
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    stack.push(canon(path));
    let mut merged: Option<Sourced> = None;
    for ext_name in names {
        let base_path = path.parent().unwrap_or(Path::new(".")).join(ext_name);
        let base_canon = canon(&base_path);
        if stack.contains(&base_canon) {
            let chain: Vec<String> = stack.iter().map(|p| p.display().to_string()).collect();
            return Err(err(
                ext_origin,
                "extends",
                format!(
                    "cycle in `extends`: {} -> {}",
                    chain.join(" -> "),
                    base_canon.display()
                ),
            ));
        }
        if !base_path.is_file() {
            return Err(err(
                ext_origin,
                "extends",
                format!("base spec {} does not exist", base_path.display()),
            ));
        }
        let base = load_file(&base_path, stack)?;
        match merged.as_mut() {
            None => merged = Some(base),
            Some(m) => merge(m, base, ""),
        }
    }
    stack.pop();
    own.origins.remove("extends");
    let mut base = merged.expect("at least one base");
    merge(&mut base, own, "");
    Ok(base)
}

/// Deep-merge `over` into `base`: tables merge key by key, anything else replaces.
pub(super) fn merge(base: &mut Sourced, over: Sourced, prefix: &str) {
    fn rec(base: &mut toml::Table, over: toml::Table, prefix: &str, origins: &mut Origins) {
        for (k, v) in over {
            let path = join(prefix, &k);
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(o)) => rec(b, o, &path, origins),
                (_, v) => {
                    let sub = format!("{path}.");
                    origins.retain(|p, _| !p.starts_with(&sub));
                    base.insert(k, v);
                }
            }
        }
    }
    rec(&mut base.table, over.table, prefix, &mut base.origins);
    base.origins.extend(over.origins);
}

pub(super) fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_string()
    } else {
        format!("{prefix}.{k}")
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(super) fn collect_origins(
    table: &toml_edit::Table,
    prefix: &str,
    path: &Path,
    text: &str,
    out: &mut Origins,
) {
    let at = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| Origin::File {
            path: path.to_path_buf(),
            line: line_of(text, s.start),
        })
    };
    for (k, item) in table.iter() {
        let p = join(prefix, k);
        if let Some((key, _)) = table.get_key_value(k) {
            if let Some(o) = at(key.span()) {
                out.insert(p.clone(), o);
            }
        }
        collect_item(item, &p, path, text, out);
    }
    fn collect_item(item: &toml_edit::Item, p: &str, path: &Path, text: &str, out: &mut Origins) {
        match item {
            toml_edit::Item::Table(t) => collect_origins(t, p, path, text, out),
            toml_edit::Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    let ip = format!("{p}.{i}");
                    if let Some(s) = t.span() {
                        out.insert(
                            ip.clone(),
                            Origin::File {
                                path: path.to_path_buf(),
                                line: line_of(text, s.start),
                            },
                        );
                    }
                    collect_origins(t, &ip, path, text, out);
                }
            }
            toml_edit::Item::Value(v) => collect_value(v, p, path, text, out),
            toml_edit::Item::None => {}
        }
    }
    fn collect_value(v: &toml_edit::Value, p: &str, path: &Path, text: &str, out: &mut Origins) {
        match v {
            toml_edit::Value::InlineTable(t) => {
                for (k, item) in t.iter() {
                    let kp = join(p, k);
                    if let Some((key, _)) = t.get_key_value(k) {
                        if let Some(s) = key.span() {
                            out.insert(
                                kp.clone(),
                                Origin::File {
                                    path: path.to_path_buf(),
                                    line: line_of(text, s.start),
                                },
                            );
                        }
                    }
                    collect_value(item, &kp, path, text, out);
                }
            }
            toml_edit::Value::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    let ip = format!("{p}.{i}");
                    if let Some(s) = e.span() {
                        out.insert(
                            ip.clone(),
                            Origin::File {
                                path: path.to_path_buf(),
                                line: line_of(text, s.start),
                            },
                        );
                    }
                    collect_value(e, &ip, path, text, out);
                }
            }
            _ => {}
        }
    }
}
