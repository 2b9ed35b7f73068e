//! From a spec to a plan: every (variant, seed) run with its chain of stages, each stage
//! identified by a content hash of its kind, code version, resolved parameters, upstream
//! stage identities, the run seed (for seeded kinds) and any external content it reads.
//! Stages with equal identities are computed once and shared by every run that needs them.

use crate::device::Device;
use crate::error::Result;
use crate::spec::Spec;
use crate::stages;
use crate::util::{canonical_toml, sha256_hex};
use std::path::{Path, PathBuf};

/// Parameters that change how a stage runs but not what it produces.
const NOT_IDENTITY: &[&str] = &["checkpoint_every"];

#[derive(Debug, Clone)]
pub struct Plan {
    pub experiment: String,
    pub description: String,
    pub summary: Vec<String>,
    pub runs: Vec<PlannedRun>,
}

#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub variant: String,
    pub seed: u64,
    pub device: Device,
    /// The run's identity: hash of its resolved config, seed and stage identities.
    pub spec_hash: String,
    /// The resolved configuration of the run, as TOML.
    pub config: String,
    /// Flattened parameters (`stages.data.size` = `32`) for the store's params table.
    pub params: Vec<(String, String)>,
    pub stages: Vec<PlannedStage>,
}

#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub hash: String,
    pub params: toml::Value,
    /// Indices of upstream stages in the run's stage list.
    pub upstream: Vec<usize>,
}

impl PlannedStage {
    pub fn dir(&self, results: &Path) -> PathBuf {
        cache_dir(results, &self.hash)
    }
    pub fn short(&self) -> &str {
        &self.hash[..12]
    }
}

pub fn cache_dir(results: &Path, hash: &str) -> PathBuf {
    results.join("cache").join(hash)
}

/// Marker written last into a finished stage's folder.
pub const DONE_FILE: &str = "done.json";

pub fn is_done(results: &Path, hash: &str) -> bool {
    cache_dir(results, hash).join(DONE_FILE).is_file()
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        other => out.push((prefix.to_string(), crate::util::short_value(other))),
    }
}

