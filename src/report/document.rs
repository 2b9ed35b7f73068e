//! The report folder of an experiment (`onestep report EXPERIMENT [--out DIR]`, default
//! `results/<experiment>/`): the comparison table as Markdown, LaTeX and CSV
//! ([`super::table`]); figures as PNG and SVG ([`super::figures`]): FVD vs NFE, sampling time
//! vs NFE, one bar chart per ablation axis, training curves per stage; side-by-side samples of
//! every method on the same conditioning frames ([`super::strips`]); and `report.md`, which ties
//! them together, states the scale, and names every run, spec and commit it came from.

use super::figures::{self, Bar, BarChart, Figure, LineChart, Point, Series};
use super::strips::{self, Lane};
use super::table::{self, RowKind, Table};
use crate::data::ClipSet;
use crate::error::{Error, Result};
use crate::plan::cache_dir;
use crate::store::{RunRow, Store};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to put in the report.
#[derive(Debug, Clone)]
pub struct Options {
    /// The row the verdicts compare against: `static` (default), an `fvd` stage name or
    /// `variant/stage`.
    pub reference: Option<String>,
    /// Bootstrap resamples of paired comparisons (default: as the stages).
    pub resamples: Option<usize>,
    /// Conditioning clips shown in the filmstrip and GIF.
    pub strip_clips: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            reference: None,
            resamples: None,
            strip_clips: 4,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub markdown: String,
    pub files: Vec<PathBuf>,
}

/// Metrics drawn as training curves, per stage: (key, dense: smoothed line vs sparse markers).
const CURVES: [(&str, bool); 6] = [
    ("loss", true),
    ("loss_g", true),
    ("loss_d", true),
    ("d_heldout_accuracy", false),
    ("psnr_test", false),
    ("recon", true),
];

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn slug(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("__") {
        out = out.replace("__", "_");
    }
    out.trim_matches('_').to_string()
}

/// Write the report of `experiment` into `dir`, `report.md` named `report_name`.
pub fn write_report(
    store: &Store,
    results: &Path,
    experiment: &str,
    dir: &Path,
    report_name: &str,
    opts: &Options,
) -> Result<Written> {
    std::fs::create_dir_all(dir).map_err(|e| Error::Other(format!("{}: {e}", dir.display())))?;
    let runs = super::newest_runs(store, experiment)?;
    let evaluated = super::evaluated_runs(store, results, experiment)?;
    // An experiment without evaluations still has its runs and training curves.
    let table = if evaluated.is_empty() {
        None
    } else {
        Some(table::build(
            &evaluated,
            experiment,
            opts.reference.as_deref(),
            opts.resamples,
        )?)
    };
    let mut files = Vec::new();
    let mut md = format!("# {experiment}: report\n\n");
    if let Some((desc, spec)) = store.experiment_info(experiment)? {
        if !desc.is_empty() {
            md += &format!("{desc}\n\n");
        }
        md += &format!(
            "Made by `onestep report {experiment}` from the store `{}`{}. Every number below comes from the runs listed under \"Runs\".\n\n",
            store.path().display(),
            if spec.is_empty() {
                String::new()
            } else {
                format!(", spec `{spec}`")
            }
        );
    }
    md += "## Scale\n\n";
    match &table {
        Some(t) => {
            for g in &t.groups {
                md += &format!("- {}.\n", g.scale());
            }
        }
        None => md += "- No `fvd` stage has finished: training curves only.\n",
    }
    md += "\n## Runs\n\n| run | variant | seed | status | commit | device | host | started |\n|---|---|---|---|---|---|---|---|\n";
    for r in &runs {
        md += &format!(
            "| {} | {} | {} | {} | {}{} | {} | {} | {} |\n",
            r.id,
            r.variant,
            r.seed,
            r.status,
            r.git_commit
                .as_deref()
                .map_or("-".into(), |c| format!("`{}`", &c[..c.len().min(10)])),
            if r.git_dirty == Some(true) {
                " (uncommitted changes)"
            } else {
                ""
            },
            r.device.as_deref().unwrap_or("-"),
            r.host.as_deref().unwrap_or("-"),
            crate::util::utc_time(r.started_at),
        );
    }
    md += "\n";

    if let Some(t) = &table {
        md += &format!(
            "## Comparison\n\nOne row per method x sampler x NFE; verdicts are paired differences against {} on the same conditioning frames (negative FVD difference favours the method). `HF energy / real`: the frames' mean squared Laplacian over the real clips' on the same conditioning frames (below 1: smoother than real; `docs/evaluation.md`). Also as [LaTeX](table.tex) and [CSV](table.csv).\n\n",
            t.reference_name()
        );
        md += &t.markdown();
        for (name, text) in [("table.tex", t.latex()), ("table.csv", t.csv()?)] {
            let p = dir.join(name);
            crate::util::atomic_write(&p, text.as_bytes())?;
            files.push(p);
        }
    }

    let mut figs: Vec<(String, Figure, String)> = Vec::new();
    if let Some(t) = &table {
        figs.extend(nfe_figures(t));
        figs.extend(ablation_figures(store, t, &runs)?);
    }
    figs.extend(curve_figures(store, &runs)?);
    if !figs.is_empty() {
        md += "## Figures\n\n";
    }
    for (stem, fig, caption) in &figs {
        let written = figures::write(fig, dir, stem)?;
        md += &format!(
            "![{}]({stem}.png)\n\n{caption} ([SVG]({stem}.svg))\n\n",
            fig.title()
        );
        files.extend(written);
    }

    if let Some(t) = &table {
        let samples = sample_lanes(store, results, t)?;
        if let Some((clips, lanes, scale)) = samples {
            let k = opts.strip_clips.min(clips).max(1);
            let lanes: Vec<Lane<'_>> = lanes
                .iter()
                .map(|(label, set)| Lane {
                    label: label.clone(),
                    clips: set,
                })
                .collect();
            let png = dir.join("samples.png");
            strips::filmstrip(&lanes, k, 8, &png)?;
            let gif = dir.join("samples.gif");
            strips::gif(&lanes, k, 8.0, &gif)?;
            md += &format!(
                "## Samples\n\nThe first {k} test clips' conditioning frames, every method on the same ones ({scale}; seed of the first run). Real clip first, then each method's generation; `samples.gif` plays them side by side.\n\n![samples](samples.png)\n\n![samples, animated](samples.gif)\n\n"
            );
            files.push(png);
            files.push(gif);
        }
        md += "## Per run: tables and paired comparisons between methods\n\n";
        md += &super::runs_report(&evaluated, opts.resamples)?;
    }
    let report = dir.join(report_name);
    crate::util::atomic_write(&report, md.as_bytes())?;
    files.push(report);
    Ok(Written {
        markdown: md,
        files,
    })
}

