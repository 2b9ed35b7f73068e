//! The comparison table of an experiment: one row per method x sampler x NFE across its
//! variants, aggregated over seeds, with the reference rows (floor, static, autoencoder
//! ceilings) first and a paired verdict of every method against a chosen reference row. Written
//! as Markdown, LaTeX (booktabs) and CSV (through polars).
//!
//! Aggregation over seeds: the value is the mean over seeds and the spread their sample
//! standard deviation (from 2 seeds on); the interval is the 95 % bootstrap interval over clips
//! of a single seed, or with several seeds the mean of the per-seed intervals' endpoints (a
//! typical per-seed interval, not an interval of the mean).

use super::{compare, MethodRow};
use crate::error::{Error, Result};
use crate::metrics::bootstrap::Interval;
use crate::store::RunRow;
use polars::prelude::*;
use std::collections::BTreeMap;

/// What a row is: references first, then the methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowKind {
    Floor,
    Static,
    Ceiling,
    Method,
}

impl RowKind {
    pub fn name(self) -> &'static str {
        match self {
            RowKind::Floor => "floor",
            RowKind::Static => "static",
            RowKind::Ceiling => "ceiling",
            RowKind::Method => "method",
        }
    }
}

/// One column of one row over seeds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stat {
    pub values: Vec<f64>,
    pub lows: Vec<f64>,
    pub highs: Vec<f64>,
}

