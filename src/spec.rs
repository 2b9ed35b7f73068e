//! Experiment specs: TOML files that may `extends` a base file, merged into one table,
//! overridden by `--set key.path=value`, validated, and expanded by the `[sweep]` section into
//! variants. Every error names the file, the line and the key (see `docs/spec-format.md`).
//!
//! Validation happens entirely here, before anything touches the run store, so a malformed
//! spec never leaves a trace.

use crate::error::{Origin, SpecError};
use crate::stages;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use crate::device::Device;

/// The top level of a spec after merging, as validated (stage params are checked per kind).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecDoc {
    /// Experiment name: runs are grouped under it in the store.
    name: String,
    #[serde(default)]
    description: String,
    /// Every variant runs once per seed.
    #[serde(default = "default_seeds")]
    seeds: Vec<u64>,
    #[serde(default)]
    device: Device,
    /// Metric keys (`stage/key`) shown in the summary table; empty = final metrics of the last stage.
    #[serde(default)]
    summary: Vec<String>,
    #[serde(default)]
    stages: toml::Table,
    #[serde(default)]
    #[allow(dead_code)]
    // consumed from the raw table by `expand`, declared here for validation
    sweep: SweepDoc,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SweepDoc {
    #[serde(default)]
    grid: toml::Table,
    #[serde(default)]
    zip: toml::Table,
    #[serde(default)]
    variants: Vec<toml::Table>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// A loaded, validated and expanded spec.
#[derive(Debug, Clone)]
pub struct Spec {
    pub path: PathBuf,
    pub name: String,
    pub description: String,
    pub summary: Vec<String>,
    pub variants: Vec<Variant>,
    /// The merged spec (after `extends` and `--set`, before the sweep), as canonical TOML.
    pub resolved_text: String,
}

/// One point of the sweep: a full configuration, run once per seed.
#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    /// The sweep assignments that made this variant (path, value).
    pub assignments: Vec<(String, toml::Value)>,
    pub seeds: Vec<u64>,
    pub device: Device,
    pub stages: Vec<StageDecl>,
    /// The variant's resolved configuration (stage params with defaults filled in).
    pub config: toml::Table,
}

/// A stage of a variant's pipeline, validated.
#[derive(Debug, Clone)]
pub struct StageDecl {
    pub name: String,
    pub kind: String,
    /// Upstream stages (names of earlier stages of the same variant).
    pub after: Vec<String>,
    /// Parameters with defaults filled in, as the stage kind resolved them.
    pub params: toml::Value,
}

type Origins = BTreeMap<String, Origin>;

/// A merged table with the origin of every key path in it.
#[derive(Debug, Clone, Default)]
struct Sourced {
    table: toml::Table,
    origins: Origins,
}