/// FVD vs NFE (log x, interval bars; static and ceilings as lines) and sampling time vs NFE,
/// per group of comparable rows.
fn nfe_figures(t: &Table) -> Vec<(String, Figure, String)> {
    let mut out = Vec::new();
    let several = t.groups.len() > 1;
    for (gi, g) in t.groups.iter().enumerate() {
        let suffix = if several {
            format!("_{gi}")
        } else {
            String::new()
        };
        let mut fvd: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        let mut time: BTreeMap<String, Vec<Point>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for r in g.rows.iter().filter(|r| r.kind == RowKind::Method) {
            let Some(nfe) = r.nfe.filter(|&n| n > 0) else {
                continue;
            };
            let name = r.series();
            if !order.contains(&name) {
                order.push(name.clone());
            }
            if let Some(s) = r.stat("fvd") {
                fvd.entry(name.clone()).or_default().push(Point {
                    x: nfe as f64,
                    y: s.mean().unwrap_or(f64::NAN),
                    interval: s.interval(),
                });
            }
            if let Some(s) = r.stat("seconds_per_clip").filter(|s| s.mean() > Some(0.0)) {
                time.entry(name).or_default().push(Point {
                    x: nfe as f64,
                    y: s.mean().unwrap_or(f64::NAN),
                    interval: None,
                });
            }
        }
        let series = |m: &mut BTreeMap<String, Vec<Point>>| -> Vec<Series> {
            order
                .iter()
                .filter_map(|name| {
                    let mut points = m.remove(name)?;
                    points.sort_by(|a, b| a.x.total_cmp(&b.x));
                    Some(Series {
                        name: name.clone(),
                        points,
                        markers: true,
                    })
                })
                .collect()
        };
        let references: Vec<(String, f64)> = g
            .rows
            .iter()
            .filter(|r| matches!(r.kind, RowKind::Static | RowKind::Ceiling))
            .filter_map(|r| Some((r.label.replace('`', ""), r.stat("fvd")?.mean()?)))
            .collect();
        let fvd_series = series(&mut fvd);
        if !fvd_series.is_empty() {
            out.push((
                format!("fvd_vs_nfe{suffix}"),
                Figure::Line(LineChart {
                    title: format!("FVD vs NFE — {}", short_scale(g)),
                    x_label: "network evaluations per clip (NFE, log)".into(),
                    y_label: "FVD (lower is better)".into(),
                    log_x: true,
                    series: fvd_series,
                    references,
                }),
                format!(
                    "FVD against network evaluations per clip, bars: 95 % bootstrap intervals over clips; dashed: the static baseline and the autoencoder ceilings. {}.",
                    g.scale()
                ),
            ));
        }
        let time_series = series(&mut time);
        if !time_series.is_empty() {
            out.push((
                format!("time_vs_nfe{suffix}"),
                Figure::Line(LineChart {
                    title: format!("Sampling time vs NFE — {}", short_scale(g)),
                    x_label: "network evaluations per clip (NFE, log)".into(),
                    y_label: "seconds per clip".into(),
                    log_x: true,
                    series: time_series,
                    references: vec![],
                }),
                "Wall seconds per generated clip (the `fvd` stage's generation time / N, batched, on the run's device).".into(),
            ));
        }
    }
    out
}