impl Stat {
    pub fn push(&mut self, i: Interval) {
        self.values.push(i.value);
        if i.has_interval() {
            self.lows.push(i.low);
            self.highs.push(i.high);
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (!self.values.is_empty()).then(|| mean(&self.values))
    }

    /// Sample standard deviation over seeds (at least 2).
    pub fn sd(&self) -> Option<f64> {
        let n = self.values.len();
        (n >= 2).then(|| {
            let m = mean(&self.values);
            (self.values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        })
    }

    /// The interval (see the module docs), when every seed has one.
    pub fn interval(&self) -> Option<(f64, f64)> {
        (!self.lows.is_empty() && self.lows.len() == self.values.len())
            .then(|| (mean(&self.lows), mean(&self.highs)))
    }

    /// As an [`Interval`] (NaN bounds without one), or `None` when never logged.
    pub fn as_interval(&self) -> Option<Interval> {
        let value = self.mean()?;
        Some(match self.interval() {
            Some((low, high)) => Interval { value, low, high },
            None => Interval::point(value),
        })
    }

    /// `mean ± sd [low, high]`, parts omitted when absent; `-` when never logged.
    pub fn display(&self, decimals: usize) -> String {
        let Some(m) = self.mean() else {
            return "-".into();
        };
        let mut s = format!("{m:.decimals$}");
        if let Some(sd) = self.sd() {
            s += &format!(" ± {sd:.decimals$}");
        }
        if let Some((lo, hi)) = self.interval() {
            s += &format!(" [{lo:.decimals$}, {hi:.decimals$}]");
        }
        s
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The columns, in order: (key, header, decimals).
pub const COLUMNS: [(&str, &str, usize); 7] = [
    ("fvd", "FVD", 1),
    ("motion_fd", "motion FD", 3),
    ("first_frame_psnr", "first-frame PSNR", 2),
    ("first_frame_ssim", "first-frame SSIM", 3),
    ("hf_energy_ratio", "HF energy / real", 3),
    ("seconds_per_clip", "s / clip", 3),
    ("vs_reference", "FVD minus reference", 1),
];

#[derive(Debug, Clone)]
pub struct Row {
    pub kind: RowKind,
    pub label: String,
    pub variant: String,
    /// The `fvd` stage (empty for reference rows).
    pub stage: String,
    pub model: String,
    /// `method (N NFE)`, as shown.
    pub sampler: String,
    /// The sampler's method alone (figures draw one series per model and method).
    pub sampler_method: String,
    pub nfe: Option<usize>,
    pub cols: BTreeMap<&'static str, Stat>,
    pub runs: Vec<i64>,
    pub seeds: Vec<i64>,
}

impl Row {
    fn new(kind: RowKind, label: String, variant: &str) -> Self {
        Row {
            kind,
            label,
            variant: variant.into(),
            stage: String::new(),
            model: String::new(),
            sampler: "-".into(),
            sampler_method: "-".into(),
            nfe: None,
            cols: BTreeMap::new(),
            runs: Vec::new(),
            seeds: Vec::new(),
        }
    }

    pub fn stat(&self, col: &str) -> Option<&Stat> {
        self.cols.get(col).filter(|s| !s.values.is_empty())
    }

    fn add(&mut self, col: &'static str, i: Option<Interval>) {
        if let Some(i) = i {
            self.cols.entry(col).or_default().push(i);
        }
    }

    /// The verdict of the paired difference to the reference row.
    pub fn verdict(&self, reference: &str) -> String {
        match self.stat("vs_reference").and_then(|s| s.interval()) {
            Some((_, hi)) if hi < 0.0 => format!("better than {reference}"),
            Some((lo, _)) if lo > 0.0 => format!("worse than {reference}"),
            Some(_) => "not distinguishable".into(),
            None => "-".into(),
        }
    }

    /// `model (sampler method)`, per variant: the series figures draw, one per evaluated model
    /// and sampler, its step counts along the x axis.
    pub fn series(&self) -> String {
        if self.variant.is_empty() {
            format!("{} ({})", self.model, self.sampler_method)
        } else {
            format!("{}: {} ({})", self.variant, self.model, self.sampler_method)
        }
    }
}

/// Rows that share N, clip length, resolution and quick/full evaluation.
#[derive(Debug, Clone)]
pub struct Group {
    pub fast: bool,
    pub clips: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub resamples: usize,
    pub rows: Vec<Row>,
}

impl Group {
    /// One line on the scale of these numbers.
    pub fn scale(&self) -> String {
        let toy = self.height < 256 || self.clips < super::MIN_CLIPS || self.frames != 16;
        format!(
            "N = {} clips of {} frames at {}x{}{}{}",
            self.clips,
            self.frames,
            self.width,
            self.height,
            if self.fast {
                ", quick check (`fast`)"
            } else {
                ""
            },
            if toy {
                " — toy scale: not comparable with published FVDs"
            } else {
                ""
            }
        )
    }
}

#[derive(Debug, Clone)]
pub struct Table {
    pub experiment: String,
    /// The label the verdict column compares against.
    pub reference: String,
    pub groups: Vec<Group>,
    /// The runs it was built from.
    pub runs: Vec<RunRow>,
}

/// Which method of a run `reference` names: its `fvd` stage, `variant/stage`, or the model.
fn is_reference(reference: &str, variant: &str, r: &MethodRow) -> bool {
    reference == r.stage || reference == format!("{variant}/{}", r.stage)
}

/// The comparison table of an experiment's evaluated runs ([`super::evaluated_runs`]).
/// `reference`: `static` (default) or the `fvd` stage (or `variant/stage`) the verdicts
/// compare against.
pub fn build(
    per_run: &[(RunRow, Vec<MethodRow>)],
    experiment: &str,
    reference: Option<&str>,
    resamples: Option<usize>,
) -> Result<Table> {
    let reference = reference.unwrap_or(super::STATIC).to_string();
    if per_run.is_empty() {
        return Err(Error::Data(format!(
            "experiment `{experiment}` has no finished `fvd` stages to report"
        )));
    }
    let multi = per_run
        .iter()
        .map(|(r, _)| &r.variant)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    if reference != super::STATIC
        && !per_run.iter().any(|(run, rows)| {
            rows.iter()
                .any(|r| is_reference(&reference, &run.variant, r))
        })
    {
        return Err(Error::Data(format!(
            "--reference `{reference}`: no `fvd` stage of experiment `{experiment}` has that name (give `static`, a stage name or `variant/stage`)"
        )));
    }
    type GroupKey = (bool, usize, usize, usize, usize);
    let mut groups: BTreeMap<GroupKey, (usize, Vec<(String, Row)>)> = BTreeMap::new();
    for (run, rows) in per_run {
        let variant = if multi { run.variant.as_str() } else { "" };
        let prefix = if multi {
            format!("{}: ", run.variant)
        } else {
            String::new()
        };
        // One ceiling row per autoencoder, named by every model that shares it.
        let shared = super::shared_ceilings(rows);
        for r in rows {
            let e = &r.eval;
            let (_, entries) = groups
                .entry((e.fast, e.clips, e.frames, e.height, e.width))
                .or_insert_with(|| (e.resamples, Vec::new()));
            let mut put = |key: String, make: &dyn Fn() -> Row, fill: &dyn Fn(&mut Row)| {
                let i = match entries.iter().position(|(k, _)| *k == key) {
                    Some(i) => i,
                    None => {
                        entries.push((key, make()));
                        entries.len() - 1
                    }
                };
                let row = &mut entries[i].1;
                if !row.runs.contains(&run.id) {
                    row.runs.push(run.id);
                    row.seeds.push(run.seed);
                    fill(row);
                }
            };
            // Reference rows: shared by every method of a run, logged by each.
            if let Some(fl) = r.interval("fvd_floor") {
                let half = r.get("fvd_floor/clips").map_or(e.clips / 2, |v| v as usize);
                put(
                    "floor".into(),
                    &|| {
                        Row::new(
                            RowKind::Floor,
                            format!("floor: real vs real (N/2 = {half} each)"),
                            "",
                        )
                    },
                    &|row| {
                        row.add("fvd", Some(fl));
                        row.add("motion_fd", r.interval("motion_fd_floor"));
                    },
                );
            }
            if let Some(st) = r.interval("fvd_static") {
                put(
                    "static".into(),
                    &|| {
                        let mut row =
                            Row::new(RowKind::Static, "static: first frame repeated".into(), "");
                        row.model = super::STATIC.into();
                        row.nfe = Some(0);
                        row
                    },
                    &|row| {
                        row.add("fvd", Some(st));
                        row.add("motion_fd", r.interval("motion_fd_static"));
                        row.add("seconds_per_clip", Some(Interval::point(0.0)));
                    },
                );
            }
            if let Some(c) = r.interval("fvd_ceiling") {
                let models = shared
                    .iter()
                    .find(|(_, m)| m.contains(&r.eval.model))
                    .map_or_else(|| vec![r.eval.model.clone()], |(_, m)| m.clone());
                put(
                    format!("ceiling {variant} {}", models[0]),
                    &|| {
                        let names: Vec<String> = models.iter().map(|m| format!("`{m}`")).collect();
                        Row::new(
                            RowKind::Ceiling,
                            format!(
                                "{prefix}ceiling: real through the autoencoder of {}",
                                names.join(", ")
                            ),
                            variant,
                        )
                    },
                    &|row| {
                        row.add("fvd", Some(c));
                        row.add("motion_fd", r.interval("motion_fd_ceiling"));
                        row.add("first_frame_psnr", r.interval("ceiling_first_frame_psnr"));
                        row.add("first_frame_ssim", r.interval("ceiling_first_frame_ssim"));
                        if reference == super::STATIC {
                            row.add("vs_reference", r.interval("fvd_ceiling_vs_static"));
                        }
                    },
                );
            }
            if r.is_static() {
                // An explicit static stage is the static row itself.
                continue;
            }
            let vs_ref = if reference == super::STATIC {
                r.interval("fvd_vs_static")
            } else if is_reference(&reference, &run.variant, r) {
                None
            } else {
                // The reference method of the same seed (any variant): paired on the clips.
                let target = per_run.iter().find_map(|(other, rows)| {
                    (other.seed == run.seed)
                        .then(|| {
                            rows.iter()
                                .find(|m| is_reference(&reference, &other.variant, m))
                        })
                        .flatten()
                });
                match target {
                    Some(t) if resamples != Some(0) => {
                        compare(r, t, resamples.unwrap_or(r.eval.resamples).max(1))?.map(|(f, _)| f)
                    }
                    _ => None,
                }
            };
            put(
                format!("method {variant} {}", r.stage),
                &|| {
                    let mut row = Row::new(
                        RowKind::Method,
                        format!("{prefix}{} (`{}`)", r.eval.model, r.stage),
                        variant,
                    );
                    row.stage = r.stage.clone();
                    row.model = r.eval.model.clone();
                    row.sampler = super::sampler_label(&r.eval);
                    row.sampler_method = super::sampler_method(&r.eval);
                    row.nfe = Some(r.eval.nfe);
                    row
                },
                &|row| {
                    for (col, metric) in [
                        ("fvd", "fvd"),
                        ("motion_fd", "motion_fd"),
                        ("first_frame_psnr", "first_frame_psnr"),
                        ("first_frame_ssim", "first_frame_ssim"),
                        ("hf_energy_ratio", "hf_energy_ratio"),
                    ] {
                        row.add(col, r.interval(metric));
                    }
                    row.add(
                        "seconds_per_clip",
                        r.get("seconds_per_clip").map(Interval::point),
                    );
                    row.add("vs_reference", vs_ref);
                },
            );
        }
    }
    let groups = groups
        .into_iter()
        .map(
            |((fast, clips, frames, height, width), (resamples, entries))| {
                let mut rows: Vec<Row> = entries.into_iter().map(|(_, r)| r).collect();
                // References first; methods keep their order of appearance (stable sort).
                rows.sort_by_key(|r| r.kind);
                Group {
                    fast,
                    clips,
                    frames,
                    height,
                    width,
                    resamples,
                    rows,
                }
            },
        )
        .collect();
    Ok(Table {
        experiment: experiment.into(),
        reference,
        groups,
        runs: per_run.iter().map(|(r, _)| r.clone()).collect(),
    })
}

fn nfe_cell(r: &Row) -> String {
    r.nfe.map_or("-".into(), |n| n.to_string())
}

fn seeds_cell(r: &Row) -> String {
    if r.seeds.is_empty() {
        "-".into()
    } else {
        r.seeds.len().to_string()
    }
}

impl Table {
    /// The reference's display name in headers and verdicts.
    pub fn reference_name(&self) -> String {
        if self.reference == super::STATIC {
            "static".into()
        } else {
            format!("`{}`", self.reference)
        }
    }

    pub fn markdown(&self) -> String {
        let rn = self.reference_name();
        let mut out = String::new();
        for g in &self.groups {
            out += &format!(
                "{}. Values: mean over seeds (± their standard deviation from 2 seeds on) and the 95 % bootstrap interval over clips ({} resamples).\n\n",
                g.scale(),
                g.resamples
            );
            out += "| row | sampler | NFE |";
            for (key, head, _) in COLUMNS {
                if key == "vs_reference" {
                    out += &format!(" FVD minus {rn} (paired) |");
                } else {
                    out += &format!(" {head} |");
                }
            }
            out += " verdict | seeds |\n|---|---|---|";
            out += &"---|".repeat(COLUMNS.len() + 2);
            out += "\n";
            for r in &g.rows {
                out += &format!("| {} | {} | {} |", r.label, r.sampler, nfe_cell(r));
                for (key, _, d) in COLUMNS {
                    out += &format!(" {} |", r.stat(key).map_or("-".into(), |s| s.display(d)));
                }
                out += &format!(" {} | {} |\n", r.verdict(&rn), seeds_cell(r));
            }
            out += "\n";
        }
        out
    }

    /// LaTeX (booktabs): one `tabular` per group, references above a rule.
    pub fn latex(&self) -> String {
        let rn = latex_escape(&self.reference_name().replace('`', ""));
        let mut out = format!(
            "% onestep report {}: generated, do not edit. Needs \\usepackage{{booktabs}}.\n",
            latex_escape(&self.experiment)
        );
        for g in &self.groups {
            out += &format!("% {}\n", latex_escape(&g.scale()));
            out += "\\begin{tabular}{llr";
            out += &"r".repeat(COLUMNS.len());
            out += "l}\n\\toprule\nRow & Sampler & NFE";
            for (key, head, _) in COLUMNS {
                if key == "vs_reference" {
                    out += &format!(" & $\\Delta$FVD vs {rn}");
                } else {
                    out += &format!(" & {}", latex_escape(head));
                }
            }
            out += " & Verdict \\\\\n\\midrule\n";
            let mut in_refs = true;
            for r in &g.rows {
                if in_refs && r.kind == RowKind::Method {
                    in_refs = false;
                    if g.rows.iter().any(|x| x.kind != RowKind::Method) {
                        out += "\\midrule\n";
                    }
                }
                out += &format!(
                    "{} & {} & {}",
                    latex_escape(&r.label.replace('`', "")),
                    latex_escape(&r.sampler),
                    nfe_cell(r)
                );
                for (key, _, d) in COLUMNS {
                    out += " & ";
                    out += &r.stat(key).map_or("--".into(), |s| latex_stat(s, d));
                }
                out += &format!(" & {} \\\\\n", latex_escape(&r.verdict(&rn)));
            }
            out += "\\bottomrule\n\\end{tabular}\n\n";
        }
        out
    }

    /// One flat frame: a row per table row (its group as `clips`, `frames`, `resolution`,
    /// `fast`), every column as mean, sd, low, high.
    pub fn frame(&self) -> Result<DataFrame> {
        let rn = self.reference_name();
        let mut text: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut ints: BTreeMap<&str, Vec<Option<i64>>> = BTreeMap::new();
        let mut nums: Vec<(String, Vec<Option<f64>>)> = Vec::new();
        for (key, _, _) in COLUMNS {
            for suffix in ["", "_sd", "_low", "_high"] {
                nums.push((format!("{key}{suffix}"), Vec::new()));
            }
        }
        for g in &self.groups {
            for r in &g.rows {
                let t = [
                    ("kind", r.kind.name().to_string()),
                    ("fast", g.fast.to_string()),
                    ("label", r.label.replace('`', "")),
                    ("variant", r.variant.clone()),
                    ("stage", r.stage.clone()),
                    ("model", r.model.clone()),
                    ("sampler", r.sampler.clone()),
                    ("verdict", r.verdict(&rn).replace('`', "")),
                    (
                        "runs",
                        r.runs
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                ];
                for (k, v) in t {
                    text.entry(k).or_default().push(v);
                }
                for (k, v) in [
                    ("clips", Some(g.clips as i64)),
                    ("frames", Some(g.frames as i64)),
                    ("resolution", Some(g.height as i64)),
                    ("nfe", r.nfe.map(|n| n as i64)),
                    ("seeds", Some(r.seeds.len() as i64)),
                ] {
                    ints.entry(k).or_default().push(v);
                }
                let mut i = 0;
                for (key, _, _) in COLUMNS {
                    let s = r.stat(key);
                    let iv = s.and_then(|s| s.interval());
                    for v in [
                        s.and_then(|s| s.mean()),
                        s.and_then(|s| s.sd()),
                        iv.map(|x| x.0),
                        iv.map(|x| x.1),
                    ] {
                        nums[i].1.push(v);
                        i += 1;
                    }
                }
            }
        }
        let mut cols: Vec<Column> = Vec::new();
        for k in [
            "kind", "label", "variant", "stage", "model", "sampler", "fast",
        ] {
            cols.push(Column::new(k.into(), text.remove(k).unwrap_or_default()));
        }
        for k in ["clips", "frames", "resolution", "nfe", "seeds"] {
            cols.push(Column::new(k.into(), ints.remove(k).unwrap_or_default()));
        }
        for (k, v) in nums {
            cols.push(Column::new(k.into(), v));
        }
        for k in ["verdict", "runs"] {
            cols.push(Column::new(k.into(), text.remove(k).unwrap_or_default()));
        }
        DataFrame::new(cols).map_err(|e| Error::Other(format!("report table: {e}")))
    }

    pub fn csv(&self) -> Result<String> {
        let mut df = self.frame()?;
        let mut buf = Vec::new();
        CsvWriter::new(&mut buf)
            .finish(&mut df)
            .map_err(|e| Error::Other(format!("report CSV: {e}")))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

fn latex_stat(s: &Stat, d: usize) -> String {
    let Some(m) = s.mean() else {
        return "--".into();
    };
    let mut out = format!("${m:.d$}");
    if let Some(sd) = s.sd() {
        out += &format!(" \\pm {sd:.d$}");
    }
    out += "$";
    if let Some((lo, hi)) = s.interval() {
        out += &format!("{{\\scriptsize\\,[{lo:.d$}, {hi:.d$}]}}");
    }
    out
}

/// Escape LaTeX's special characters in plain text.
pub fn latex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out += "\\textbackslash{}",
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out += "\\textasciitilde{}",
            '^' => out += "\\textasciicircum{}",
            '±' => out += "$\\pm$",
            '—' => out += "---",
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_aggregates_seeds_and_keeps_single_seed_intervals() {
        let mut s = Stat::default();
        s.push(Interval {
            value: 10.0,
            low: 8.0,
            high: 12.0,
        });
        assert_eq!(s.display(1), "10.0 [8.0, 12.0]");
        assert_eq!(s.sd(), None);
        s.push(Interval {
            value: 14.0,
            low: 12.0,
            high: 18.0,
        });
        assert_eq!(s.mean(), Some(12.0));
        assert!((s.sd().unwrap() - 8f64.sqrt()).abs() < 1e-12);
        assert_eq!(s.interval(), Some((10.0, 15.0)));
        // A seed without an interval: no interval is claimed for the mean.
        s.push(Interval::point(12.0));
        assert_eq!(s.interval(), None);
        assert_eq!(Stat::default().display(2), "-");
    }

    #[test]
    fn latex_escapes_specials() {
        assert_eq!(
            latex_escape("a_b & 5% #1 {x} ~^\\"),
            "a\\_b \\& 5\\% \\#1 \\{x\\} \\textasciitilde{}\\textasciicircum{}\\textbackslash{}"
        );
    }

    #[test]
    fn verdict_follows_the_interval() {
        let mut r = Row::new(RowKind::Method, "m".into(), "");
        assert_eq!(r.verdict("static"), "-");
        r.add(
            "vs_reference",
            Some(Interval {
                value: -5.0,
                low: -8.0,
                high: -1.0,
            }),
        );
        assert_eq!(r.verdict("static"), "better than static");
        let mut w = Row::new(RowKind::Method, "m".into(), "");
        w.add(
            "vs_reference",
            Some(Interval {
                value: 5.0,
                low: -1.0,
                high: 9.0,
            }),
        );
        assert_eq!(w.verdict("static"), "not distinguishable");
    }
}
