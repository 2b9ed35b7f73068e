//! Experiment specs: TOML files that may `extends` a base file, merged into one table,
//! overridden by `--set key.path=value`, validated, and expanded by the `[sweep]` section into
//! variants. Every error names the file, the line and the key (see `docs/spec-format.md`).
//!
//! Validation happens entirely here, before anything touches the run store, so a malformed
//! spec never leaves a trace.

mod overrides;
mod source;
mod stages;
mod sweep;

use crate::error::{Origin, SpecError};
use overrides::apply_override;
pub use overrides::parse_value;
use serde::Deserialize;
use source::{join, load_file, Sourced};
use std::path::{Path, PathBuf};
use sweep::expand;

pub use crate::device::{Device, Precision};

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
    /// Default `dtype` of every stage that has one and does not set it (`run --dtype` sets
    /// this): see [`Precision`].
    #[serde(default)]
    dtype: Option<Precision>,
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

/// What a spec needs to know of stage kinds. The stage registry ([`crate::stages::Registry`])
/// is handed to [`load`], so this layer knows no stage.
pub trait StageKinds {
    /// Every kind's name (a stage named after a kind may leave `kind` out).
    fn names(&self) -> Vec<&'static str>;
    /// The kind's parameters checked and completed with defaults; `None` for an unknown kind.
    fn resolve(
        &self,
        kind: &str,
        params: toml::Value,
    ) -> Option<Result<toml::Value, crate::error::ParamError>>;
    /// The parameters (of the resolved table) that name other stages, with those names.
    fn references(&self, kind: &str, params: &toml::Value) -> Vec<(&'static str, String)>;
    /// Whether the kind has a `dtype` parameter (the spec's top-level `dtype` fills it in).
    fn takes_dtype(&self, _kind: &str) -> bool {
        false
    }
}

/// Load a spec file (following `extends`), apply `--set` overrides, validate and expand it.
pub fn load(path: &Path, overrides: &[String], kinds: &dyn StageKinds) -> Result<Spec, SpecError> {
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
    let variants = expand(&src, &top, kinds)?;
    Ok(Spec {
        path: path.to_path_buf(),
        name: doc.name,
        description: doc.description,
        summary: doc.summary,
        variants,
        resolved_text,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in registry with one kind, `data`, so the spec layer is tested alone: `motion`
    /// defaults to "mixed", `frames` must be an integer.
    struct Kinds;
    impl StageKinds for Kinds {
        fn names(&self) -> Vec<&'static str> {
            vec!["data"]
        }
        fn resolve(
            &self,
            kind: &str,
            params: toml::Value,
        ) -> Option<Result<toml::Value, crate::error::ParamError>> {
            (kind == "data").then(|| {
                let mut t = params.as_table().cloned().unwrap_or_default();
                if t.get("frames").is_some_and(|f| !f.is_integer()) {
                    return Err(crate::error::ParamError {
                        path: "frames".into(),
                        message: "invalid type: expected an integer".into(),
                    });
                }
                t.entry("motion").or_insert("mixed".into());
                Ok(toml::Value::Table(t))
            })
        }
        fn references(&self, _: &str, _: &toml::Value) -> Vec<(&'static str, String)> {
            Vec::new()
        }
    }

    fn load(path: &Path, sets: &[String]) -> Result<Spec, SpecError> {
        super::load(path, sets, &Kinds)
    }

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
    fn extends_a_list_merges_the_bases_in_order() {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            "base.toml",
            "name = \"base\"\n[stages.data]\nsize = 16\nframes = 4\nsprites = 2\n",
        );
        // An overlay that is not a spec on its own (no name): the sizes of another scale.
        write(
            d.path(),
            "scale.toml",
            "[stages.data]\nsize = 64\nframes = 8\n",
        );
        let p = write(
            d.path(),
            "over.toml",
            "extends = [\"base.toml\", \"scale.toml\"]\nname = \"over\"\n[stages.data]\nframes = 12\n",
        );
        let s = load(&p, &[]).unwrap();
        let params = &s.variants[0].stages[0].params;
        assert_eq!(
            params["sprites"].as_integer(),
            Some(2),
            "from the first base"
        );
        assert_eq!(
            params["size"].as_integer(),
            Some(64),
            "the second base over the first"
        );
        assert_eq!(
            params["frames"].as_integer(),
            Some(12),
            "the file over both"
        );
        // A cycle through a list entry, and a wrong type, are errors on `extends`.
        write(
            d.path(),
            "loop.toml",
            "extends = [\"base.toml\", \"loop.toml\"]\nname = \"l\"\n",
        );
        let e = load(&d.path().join("loop.toml"), &[]).unwrap_err();
        assert_eq!(e.key, "extends");
        assert!(e.message.contains("cycle"), "{}", e.message);
        let p = write(d.path(), "bad.toml", "extends = [1]\nname = \"b\"\n");
        let e = load(&p, &[]).unwrap_err();
        assert_eq!(e.key, "extends");
        assert!(e.message.contains("list"), "{}", e.message);
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