fn short_scale(g: &table::Group) -> String {
    format!("N={}, {}f {}x{}", g.clips, g.frames, g.width, g.height)
}

/// The ablation axes of an experiment: sets of params that change together across variants
/// (each set is one axis). Returns (axis keys, one (variant, value) per distinct value: the
/// first variant in run order that has it; the value is empty for an axis of several keys).
fn axes(store: &Store, runs: &[RunRow]) -> Result<Vec<Axis>> {
    let mut variants: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for r in runs {
        if variants.iter().any(|(v, _)| *v == r.variant) {
            continue;
        }
        let p: BTreeMap<String, String> = store
            .params_of(r.id)?
            .into_iter()
            .filter(|(k, _)| k != "seed")
            .collect();
        variants.push((r.variant.clone(), p));
    }
    Ok(axes_of(&variants))
}

type Axis = (Vec<String>, Vec<(String, String)>);

/// [`axes`] on (variant, params) pairs.
fn axes_of(variants: &[(String, BTreeMap<String, String>)]) -> Vec<Axis> {
    if variants.len() < 2 {
        return vec![];
    }
    let keys: std::collections::BTreeSet<&String> =
        variants.iter().flat_map(|(_, p)| p.keys()).collect();
    // Each differing key's partition of the variants (by value); keys with equal partitions are
    // one axis.
    let mut groups: Vec<(Vec<usize>, Vec<String>)> = Vec::new();
    for k in keys {
        let vals: Vec<Option<&String>> = variants.iter().map(|(_, p)| p.get(k)).collect();
        if vals.iter().all(|v| *v == vals[0]) {
            continue;
        }
        let mut seen: Vec<Option<&String>> = Vec::new();
        let part: Vec<usize> = vals
            .iter()
            .map(|v| match seen.iter().position(|s| s == v) {
                Some(i) => i,
                None => {
                    seen.push(*v);
                    seen.len() - 1
                }
            })
            .collect();
        match groups.iter_mut().find(|(p, _)| *p == part) {
            Some((_, ks)) => ks.push(k.clone()),
            None => groups.push((part, vec![k.clone()])),
        }
    }
    // Per axis, one bar per value: the first variant (in run order) that has it.
    groups
        .into_iter()
        .map(|(part, ks)| {
            let mut vals: Vec<(String, String)> = Vec::new();
            let mut seen = Vec::new();
            for (i, (v, p)) in variants.iter().enumerate() {
                if seen.contains(&part[i]) {
                    continue;
                }
                seen.push(part[i]);
                let shown = if ks.len() == 1 {
                    p.get(&ks[0]).cloned().unwrap_or_else(|| "(absent)".into())
                } else {
                    String::new()
                };
                vals.push((v.clone(), shown));
            }
            (ks, vals)
        })
        .collect()
}

