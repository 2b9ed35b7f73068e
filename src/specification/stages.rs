//! Stage declarations of a (variant) spec: kinds resolved against the stage registry, `after`
//! chains, every stage's parameters checked by its kind, and the stages that parameters name
//! checked to run before the stage that names them.

use super::source::Sourced;
use super::{err, validate_doc, SpecDoc, StageDecl, StageKinds};
use crate::error::{Origin, SpecError};

/// Validate a merged (variant) table and resolve every stage's parameters.
pub(super) fn resolve_variant(
    src: &Sourced,
    top: &Origin,
    kinds: &dyn StageKinds,
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
            None if kinds.names().contains(&name.as_str()) => name.clone(),
            None => {
                return Err(err(
                    src.origin_of(&sp, top),
                    format!("{sp}.kind"),
                    format!(
                        "stage `{name}` needs a `kind` (one of: {})",
                        kinds.names().join(", ")
                    ),
                ))
            }
        };
        if !kinds.names().contains(&kind.as_str()) {
            return Err(err(
                src.origin_of(&format!("{sp}.kind"), top),
                format!("{sp}.kind"),
                format!(
                    "unknown stage kind `{kind}` (known: {})",
                    kinds.names().join(", ")
                ),
            ));
        }
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
        // The spec's top-level `dtype` is the default of every stage that has one.
        if let Some(d) = doc.dtype {
            if !t.contains_key("dtype") && kinds.takes_dtype(&kind) {
                t.insert("dtype".into(), toml::Value::String(d.to_string()));
            }
        }
        let resolved = kinds
            .resolve(&kind, toml::Value::Table(t))
            .unwrap_or_else(|| unreachable!("kind `{kind}` was checked above"));
        let params = resolved.map_err(|e| {
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
        for (key, target) in kinds.references(&kind, &params) {
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
