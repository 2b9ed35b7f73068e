//! Evaluation reports: the `fvd` stages of an experiment's runs as paper-style tables
//! (`onestep report`), under the protocol of `docs/evaluation.md`.
//!
//! Per run (the newest run of each variant and seed), the evaluated methods are grouped by
//! what makes numbers comparable (N, clip length, resolution, quick or full check). Each group
//! is one table: the reference rows first (the real-vs-real floor at N/2, the static
//! baseline, and the ceiling of each autoencoder: the real clips encoded and decoded by it, from
//! the stages' `fvd_floor` / `fvd_static` / `fvd_ceiling` metrics), then one row per method with
//! FVD, the motion distance, first-frame fidelity, all with 95 % bootstrap intervals, and the
//! paired FVD differences against static and against its autoencoder's ceiling; a method whose
//! difference to static does not lie below zero is flagged. Below the table, every pair of methods is compared by a paired bootstrap on
//! their per-clip features (same conditioning frames, same real clips), and the report says
//! when two methods are not distinguishable at that N.

use crate::error::{Error, Result};
use crate::metrics::bootstrap::{self, Interval, DEFAULT_RESAMPLES};
use crate::plan::cache_dir;
use crate::stages::fvd::{key, load_rows, Evaluation, EVALUATION_FILE, FEATURES_FILE, STATIC};
use crate::store::{RunRow, Store};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub mod compare_runs;
pub mod document;
pub mod figures;
pub mod strips;
pub mod table;

/// Smallest N the protocol calls comparable.
pub const MIN_CLIPS: usize = 512;

/// One evaluated method of a run.
#[derive(Debug, Clone)]
pub struct MethodRow {
    /// The `fvd` stage.
    pub stage: String,
    pub eval: Evaluation,
    pub metrics: HashMap<String, f64>,
    pub dir: PathBuf,
}

impl MethodRow {
    pub(crate) fn get(&self, base: &str) -> Option<f64> {
        self.metrics.get(&key(self.eval.fast, base)).copied()
    }

    /// A metric with its interval, when logged.
    pub fn interval(&self, base: &str) -> Option<Interval> {
        let value = self.get(base)?;
        Some(
            match (
                self.get(&format!("{base}/low")),
                self.get(&format!("{base}/high")),
            ) {
                (Some(low), Some(high)) => Interval { value, low, high },
                _ => Interval::point(value),
            },
        )
    }

    /// `model (`stage`)`: unique within a run even when one model is evaluated with several
    /// samplers.
    pub fn label(&self) -> String {
        if self.is_static() {
            "static: first frame repeated".into()
        } else {
            format!("{} (`{}`)", self.eval.model, self.stage)
        }
    }

    pub(crate) fn is_static(&self) -> bool {
        self.eval.model == STATIC
    }
}

/// The evaluated methods of one run.
pub fn run_methods(store: &Store, results: &Path, run: &RunRow) -> Result<Vec<MethodRow>> {
    let metrics = store.final_metrics(run.id)?;
    let mut rows = Vec::new();
    let stages = store.stages_of(run.id)?;
    for st in stages.clone() {
        if st.kind != "fvd" || st.status != "finished" {
            continue;
        }
        let dir = cache_dir(results, &st.hash);
        let path = dir.join(EVALUATION_FILE);
        let eval: Evaluation = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Data(format!("{}: {e}", path.display())))?,
            // Stages of an older onestep (before the evaluation protocol): nothing to report.
            Err(_) => continue,
        };
        let m = metrics
            .iter()
            .filter(|(s, ..)| *s == st.name)
            .map(|(_, k, _, v)| (k.clone(), *v))
            .collect();
        rows.push(MethodRow {
            stage: st.name,
            eval,
            metrics: m,
            dir,
        });
    }
    add_sharpness(results, &stages, &mut rows)?;
    Ok(rows)
}