/// One bar chart of FVD per ablation axis and evaluated stage.
fn ablation_figures(
    store: &Store,
    t: &Table,
    runs: &[RunRow],
) -> Result<Vec<(String, Figure, String)>> {
    let mut out = Vec::new();
    let Some(g) = t.groups.first() else {
        return Ok(out);
    };
    let axes = axes(store, runs)?;
    let stages: Vec<&str> = {
        let mut s: Vec<&str> = Vec::new();
        for r in g.rows.iter().filter(|r| r.kind == RowKind::Method) {
            if !s.contains(&r.stage.as_str()) {
                s.push(&r.stage);
            }
        }
        s
    };
    let static_fvd = g
        .rows
        .iter()
        .find(|r| r.kind == RowKind::Static)
        .and_then(|r| r.stat("fvd")?.mean());
    for (ai, (keys, values)) in axes.iter().enumerate() {
        // Params a stage resolves but the run does not use (seed-like bookkeeping) still count;
        // an axis with only such keys still separates variants, so it is drawn.
        let axis_name = if keys.len() == 1 {
            keys[0].clone()
        } else {
            format!("{} (+{} more)", keys[0], keys.len() - 1)
        };
        for stage in &stages {
            let bars: Vec<Bar> = values
                .iter()
                .filter_map(|(variant, value)| {
                    let r = g.rows.iter().find(|r| {
                        r.kind == RowKind::Method && r.stage == *stage && r.variant == *variant
                    })?;
                    let s = r.stat("fvd")?;
                    Some(Bar {
                        name: if value.is_empty() {
                            variant.clone()
                        } else {
                            format!("{variant} ({value})")
                        },
                        value: s.mean()?,
                        interval: s.interval(),
                    })
                })
                .collect();
            if bars.len() < 2 {
                continue;
            }
            out.push((
                format!("ablation_{ai}_{}", slug(stage)),
                Figure::Bars(BarChart {
                    title: format!("FVD of `{stage}` by {axis_name}"),
                    y_label: "FVD (lower is better)".into(),
                    bars,
                    references: static_fvd
                        .map(|v| vec![("static".to_string(), v)])
                        .unwrap_or_default(),
                }),
                format!(
                    "Ablation axis: {}. Bars: FVD (mean over seeds) with its 95 % bootstrap interval; dashed: static.",
                    keys.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(out)
}

/// Training curves: per stage name and metric of [`CURVES`], one line per distinct stage
/// (variants that share a cached stage share its line).
fn curve_figures(store: &Store, runs: &[RunRow]) -> Result<Vec<(String, Figure, String)>> {
    // stage name -> [(hash, labels)]
    let mut stages: Vec<(String, String, Vec<(String, Vec<String>)>)> = Vec::new();
    for r in runs {
        for st in store.stages_of(r.id)? {
            if !matches!(
                st.kind.as_str(),
                "autoencoder" | "teacher" | "consistency" | "gan"
            ) {
                continue;
            }
            let label = format!("{} s{}", r.variant, r.seed);
            let entry = match stages.iter_mut().find(|(n, ..)| *n == st.name) {
                Some(e) => e,
                None => {
                    stages.push((st.name.clone(), st.kind.clone(), Vec::new()));
                    stages.last_mut().expect("just pushed")
                }
            };
            match entry.2.iter_mut().find(|(h, _)| *h == st.hash) {
                Some((_, labels)) => labels.push(label),
                None => entry.2.push((st.hash.clone(), vec![label])),
            }
        }
    }
    let mut out = Vec::new();
    for (name, kind, hashes) in &stages {
        for (key, dense) in CURVES {
            let mut series = Vec::new();
            for (hash, labels) in hashes {
                let pts: Vec<(f64, f64)> = store
                    .metric_series(hash, key)?
                    .into_iter()
                    .map(|(s, v)| (s as f64, v))
                    .filter(|p| p.1.is_finite())
                    .collect();
                if pts.len() < 2 {
                    continue;
                }
                let pts = if dense {
                    figures::smooth(&pts, (pts.len() / 50).max(1))
                } else {
                    pts
                };
                let mut label = labels.join(", ");
                if label.chars().count() > 40 {
                    label = format!("{} (+{} runs)", labels[0], labels.len() - 1);
                }
                series.push(Series {
                    name: label,
                    points: pts
                        .into_iter()
                        .map(|(x, y)| Point {
                            x,
                            y,
                            interval: None,
                        })
                        .collect(),
                    markers: !dense,
                });
            }
            if series.is_empty() {
                continue;
            }
            out.push((
                format!("curve_{}_{}", slug(name), slug(key)),
                Figure::Line(LineChart {
                    title: format!("{key} of stage `{name}` ({kind})"),
                    x_label: "step".into(),
                    y_label: key.into(),
                    log_x: false,
                    series,
                    references: vec![],
                }),
                format!(
                    "`{key}` of stage `{name}` per step{}; one line per distinct stage (runs that share a cached stage share a line).",
                    if dense { ", trailing mean over 2 % of the steps" } else { "" }
                ),
            ));
        }
    }
    Ok(out)
}

type Lanes = (usize, Vec<(String, ClipSet)>, String);

/// The real test clips and every method's generations of the first group, from the runs of
/// the lowest seed.
fn sample_lanes(store: &Store, results: &Path, t: &Table) -> Result<Option<Lanes>> {
    let Some(g) = t.groups.first() else {
        return Ok(None);
    };
    let Some(seed) = t.runs.iter().map(|r| r.seed).min() else {
        return Ok(None);
    };
    let mut lanes: Vec<(String, ClipSet)> = Vec::new();
    let mut real: Option<ClipSet> = None;
    let mut n = g.clips;
    // Rows of one run share its stage list: read it once.
    let mut stages_by_run: std::collections::HashMap<i64, Vec<crate::store::RunStageRow>> =
        std::collections::HashMap::new();
    for r in g
        .rows
        .iter()
        .filter(|r| matches!(r.kind, RowKind::Method | RowKind::Static) && !r.stage.is_empty())
    {
        let Some(run) = t
            .runs
            .iter()
            .find(|x| x.seed == seed && r.runs.contains(&x.id))
        else {
            continue;
        };
        if !stages_by_run.contains_key(&run.id) {
            stages_by_run.insert(run.id, store.stages_of(run.id)?);
        }
        let stages = &stages_by_run[&run.id];
        let Some(st) = stages.iter().find(|s| s.name == r.stage) else {
            continue;
        };
        let gen_path = cache_dir(results, &st.hash).join("generated.safetensors");
        let Ok(gen) = ClipSet::load(&gen_path) else {
            continue;
        };
        if real.is_none() {
            for d in stages.iter().filter(|s| s.kind == "data") {
                if let Ok(test) =
                    ClipSet::load(&cache_dir(results, &d.hash).join("test.safetensors"))
                {
                    if (test.height, test.width) == (gen.height, gen.width) {
                        real = Some(test);
                        break;
                    }
                }
            }
        }
        n = n.min(gen.len());
        lanes.push((r.label.replace('`', ""), gen));
    }
    let Some(real) = real else {
        return Ok(None);
    };
    if lanes.is_empty() {
        return Ok(None);
    }
    n = n.min(real.len());
    let scale = format!("{}x{}, {} frames", real.width, real.height, real.frames);
    lanes.insert(0, ("real clip".into(), real));
    Ok(Some((n, lanes, scale)))
}

pub fn file_list(w: &Written, root: &Path) -> String {
    w.files
        .iter()
        .map(|f| {
            f.strip_prefix(root)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| file_name(f))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str, kv: &[(&str, &str)]) -> (String, BTreeMap<String, String>) {
        (
            name.into(),
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn axes_group_keys_that_change_together_and_keep_one_bar_per_value() {
        let vs = [
            v(
                "base",
                &[("a", "1"), ("g", "3.0"), ("in", "up"), ("bb", "eff")],
            ),
            v(
                "cfg15",
                &[("a", "1"), ("g", "1.5"), ("in", "up"), ("bb", "eff")],
            ),
            v(
                "cfg1",
                &[("a", "1"), ("g", "1.0"), ("in", "up"), ("bb", "eff")],
            ),
            v(
                "sfv",
                &[("a", "1"), ("g", "3.0"), ("in", "latent"), ("bb", "unet")],
            ),
        ];
        let axes = axes_of(&vs);
        assert_eq!(axes.len(), 2, "{axes:?}");
        // `g` alone: three values, each from the first variant that has it.
        let g = axes.iter().find(|(k, _)| k == &["g"]).unwrap();
        assert_eq!(
            g.1,
            [
                ("base".to_string(), "3.0".to_string()),
                ("cfg15".into(), "1.5".into()),
                ("cfg1".into(), "1.0".into())
            ]
        );
        // `in` and `bb` change together: one axis, bars named by variant.
        let d = axes.iter().find(|(k, _)| k.len() == 2).unwrap();
        assert_eq!(d.0, ["bb", "in"]);
        assert_eq!(
            d.1,
            [
                ("base".to_string(), String::new()),
                ("sfv".into(), String::new())
            ]
        );
        assert!(axes_of(&vs[..1]).is_empty());
    }
}
