//! The `[sweep]` section: grid and zipped axes over config paths, expanded into variants.

use super::overrides::set_path;
use super::source::{join, Sourced};
use super::stages::resolve_variant;
use super::{err, StageKinds, Variant};
use crate::error::{Origin, SpecError};

/// One sweep axis: a config path and the values it takes.
pub(super) struct Axis {
    path: String,
    values: Vec<toml::Value>,
    origin: Origin,
}

pub(super) fn flatten_axes(
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

pub(super) fn flatten_assignments(
    t: &toml::Table,
    prefix: &str,
    out: &mut Vec<(String, toml::Value)>,
) {
    for (k, v) in t {
        let p = join(prefix, k);
        match v {
            toml::Value::Table(sub) => flatten_assignments(sub, &p, out),
            other => out.push((p, other.clone())),
        }
    }
}

/// A `--set` of a key that the sweep assigns would be silently replaced: refuse it.
pub(super) fn overridden(base: &Sourced, path: &str, swept_at: &Origin) -> Result<(), SpecError> {
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
pub(super) fn expand(
    src: &Sourced,
    top: &Origin,
    kinds: &dyn StageKinds,
) -> Result<Vec<Variant>, SpecError> {
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
            let (doc, stages, config) = resolve_variant(&v, top, kinds)?;
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