/// `hf_energy_ratio` (with its interval) for every method row whose generations are kept: the
/// high-frequency energy of its clips over the real test clips' on the same conditioning
/// frames ([`crate::metrics::fidelity::laplacian_energy`], the ratio of the sums, paired
/// bootstrap over clips). Below 1 the method's frames are smoother than the real ones. Computed
/// here from the `fvd` stages' `generated.safetensors`, so reports of stages evaluated before
/// this metric existed have it too.
fn add_sharpness(
    results: &Path,
    stages: &[crate::store::RunStageRow],
    rows: &mut [MethodRow],
) -> Result<()> {
    use crate::data::ClipSet;
    use crate::metrics::fidelity::laplacian_energy;
    let mut real: Option<(ClipSet, Vec<f64>)> = None;
    for r in rows.iter_mut().filter(|r| !r.is_static()) {
        let Ok(gen) = ClipSet::load(&r.dir.join("generated.safetensors")) else {
            continue;
        };
        if real.as_ref().is_none_or(|(t, _)| {
            (t.height, t.width, t.frames) != (gen.height, gen.width, gen.frames)
        }) {
            real = stages
                .iter()
                .filter(|s| s.kind == "data")
                .filter_map(|d| {
                    ClipSet::load(&cache_dir(results, &d.hash).join("test.safetensors")).ok()
                })
                .find(|t| (t.height, t.width, t.frames) == (gen.height, gen.width, gen.frames))
                .map(|t| {
                    let e = (0..t.len())
                        .map(|i| laplacian_energy(t.clip(i), t.frames, t.height, t.width))
                        .collect();
                    (t, e)
                });
        }
        let Some((_, real_e)) = &real else {
            continue;
        };
        let n = gen.len().min(real_e.len());
        if n == 0 {
            continue;
        }
        let gen_e: Vec<f64> = (0..n)
            .map(|i| laplacian_energy(gen.clip(i), gen.frames, gen.height, gen.width))
            .collect();
        let i = bootstrap::bootstrap(n, r.eval.resamples, 0x5ba2, true, |idx| {
            let (g, t) = idx
                .iter()
                .fold((0.0, 0.0), |(g, t), &i| (g + gen_e[i], t + real_e[i]));
            Ok(if t > 0.0 { g / t } else { 0.0 })
        })?;
        let k = key(r.eval.fast, "hf_energy_ratio");
        r.metrics.insert(k.clone(), i.value);
        if i.has_interval() {
            r.metrics.insert(format!("{k}/low"), i.low);
            r.metrics.insert(format!("{k}/high"), i.high);
        }
    }
    Ok(())
}

fn cell(i: Option<Interval>, decimals: usize) -> String {
    i.map_or_else(|| "-".into(), |i| i.display(decimals))
}

/// The sampler's method as the spec names it (`euler`, `consistency`, ...), `-` for none.
pub(crate) fn sampler_method(e: &Evaluation) -> String {
    match &e.sampler {
        None => "-".into(),
        Some(s) => serde_json::to_value(s.method)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| format!("{:?}", s.method)),
    }
}

/// `method (N NFE)`, `-` for none.
pub(crate) fn sampler_label(e: &Evaluation) -> String {
    match &e.sampler {
        None => "-".into(),
        Some(_) => format!("{} ({} NFE)", sampler_method(e), e.nfe),
    }
}

/// The paired comparison of two methods evaluated on the same clips: (FVD difference, motion FD
/// difference), `a` minus `b`. `None` when their real clips differ.
pub fn compare(
    a: &MethodRow,
    b: &MethodRow,
    resamples: usize,
) -> Result<Option<(Interval, Interval)>> {
    let load = |r: &MethodRow, name: &str| {
        load_rows(&r.dir.join(FEATURES_FILE), name, Some(r.eval.clips)).ok_or_else(|| {
            Error::Data(format!(
                "stage `{}`: {} has no `{name}` (re-run the stage with this onestep)",
                r.stage,
                r.dir.join(FEATURES_FILE).display()
            ))
        })
    };
    let (ra, rb) = (load(a, "real_logits")?, load(b, "real_logits")?);
    if ra != rb {
        return Ok(None);
    }
    let (ga, gb) = (load(a, "gen_logits")?, load(b, "gen_logits")?);
    let fvd = bootstrap::paired_difference(&ra, &ga, &gb, resamples, 1)?;
    let ma = load(a, "real_motion")?;
    let (gma, gmb) = (load(a, "gen_motion")?, load(b, "gen_motion")?);
    let motion = bootstrap::paired_difference(&ma, &gma, &gmb, resamples, 1)?;
    Ok(Some((fvd, motion)))
}

fn verdict(d: &Interval, a: &str, b: &str) -> String {
    if !d.has_interval() {
        "-".into()
    } else if d.high < 0.0 {
        format!("{a} better")
    } else if d.low > 0.0 {
        format!("{b} better")
    } else {
        "not distinguishable".into()
    }
}