pub fn plan(spec: &Spec, device: Option<Device>) -> Result<Plan> {
    let mut runs = Vec::new();
    for v in &spec.variants {
        for &seed in &v.seeds {
            let mut stages_out: Vec<PlannedStage> = Vec::new();
            for decl in &v.stages {
                let kind = stages::kind(&decl.kind).ok_or_else(|| {
                    crate::error::Error::Other(format!("unknown stage kind {}", decl.kind))
                })?;
                let upstream: Vec<usize> = decl
                    .after
                    .iter()
                    .filter_map(|a| stages_out.iter().position(|s| &s.name == a))
                    .collect();
                let mut id = toml::Table::new();
                id.insert("kind".into(), decl.kind.clone().into());
                id.insert("version".into(), (kind.version() as i64).into());
                let mut params = decl.params.clone();
                if let Some(t) = params.as_table_mut() {
                    for k in NOT_IDENTITY {
                        t.remove(*k);
                    }
                }
                id.insert("params".into(), params);
                id.insert(
                    "upstream".into(),
                    toml::Value::Array(
                        upstream
                            .iter()
                            .map(|&i| toml::Value::String(stages_out[i].hash.clone()))
                            .collect(),
                    ),
                );
                if kind.seeded() {
                    id.insert("seed".into(), (seed as i64).into());
                }
                if let Some(fp) = kind.fingerprint(&decl.params)? {
                    id.insert("fingerprint".into(), fp.into());
                }
                let hash = sha256_hex(canonical_toml(&toml::Value::Table(id)).as_bytes());
                stages_out.push(PlannedStage {
                    name: decl.name.clone(),
                    kind: decl.kind.clone(),
                    version: kind.version(),
                    hash,
                    params: decl.params.clone(),
                    upstream,
                });
            }
            let device = device.unwrap_or(v.device);
            let mut cfg = v.config.clone();
            cfg.insert(
                "seeds".into(),
                toml::Value::Array(vec![(seed as i64).into()]),
            );
            cfg.insert("device".into(), device.to_string().into());
            let config = canonical_toml(&toml::Value::Table(cfg.clone()));
            let ident = format!(
                "{config}\nseed={seed}\n{}",
                stages_out
                    .iter()
                    .map(|s| s.hash.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let mut params = Vec::new();
            flatten("", &toml::Value::Table(v.config.clone()), &mut params);
            params.retain(|(k, _)| {
                k != "seeds" && k != "device" && k != "name" && k != "description" && k != "summary"
            });
            params.push(("seed".into(), seed.to_string()));
            params.push(("variant".into(), v.name.clone()));
            params.push(("device".into(), device.to_string()));
            runs.push(PlannedRun {
                variant: v.name.clone(),
                seed,
                device,
                spec_hash: sha256_hex(ident.as_bytes()),
                config,
                params,
                stages: stages_out,
            });
        }
    }
    Ok(Plan {
        experiment: spec.name.clone(),
        description: spec.description.clone(),
        summary: spec.summary.clone(),
        runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(text: &str, sets: &[&str]) -> Plan {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.toml");
        std::fs::write(&p, text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        plan(
            &crate::spec::load(&p, &sets, &crate::stages::Registry).unwrap(),
            None,
        )
        .unwrap()
    }

    const SPEC: &str =
        "name = \"x\"\nseeds = [0, 1]\n[stages.a]\nkind = \"data\"\n[stages.b]\nkind = \"data\"\n";

    #[test]
    fn identity_ignores_spelling_of_defaults_and_checkpointing() {
        let a = plan_of(SPEC, &[]);
        let b = plan_of(SPEC, &["stages.a.size=32", "stages.a.checkpoint_every=7"]);
        assert_eq!(a.runs[0].stages[0].hash, b.runs[0].stages[0].hash);
        let c = plan_of(SPEC, &["stages.a.size=24"]);
        assert_ne!(a.runs[0].stages[0].hash, c.runs[0].stages[0].hash);
    }

    #[test]
    fn identity_includes_upstream_but_not_the_seed_for_data() {
        let a = plan_of(SPEC, &[]);
        // Seeds 0 and 1 share the (unseeded) data stages but are different runs.
        assert_eq!(a.runs[0].stages[1].hash, a.runs[1].stages[1].hash);
        assert_ne!(a.runs[0].spec_hash, a.runs[1].spec_hash);
        // Changing only the upstream stage changes the downstream identity.
        let c = plan_of(SPEC, &["stages.a.size=24"]);
        assert_eq!(c.runs[0].stages[1].params, a.runs[0].stages[1].params);
        assert_ne!(c.runs[0].stages[1].hash, a.runs[0].stages[1].hash);
    }

    #[test]
    fn dtype_fills_in_the_stages_that_have_one_and_f32_keeps_their_identity() {
        const S: &str = "name = \"x\"\n[stages.data]\nsize = 16\n[stages.teacher]\nsteps = 1\n\
                         [stages.lcm]\nkind = \"consistency\"\n[stages.eval]\nkind = \"fvd\"\n";
        let stages = |sets: &[&str]| plan_of(S, sets).runs[0].stages.clone();
        let dtype = |s: &PlannedStage| {
            s.params
                .get("dtype")
                .and_then(|v| v.as_str())
                .map(String::from)
        };
        let plain = stages(&[]);
        let f32s = stages(&["dtype=\"f32\""]);
        let bf16 = stages(&["dtype=\"bf16\""]);
        let own = stages(&["dtype=\"bf16\"", "stages.eval.dtype=\"f16\""]);
        for i in 0..4 {
            assert_eq!(
                plain[i].hash, f32s[i].hash,
                "f32 is the default: {}",
                plain[i].name
            );
            assert_eq!(dtype(&f32s[i]), None, "f32 stays out of the params");
        }
        // The data stage has no dtype; the teacher, consistency and fvd stages take the spec's.
        assert_eq!(plain[0].hash, bf16[0].hash);
        assert_eq!(dtype(&bf16[0]), None);
        for i in 1..4 {
            assert_ne!(plain[i].hash, bf16[i].hash, "{}", plain[i].name);
            assert_eq!(
                dtype(&bf16[i]).as_deref(),
                Some("bf16"),
                "{}",
                plain[i].name
            );
        }
        // A stage's own dtype wins over the top level.
        assert_eq!(dtype(&own[3]).as_deref(), Some("f16"));
        assert_eq!(own[1].hash, bf16[1].hash);
        // A bad value is an error naming the key.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.toml");
        std::fs::write(&p, S).unwrap();
        let e = crate::spec::load(&p, &["dtype=\"fp8\"".into()], &crate::stages::Registry)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype") && e.contains("fp8"), "{e}");
        let e = crate::spec::load(
            &p,
            &["stages.eval.dtype=\"half\"".into()],
            &crate::stages::Registry,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("stages.eval.dtype"), "{e}");
    }

    #[test]
    fn params_are_flattened_for_the_store() {
        let a = plan_of(SPEC, &[]);
        let p = &a.runs[1].params;
        assert!(p.contains(&("stages.a.size".into(), "32".into())));
        assert!(p.contains(&("stages.b.source".into(), "synthetic".into())));
        assert!(p.contains(&("seed".into(), "1".into())));
    }
}