impl Sourced {
    /// The origin of `path` or of its nearest ancestor that has one.
    fn origin_of(&self, path: &str, fallback: &Origin) -> Origin {
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

fn err(origin: Origin, key: impl Into<String>, message: impl Into<String>) -> SpecError {
    // toml's value deserializer appends "in `key`" lines; the key is named already.
    let message: String = message.into();
    let message = message.lines().next().unwrap_or("").trim().to_string();
    SpecError {
        origin,
        key: key.into(),
        message,
    }
}

/// Load a spec file (following `extends`), apply `--set` overrides, validate and expand it.
pub fn load(path: &Path, overrides: &[String]) -> Result<Spec, SpecError> {
    let mut stack = Vec::new();
    let mut src = load_file(path, &mut stack)?;
    let top = Origin::File {
        path: path.to_path_buf(),
        line: 1,
    };
    for arg in overrides {
        apply_override(&mut src, arg)?;
    }
    let resolved_text = crate::util::canonical_toml(&toml::Value::Table(src.table.clone()));
    // Validate the shared part once, so errors point at the spec rather than at a variant.
    let doc = validate_doc(&src, &top)?;
    let variants = expand(&src, &top)?;
    Ok(Spec {
        path: path.to_path_buf(),
        name: doc.name,
        description: doc.description,
        summary: doc.summary,
        variants,
        resolved_text,
    })
}

fn load_file(path: &Path, stack: &mut Vec<PathBuf>) -> Result<Sourced, SpecError> {
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
    let Some(ext_name) = ext.as_str() else {
        return Err(err(
            ext_origin,
            "extends",
            "must be a path (a string) to the base spec file",
        ));
    };
    let base_path = path.parent().unwrap_or(Path::new(".")).join(ext_name);
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let me = canon(path);
    stack.push(me);
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
    let mut base = load_file(&base_path, stack)?;
    stack.pop();
    own.origins.remove("extends");
    merge(&mut base, own, "");
    Ok(base)
}

/// Deep-merge `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut Sourced, over: Sourced, prefix: &str) {
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

fn join(prefix: &str, k: &str) -> String {
    if prefix.is_empty() {
        k.to_string()
    } else {
        format!("{prefix}.{k}")
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn collect_origins(
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

/// Parse a `--set` value as TOML, falling back to a bare string (`--set a.b=pan`).
pub fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

fn apply_override(src: &mut Sourced, arg: &str) -> Result<(), SpecError> {
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

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "seeds",
    "device",
    "summary",
    "stages",
    "sweep",
];

/// Set a dotted path in a config table. Only paths into existing stages and known top-level
/// keys are accepted; unknown parameter names inside a stage are caught by its kind.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
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

/// Turn a serde error at a path into a spec error at the file and line that set that path.
fn typed<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    prefix: &str,
    src: &Sourced,
    top: &Origin,
) -> Result<T, SpecError> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let mut path = prefix.to_string();
        for seg in e.path().iter() {
            let s = match seg {
                serde_path_to_error::Segment::Seq { index } => index.to_string(),
                serde_path_to_error::Segment::Map { key } => key.clone(),
                serde_path_to_error::Segment::Enum { variant } => variant.clone(),
                serde_path_to_error::Segment::Unknown => continue,
            };
            path = join(&path, &s);
        }
        let msg = e.inner().to_string();
        if let Some(field) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            if !path.ends_with(field) {
                path = join(&path, field);
            }
            return err(
                src.origin_of(&path, top),
                path,
                format!("unknown key; {msg}"),
            );
        }
        if let Some(field) = msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let full = join(&path, field);
            return err(src.origin_of(&path, top), full, "required key is missing");
        }
        err(src.origin_of(&path, top), path, msg)
    })
}