/// One row per distinct autoencoder ceiling among `group` (methods that share an autoencoder
/// share its reconstructions, so the same value), labelled with the methods it bounds.
/// Methods grouped by their autoencoder ceiling: equal `fvd_ceiling` values mean one
/// autoencoder (a student keeps its teacher's VAE, so they share reconstructions). Each group is
/// its first method and the names of every model in it, in order of appearance.
pub(crate) fn shared_ceilings<'a>(
    rows: impl IntoIterator<Item = &'a MethodRow>,
) -> Vec<(&'a MethodRow, Vec<String>)> {
    let mut out: Vec<(&MethodRow, Vec<String>)> = Vec::new();
    for r in rows {
        let Some(v) = r.get("fvd_ceiling") else {
            continue;
        };
        let model = &r.eval.model;
        match out
            .iter_mut()
            .find(|(first, _)| first.get("fvd_ceiling").map(f64::to_bits) == Some(v.to_bits()))
        {
            Some((_, models)) if !models.contains(model) => models.push(model.clone()),
            Some(_) => {}
            None => out.push((r, vec![model.clone()])),
        }
    }
    out
}

fn ceiling_rows(group: &[&MethodRow]) -> String {
    let mut out = String::new();
    for (r, models) in shared_ceilings(group.iter().copied()) {
        let models: Vec<String> = models.iter().map(|m| format!("`{m}`")).collect();
        out += &format!(
            "| ceiling: real through the autoencoder of {} | - | {} | {} | {} | {} | {} | {} | - | encode + decode only: no latent model on this autoencoder can beat it; all-frame PSNR {} dB |\n",
            models.join(", "),
            cell(r.interval("fvd_ceiling"), 1),
            cell(r.interval("motion_fd_ceiling"), 3),
            r.get("motion_mean_ceiling")
                .map_or("-".into(), |v| format!("{v:.4}")),
            cell(r.interval("ceiling_first_frame_psnr"), 2),
            cell(r.interval("ceiling_first_frame_ssim"), 3),
            cell(r.interval("fvd_ceiling_vs_static"), 1),
            cell(r.interval("ceiling_psnr"), 2),
        );
    }
    out
}

