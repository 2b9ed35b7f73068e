//! Progress display: indicatif bars (one for the sweep, one for the running stage with its
//! message, rate and ETA) on a terminal; plain lines, at most one every few seconds per stage,
//! when stderr is not a terminal; nothing when quiet.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Lines,
    Quiet,
}

impl Mode {
    pub fn auto() -> Self {
        if std::io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        }
    }
}

pub struct Progress {
    mode: Mode,
    multi: MultiProgress,
    sweep: Option<ProgressBar>,
    stage: Option<ProgressBar>,
    label: String,
    stage_name: String,
    stage_start: Instant,
    /// The step the current phase started from (a resumed stage starts past 0; a stage with
    /// several phases, such as generating then scoring, counts each from 1): rates count from it.
    first_step: Option<u64>,
    last_step: u64,
    phase_start: Instant,
    last_line: Instant,
}

const LINE_EVERY: Duration = Duration::from_secs(3);

impl Progress {
    pub fn new(mode: Mode, runs: u64) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let sweep = (mode == Mode::Bars).then(|| {
            let b = multi.add(ProgressBar::new(runs));
            b.set_style(
                ProgressStyle::with_template("sweep [{bar:30.cyan/blue}] {pos}/{len} runs {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b
        });
        Progress {
            mode,
            multi,
            sweep,
            stage: None,
            label: String::new(),
            stage_name: String::new(),
            stage_start: Instant::now(),
            first_step: None,
            last_step: 0,
            phase_start: Instant::now(),
            last_line: Instant::now() - LINE_EVERY,
        }
    }

    pub fn run_start(&mut self, index: usize, total: usize, label: &str) {
        self.label = format!("run {}/{} {label}", index + 1, total);
        if let Some(b) = &self.sweep {
            b.set_message(label.to_string());
        } else if self.mode == Mode::Lines {
            eprintln!("[{}] start", self.label);
        }
    }

    pub fn run_end(&mut self, status: &str) {
        if let Some(b) = &self.sweep {
            b.inc(1);
        }
        if self.mode == Mode::Lines {
            eprintln!("[{}] {status}", self.label);
        }
    }

    pub fn stage_start(&mut self, name: &str, kind: &str) {
        self.stage_name = format!("{name} ({kind})");
        self.stage_start = Instant::now();
        self.first_step = None;
        self.last_step = 0;
        self.phase_start = self.stage_start;
        self.last_line = Instant::now() - LINE_EVERY;
        if self.mode == Mode::Bars {
            let b = self.multi.add(ProgressBar::new(0));
            b.set_style(
                ProgressStyle::with_template(
                    "  {prefix} [{bar:30.green/white}] {pos}/{len} {per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(self.stage_name.clone());
            self.stage = Some(b);
        } else if self.mode == Mode::Lines {
            eprintln!("[{}] {}: running", self.label, self.stage_name);
        }
    }

    pub fn stage_step(&mut self, step: u64, total: u64, msg: &str) {
        if let Some(b) = &self.stage {
            b.set_length(total);
            b.set_position(step);
            b.set_message(msg.to_string());
        } else if self.mode == Mode::Lines
            && (self.last_line.elapsed() >= LINE_EVERY || step == total)
        {
            self.last_line = Instant::now();
            if self.first_step.is_some() && step <= self.last_step {
                // A new phase of the stage, seen at its first printed step: rates count from
                // here (this line has none).
                self.first_step = Some(step);
                self.phase_start = Instant::now();
            }
            self.last_step = step;
            let secs = self.phase_start.elapsed().as_secs_f64().max(1e-9);
            let first = *self.first_step.get_or_insert(step.saturating_sub(1));
            let rate = step.saturating_sub(first) as f64 / secs;
            let eta = if rate > 0.0 {
                (total.saturating_sub(step)) as f64 / rate
            } else {
                0.0
            };
            let pct = if total > 0 {
                100.0 * step as f64 / total as f64
            } else {
                0.0
            };
            let speed = if rate > 0.0 {
                format!("{rate:.2} steps/s eta {eta:.0}s")
            } else {
                "- steps/s".to_string()
            };
            eprintln!(
                "[{}] {}: step {step}/{total} ({pct:.0}%) {speed} {msg}",
                self.label, self.stage_name
            );
        }
    }

    pub fn stage_end(&mut self, outcome: &str) {
        if let Some(b) = self.stage.take() {
            b.finish_and_clear();
            self.multi.remove(&b);
        }
        if self.mode != Mode::Quiet {
            self.note(&format!(
                "{}: {outcome} ({:.1}s)",
                self.stage_name,
                self.stage_start.elapsed().as_secs_f64()
            ));
        }
    }

    /// A message above the bars (or a plain line).
    pub fn note(&mut self, msg: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(format!("[{}] {msg}", self.label));
            }
            Mode::Lines => eprintln!("[{}] {msg}", self.label),
            Mode::Quiet => {}
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.sweep.take() {
            b.finish_and_clear();
        }
    }
}