fn validate_doc(src: &Sourced, top: &Origin) -> Result<SpecDoc, SpecError> {
    let doc: SpecDoc = typed(toml::Value::Table(src.table.clone()), "", src, top)?;
    if doc.name.trim().is_empty() {
        return Err(err(src.origin_of("name", top), "name", "must not be empty"));
    }
    if doc.seeds.is_empty() {
        return Err(err(
            src.origin_of("seeds", top),
            "seeds",
            "must list at least one seed",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in doc.seeds.iter().enumerate() {
        if !seen.insert(s) {
            return Err(err(
                src.origin_of(&format!("seeds.{i}"), top),
                "seeds",
                format!("seed {s} is listed twice"),
            ));
        }
    }
    if doc.stages.is_empty() {
        return Err(err(
            src.origin_of("stages", top),
            "stages",
            "the spec declares no stages ([stages.NAME] tables)",
        ));
    }
    Ok(doc)
}

/// Validate a merged (variant) table and resolve every stage's parameters.
fn resolve_variant(
    src: &Sourced,
    top: &Origin,
) -> Result<(SpecDoc, Vec<StageDecl>, toml::Table), SpecError> {
    let doc = validate_doc(src, top)?;
    let mut decls: Vec<StageDecl> = Vec::new();
    let mut config = src.table.clone();
    config.remove("sweep");
    let mut resolved_stages = toml::Table::new();
    for (name, v) in &doc.stages {
        let sp = format!("stages.{name}");
        let Some(t) = v.as_table() else {
            return Err(err(
                src.origin_of(&sp, top),
                &sp,
                "a stage must be a table ([stages.NAME])",
            ));
        };
        let mut t = t.clone();
        let kind = match t.remove("kind") {
            Some(toml::Value::String(k)) => k,
            Some(_) => {
                return Err(err(
                    src.origin_of(&format!("{sp}.kind"), top),
                    format!("{sp}.kind"),
                    "must be a string",
                ))
            }
            None if stages::kind(name).is_some() => name.clone(),
            None => {
                return Err(err(
                    src.origin_of(&sp, top),
                    format!("{sp}.kind"),
                    format!(
                        "stage `{name}` needs a `kind` (one of: {})",
                        stages::kind_names().join(", ")
                    ),
                ))
            }
        };
        let Some(k) = stages::kind(&kind) else {
            return Err(err(
                src.origin_of(&format!("{sp}.kind"), top),
                format!("{sp}.kind"),
                format!(
                    "unknown stage kind `{kind}` (known: {})",
                    stages::kind_names().join(", ")
                ),
            ));
        };
        let after: Vec<String> = match t.remove("after") {
            None => decls
                .last()
                .map(|d| vec![d.name.clone()])
                .unwrap_or_default(),
            Some(toml::Value::String(s)) => vec![s],
            Some(toml::Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, x) in a.iter().enumerate() {
                    match x.as_str() {
                        Some(s) => out.push(s.to_string()),
                        None => {
                            let p = format!("{sp}.after.{i}");
                            return Err(err(
                                src.origin_of(&p, top),
                                format!("{sp}.after"),
                                "must list stage names (strings)",
                            ));
                        }
                    }
                }
                out
            }
            Some(_) => {
                return Err(err(
                    src.origin_of(&format!("{sp}.after"), top),
                    format!("{sp}.after"),
                    "must be a stage name or a list of them",
                ))
            }
        };
        for a in &after {
            if !decls.iter().any(|d| &d.name == a) {
                let msg = if doc.stages.contains_key(a) {
                    format!(
                        "stage `{a}` is declared later; stages run in the order they are declared"
                    )
                } else {
                    format!("no stage named `{a}`")
                };
                return Err(err(
                    src.origin_of(&format!("{sp}.after"), top),
                    format!("{sp}.after"),
                    msg,
                ));
            }
        }
        let params = k.resolve(toml::Value::Table(t)).map_err(|e| {
            let path = if e.path.is_empty() {
                sp.clone()
            } else {
                format!("{sp}.{}", e.path)
            };
            let msg = e.message.clone();
            let unknown = msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
                .map(str::to_string);
            match unknown {
                Some(f) if !path.ends_with(&f) => {
                    let p = format!("{path}.{f}");
                    err(src.origin_of(&p, top), p, format!("unknown key; {msg}"))
                }
                Some(_) => err(
                    src.origin_of(&path, top),
                    path,
                    format!("unknown key; {msg}"),
                ),
                None => err(src.origin_of(&path, top), path, msg),
            }
        })?;
        // Stages named in parameters (a teacher, a generator, a model to evaluate) must run
        // before this one: found now, not when the stage starts hours into a sweep.
        let mut upstream: Vec<&str> = Vec::new();
        let mut todo: Vec<&str> = after.iter().map(String::as_str).collect();
        while let Some(n) = todo.pop() {
            if !upstream.contains(&n) {
                upstream.push(n);
                if let Some(d) = decls.iter().find(|d| d.name == n) {
                    todo.extend(d.after.iter().map(String::as_str));
                }
            }
        }
        for (key, target) in k.references(&params) {
            if upstream.contains(&target.as_str()) {
                continue;
            }
            let p = format!("{sp}.{key}");
            let msg = if target == *name {
                "a stage cannot name itself".to_string()
            } else if doc.stages.contains_key(&target) {
                format!(
                    "stage `{target}` does not run before `{name}`: list it in `after` (or \
                     declare it earlier and in the chain of stages this one runs after)"
                )
            } else {
                format!(
                    "no stage named `{target}` (stages: {})",
                    doc.stages.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(err(src.origin_of(&p, top), p, msg));
        }
        let mut rt = params.as_table().cloned().unwrap_or_default();
        rt.insert("kind".into(), toml::Value::String(kind.clone()));
        rt.insert(
            "after".into(),
            toml::Value::Array(after.iter().cloned().map(toml::Value::String).collect()),
        );
        resolved_stages.insert(name.clone(), toml::Value::Table(rt));
        decls.push(StageDecl {
            name: name.clone(),
            kind,
            after,
            params,
        });
    }
    config.insert("stages".into(), toml::Value::Table(resolved_stages));
    Ok((doc, decls, config))
}

/// One sweep axis: a config path and the values it takes.
struct Axis {
    path: String,
    values: Vec<toml::Value>,
    origin: Origin,
}

fn flatten_axes(
    t: &toml::Table,
    prefix: &str,
    src: &Sourced,
    top: &Origin,
    out: &mut Vec<Axis>,
) -> Result<(), SpecError> {
    for (k, v) in t {
        let p = join(prefix, k);
        match v {
            toml::Value::Table(sub) => flatten_axes(sub, &p, src, top, out)?,
            toml::Value::Array(a) => {
                let origin = src.origin_of(&p, top);
                let path = p.splitn(3, '.').nth(2).unwrap_or("").to_string();
                if a.is_empty() {
                    return Err(err(origin, p, "empty sweep axis: give at least one value"));
                }
                out.push(Axis {
                    path,
                    values: a.clone(),
                    origin,
                });
            }
            _ => {
                return Err(err(
                    src.origin_of(&p, top),
                    p,
                    "a sweep axis must be a list of values",
                ));
            }
        }
    }
    Ok(())
}

fn flatten_assignments(t: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let p = join(prefix, k);
        match v {
            toml::Value::Table(sub) => flatten_assignments(sub, &p, out),
            other => out.push((p, other.clone())),
        }
    }
}

/// A `--set` of a key that the sweep assigns would be silently replaced: refuse it.
fn overridden(base: &Sourced, path: &str, swept_at: &Origin) -> Result<(), SpecError> {
    match base.origins.get(path) {
        Some(o @ Origin::Override { .. }) => Err(err(
            o.clone(),
            path,
            format!("this key is swept ({swept_at}); override the sweep instead, e.g. --set sweep.grid.{path}=[...]"),
        )),
        _ => Ok(()),
    }
}

/// Expand `[sweep]`: named variants x grid (cartesian product) x zip (paired values).
fn expand(src: &Sourced, top: &Origin) -> Result<Vec<Variant>, SpecError> {
    let mut base = src.clone();
    let sweep = base
        .table
        .remove("sweep")
        .and_then(|s| s.as_table().cloned())
        .unwrap_or_default();

    // Named variants: [[sweep.variants]] name = "...", then key paths to set.
    let mut named: Vec<(String, Vec<(String, toml::Value, Origin)>)> = Vec::new();
    if let Some(vs) = sweep.get("variants").and_then(|v| v.as_array()) {
        for (i, v) in vs.iter().enumerate() {
            let vp = format!("sweep.variants.{i}");
            let Some(t) = v.as_table() else {
                return Err(err(
                    src.origin_of(&vp, top),
                    &vp,
                    "a variant must be a table ([[sweep.variants]])",
                ));
            };
            let mut t = t.clone();
            let name = match t.remove("name") {
                Some(toml::Value::String(n)) if !n.trim().is_empty() => n,
                _ => {
                    return Err(err(
                        src.origin_of(&vp, top),
                        format!("{vp}.name"),
                        "every variant needs a non-empty `name`",
                    ))
                }
            };
            if named.iter().any(|(n, _)| n == &name) {
                let p = format!("{vp}.name");
                return Err(err(
                    src.origin_of(&p, top),
                    p,
                    format!("duplicate variant name `{name}`"),
                ));
            }
            t.remove("description");
            let mut flat = Vec::new();
            flatten_assignments(&t, "", &mut flat);
            let sets = flat
                .into_iter()
                .map(|(p, val)| {
                    let o = src.origin_of(&format!("{vp}.{p}"), top);
                    (p, val, o)
                })
                .collect();
            named.push((name, sets));
        }
    }
    if named.is_empty() {
        named.push((String::new(), Vec::new()));
    }

    let mut grid = Vec::new();
    if let Some(g) = sweep.get("grid").and_then(|g| g.as_table()) {
        flatten_axes(g, "sweep.grid", src, top, &mut grid)?;
    }
    let mut zip = Vec::new();
    if let Some(z) = sweep.get("zip").and_then(|z| z.as_table()) {
        flatten_axes(z, "sweep.zip", src, top, &mut zip)?;
    }
    if let Some(first) = zip.first() {
        for a in &zip[1..] {
            if a.values.len() != first.values.len() {
                return Err(err(
                    a.origin.clone(),
                    format!("sweep.zip.{}", a.path),
                    format!(
                        "zipped axes must have equal lengths: {} has {}, {} has {}",
                        first.path,
                        first.values.len(),
                        a.path,
                        a.values.len()
                    ),
                ));
            }
        }
    }
    // Short axis names for variant names: the last path segment, or the whole path when two
    // axes share it.
    let all: Vec<&Axis> = grid.iter().chain(zip.iter()).collect();
    let short = |path: &str| -> String {
        let last = path.rsplit('.').next().unwrap_or(path);
        if all
            .iter()
            .filter(|a| a.path.rsplit('.').next() == Some(last))
            .count()
            > 1
        {
            path.to_string()
        } else {
            last.to_string()
        }
    };

    // Cartesian product of grid axes, then each zip index.
    let mut combos: Vec<Vec<(&Axis, usize)>> = vec![Vec::new()];
    for a in &grid {
        let mut next = Vec::new();
        for c in &combos {
            for i in 0..a.values.len() {
                let mut c2 = c.clone();
                c2.push((a, i));
                next.push(c2);
            }
        }
        combos = next;
    }
    if !zip.is_empty() {
        let n = zip[0].values.len();
        let mut next = Vec::new();
        for c in &combos {
            for i in 0..n {
                let mut c2 = c.clone();
                for a in &zip {
                    c2.push((a, i));
                }
                next.push(c2);
            }
        }
        combos = next;
    }

    let mut out = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (vname, sets) in &named {
        for combo in &combos {
            let mut v = base.clone();
            let mut assignments = Vec::new();
            let mut parts = Vec::new();
            if !vname.is_empty() {
                parts.push(vname.clone());
            }
            for (p, val, o) in sets {
                overridden(&base, p, o)?;
                set_path(&mut v.table, p, val.clone()).map_err(|m| err(o.clone(), p, m))?;
                v.origins.insert(p.clone(), o.clone());
                assignments.push((p.clone(), val.clone()));
            }
            for (axis, i) in combo {
                overridden(&base, &axis.path, &axis.origin)?;
                let val = axis.values[*i].clone();
                set_path(&mut v.table, &axis.path, val.clone())
                    .map_err(|m| err(axis.origin.clone(), &axis.path, m))?;
                let sub = format!("{}.", axis.path);
                v.origins.retain(|p, _| !p.starts_with(&sub));
                v.origins.insert(axis.path.clone(), axis.origin.clone());
                parts.push(format!(
                    "{}={}",
                    short(&axis.path),
                    crate::util::short_value(&val)
                ));
                assignments.push((axis.path.clone(), val));
            }
            let (doc, stages, config) = resolve_variant(&v, top)?;
            let name = if parts.is_empty() {
                "base".to_string()
            } else {
                parts.join(",")
            };
            if !names.insert(name.clone()) {
                return Err(err(
                    top.clone(),
                    "sweep",
                    format!("two variants are both named `{name}`"),
                ));
            }
            out.push(Variant {
                name,
                assignments,
                seeds: doc.seeds,
                device: doc.device,
                stages,
                config,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn sweep_is_variants_times_grid_times_zip() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "s.toml",
            r#"
name = "x"
[stages.data]
[[sweep.variants]]
name = "a"
stages.data.motion = "pan"
[[sweep.variants]]
name = "b"
[sweep.grid]
stages.data.size = [16, 32]
"stages.data.frames" = [4, 8, 12]
[sweep.zip]
stages.data.seed = [1, 2]
stages.data.sprites = [3, 5]
"#,
        );
        let s = load(&p, &[]).unwrap();
        assert_eq!(s.variants.len(), 2 * 2 * 3 * 2);
        let v = &s.variants[0];
        assert_eq!(v.name, "a,size=16,frames=4,seed=1,sprites=3");
        assert_eq!(v.stages[0].params["motion"].as_str(), Some("pan"));
        assert_eq!(v.stages[0].params["frames"].as_integer(), Some(4));
        assert_eq!(v.stages[0].params["sprites"].as_integer(), Some(3));
        let last = s.variants.last().unwrap();
        assert_eq!(last.name, "b,size=32,frames=12,seed=2,sprites=5");
        assert_eq!(
            last.stages[0].params["motion"].as_str(),
            Some("mixed"),
            "defaults fill what a variant leaves"
        );
    }

    #[test]
    fn extends_overlays_and_set_wins() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "base.toml",
            "name = \"base\"\nseeds = [1, 2]\n[stages.data]\nsize = 16\nframes = 4\n",
        );
        let p = write(
            d.path(),
            "over.toml",
            "extends = \"base.toml\"\nname = \"over\"\n[stages.data]\nsize = 24\n",
        );
        let s = load(&p, &["stages.data.frames=6".into()]).unwrap();
        assert_eq!(s.name, "over");
        let v = &s.variants[0];
        assert_eq!(v.seeds, vec![1, 2], "kept from the base");
        assert_eq!(
            v.stages[0].params["size"].as_integer(),
            Some(24),
            "overlay wins over base"
        );
        assert_eq!(
            v.stages[0].params["frames"].as_integer(),
            Some(6),
            "--set wins over both"
        );
    }

    #[test]
    fn errors_in_a_base_file_name_the_base_file() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "base.toml",
            "name = \"base\"\n[stages.data]\nframes = \"four\"\n",
        );
        let p = write(d.path(), "over.toml", "extends = \"base.toml\"\n");
        let e = load(&p, &[]).unwrap_err();
        assert_eq!(
            e.origin,
            Origin::File {
                path: d.path().join("base.toml"),
                line: 3
            }
        );
        assert_eq!(e.key, "stages.data.frames");
    }

    #[test]
    fn stages_chain_in_order_unless_after_says_otherwise() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "s.toml",
            "name = \"x\"\n[stages.a]\nkind = \"data\"\n[stages.b]\nkind = \"data\"\n[stages.c]\nkind = \"data\"\nafter = [\"a\"]\n",
        );
        let s = load(&p, &[]).unwrap();
        let st = &s.variants[0].stages;
        assert_eq!(
            st.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(st[0].after.is_empty());
        assert_eq!(st[1].after, ["a"]);
        assert_eq!(st[2].after, ["a"]);
    }

    #[test]
    fn override_values_parse_as_toml_or_bare_strings() {
        assert_eq!(parse_value("3"), toml::Value::Integer(3));
        assert_eq!(parse_value("0.5"), toml::Value::Float(0.5));
        assert_eq!(
            parse_value("[1, 2]"),
            toml::Value::Array(vec![1.into(), 2.into()])
        );
        assert_eq!(parse_value("pan"), toml::Value::String("pan".into()));
        assert_eq!(parse_value("\"pan\""), toml::Value::String("pan".into()));
    }
}