/// Markdown tables of one run's evaluations.
pub fn run_report(rows: &[MethodRow], resamples: usize) -> Result<String> {
    let mut groups: BTreeMap<(bool, usize, usize, usize, usize), Vec<&MethodRow>> = BTreeMap::new();
    for r in rows {
        let e = &r.eval;
        groups
            .entry((e.fast, e.clips, e.frames, e.height, e.width))
            .or_default()
            .push(r);
    }
    let mut out = String::new();
    for ((fast, n, frames, h, w), group) in groups {
        let resamples_logged = group[0].eval.resamples;
        out += &format!(
            "N = {n} clips of {frames} frames at {w}x{h} (resized to 224 for I3D); intervals are \
             95 % bootstrap intervals over {resamples_logged} resamples of the clips.{}{}\n\n",
            if fast {
                " **Quick check (`fast`): not comparable with full evaluations.**"
            } else {
                ""
            },
            if n < MIN_CLIPS || frames != 16 {
                format!(
                    " **Below the protocol ({MIN_CLIPS}+ clips of 16 frames): these FVDs are not \
                     comparable with published ones.**"
                )
            } else {
                String::new()
            }
        );
        out += "| row | sampler | FVD | motion FD | motion | first-frame PSNR | first-frame SSIM | FVD minus static | FVD minus ceiling | note |\n";
        out += "|---|---|---|---|---|---|---|---|---|---|\n";
        let refs = group
            .iter()
            .find(|r| r.get("fvd_floor").is_some() || r.get("fvd_static").is_some());
        if let Some(r) = refs {
            let real_motion = r.get("motion_mean_real");
            if let Some(fl) = r.interval("fvd_floor") {
                out += &format!(
                    "| floor: real vs real (N/2 = {} each) | - | {} | {} | {} | - | - | - | - | two disjoint halves of the real clips; a scale, not a lower bound |\n",
                    r.get("fvd_floor/clips").map_or(n / 2, |v| v as usize),
                    fl.display(1),
                    cell(r.interval("motion_fd_floor"), 3),
                    real_motion.map_or("-".into(), |v| format!("{v:.4}")),
                );
            }
            if !group.iter().any(|g| g.is_static()) {
                if let Some(st) = r.interval("fvd_static") {
                    out += &format!(
                        "| static: first frame repeated | - | {} | {} | 0 | - | - | - | - | the trivial image-to-video baseline |\n",
                        st.display(1),
                        cell(r.interval("motion_fd_static"), 3),
                    );
                }
            }
        }
        out += &ceiling_rows(&group);
        for r in &group {
            let note = if r.is_static() {
                "the trivial image-to-video baseline".to_string()
            } else {
                match r.interval("fvd_vs_static") {
                    Some(d) if d.has_interval() && d.high < 0.0 => String::new(),
                    Some(d) if d.has_interval() && d.low > 0.0 => "**worse than static**".into(),
                    Some(d) if d.has_interval() => "**not distinguishable from static**".into(),
                    _ => String::new(),
                }
            };
            let label = r.label();
            out += &format!(
                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {note} |\n",
                sampler_label(&r.eval),
                cell(r.interval("fvd"), 1),
                cell(r.interval("motion_fd"), 3),
                r.get("motion_mean")
                    .map_or("-".into(), |v| format!("{v:.4}")),
                cell(r.interval("first_frame_psnr"), 2),
                cell(r.interval("first_frame_ssim"), 3),
                cell(r.interval("fvd_vs_static"), 1),
                cell(r.interval("fvd_vs_ceiling"), 1),
            );
        }
        let methods: Vec<&&MethodRow> = group.iter().filter(|r| !r.is_static()).collect();
        if methods.len() >= 2 && resamples > 0 {
            out += &format!(
                "\nPaired differences (A minus B on the same {n} conditioning frames; {resamples} \
                 resamples; negative favours A):\n\n| A | B | FVD difference | verdict | motion FD difference | verdict |\n|---|---|---|---|---|---|\n"
            );
            for (i, a) in methods.iter().enumerate() {
                for b in &methods[i + 1..] {
                    let (la, lb) = (a.label(), b.label());
                    match compare(a, b, resamples)? {
                        Some((f, m)) => {
                            out += &format!(
                                "| {la} | {lb} | {} | {} | {} | {} |\n",
                                f.display(1),
                                verdict(&f, "A", "B"),
                                m.display(3),
                                verdict(&m, "A", "B"),
                            )
                        }
                        None => {
                            out += &format!("| {la} | {lb} | - | different real clips | - | - |\n")
                        }
                    }
                }
            }
        }
        out += "\n";
    }
    Ok(out)
}

/// The newest run of each variant and seed of an experiment, in the order they were created
/// (the spec's order); an error naming the store when it has none.
pub fn newest_runs(store: &Store, experiment: &str) -> Result<Vec<RunRow>> {
    let runs = store.runs(Some(experiment), None, &[])?;
    if runs.is_empty() {
        return Err(Error::Data(format!(
            "no runs of experiment `{experiment}` in {}",
            store.path().display()
        )));
    }
    let mut newest: BTreeMap<(String, i64), RunRow> = BTreeMap::new();
    for r in runs {
        newest.insert((r.variant.clone(), r.seed), r);
    }
    let mut runs: Vec<RunRow> = newest.into_values().collect();
    runs.sort_by_key(|r| r.id);
    Ok(runs)
}

/// The newest run of each variant and seed that has finished `fvd` stages, with its evaluated
/// methods (empty when no run has any).
pub fn evaluated_runs(
    store: &Store,
    results: &Path,
    experiment: &str,
) -> Result<Vec<(RunRow, Vec<MethodRow>)>> {
    let mut out = Vec::new();
    for run in newest_runs(store, experiment)? {
        let rows = run_methods(store, results, &run)?;
        if !rows.is_empty() {
            out.push((run, rows));
        }
    }
    Ok(out)
}

/// The per-run tables (one section per run) with the paired comparisons of its methods.
pub fn runs_report(
    per_run: &[(RunRow, Vec<MethodRow>)],
    resamples: Option<usize>,
) -> Result<String> {
    let mut out = String::new();
    for (run, rows) in per_run {
        out += &format!(
            "## variant `{}`, seed {} (run {}, {})\n\n",
            run.variant, run.seed, run.id, run.status
        );
        let b = resamples
            .unwrap_or_else(|| rows.first().map_or(DEFAULT_RESAMPLES, |r| r.eval.resamples));
        out += &run_report(rows, b)?;
    }
    Ok(out)
}
