//! Stage `fvd`: the image-to-video evaluation protocol (`docs/evaluation.md`): FVD with the
//! Kinetics-400 I3D, a motion-sensitive distance and first-frame fidelity, each with a
//! bootstrap interval, beside the reference rows every table needs.
//!
//! For each of the first `clips` real test clips, the model (the pipeline folder of an
//! upstream `teacher` or student stage) generates a clip from that clip's own first frame with
//! the seed `run seed * 1_000_003 + clip index`, so every method evaluated on the same test set
//! sees the same conditioning frames, N and seeds. The first `frames` frames of the real and
//! generated clips go through I3D (resized to 224x224, [-1, 1]); FVD is the Fréchet distance
//! between Gaussians fitted to their 400 logits. I3D logits are cached in the assets folder
//! under a hash of the clips' pixels and the preprocessing, so every method evaluated on the
//! same test set reuses those of the real clips and of the static baseline.
//!
//! Metrics (all at step 0; an interval is `NAME/low` and `NAME/high`, the 95 % bootstrap
//! interval over `bootstrap` resamples of the clips, see [`crate::metrics::bootstrap`]):
//! - `fvd` with its interval, `fvd/clips` (N), `fvd/frames`, `fvd/resolution` (the clips' own
//!   height before resizing), `fvd/nfe` (network evaluations per generated clip),
//!   `fvd/comparable` (1 only for 16 frames and not fast) and `fvd/resamples`;
//! - `seconds_per_clip`: wall time of the generations divided by N (clips made `batch` at a
//!   time on the run's device, conditioning encode and decoding included; 0 for static);
//! - `motion_fd` with its interval: the Fréchet distance of frame-difference features across
//!   lags and scales ([`crate::metrics::motion`]), which sees temporal order and speed;
//!   `motion_mean` and `motion_mean_real`, the mean lag-1 luma difference of the generated and
//!   real clips;
//! - `first_frame_psnr` and `first_frame_ssim` with intervals: generated frame 0 against the
//!   conditioning frame;
//! - reference rows (`references = true`): `fvd_floor` / `motion_fd_floor` (first half of the
//!   real clips against the second half, N/2 each: how far two real sets of different scenes
//!   are at that size; not a lower bound for a paired evaluation, where a method that keeps the
//!   conditioning scenes can go below it),
//!   `fvd_static` / `motion_fd_static` (each clip's first frame repeated, the trivial
//!   image-to-video baseline, same N), and the paired differences `fvd_vs_static` /
//!   `motion_fd_vs_static` (method minus static on the same clips, negative is better) with
//!   `beats_static`: 1 when the FVD difference's interval lies below 0, else 0 (the report
//!   flags the others);
//! - the autoencoder's ceiling (`references = true`, for a model): the same real clips encoded
//!   by the model's VAE (posterior mean) and decoded as generations are, scored like a method:
//!   `fvd_ceiling` / `motion_fd_ceiling` / `motion_mean_ceiling`, `ceiling_psnr` (all frames
//!   the FVD sees), `ceiling_first_frame_psnr` / `ceiling_first_frame_ssim`, with intervals;
//!   `fvd_ceiling_vs_static` (ceiling minus static) and `fvd_vs_ceiling` (method minus
//!   ceiling: the part of the gap that is the latent model's, not the autoencoder's). No latent
//!   model can beat its autoencoder's reconstructions, so this row says how much room there is.
//!
//! `fast = true` adds `_fast` to the first segment of every key (`fvd_fast`, `motion_fd_fast`,
//! `fvd_fast/low`, ...), so quick checks never land in a column of comparable values.
//! Per-clip features go to `features.safetensors` (the report's paired comparisons between
//! methods read them) and the generated clips to `generated.safetensors`.

use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::data::ClipSet;
use crate::device::Precision;
use crate::diffusion::SamplerConfig;
use crate::error::{Error, Result};
use crate::metrics::bootstrap::{self, Interval, DEFAULT_RESAMPLES};
use crate::metrics::i3d::MIN_FRAMES;
use crate::metrics::{assets, fidelity, motion, preprocess, I3dRunner, FVD_FRAMES};
use crate::pipeline::{LoadOptions, VideoPipeline};
use crate::train::shard::Shards;
use crate::train::{ce, clip_batch, device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Parameters of the `fvd` stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FvdParams {
    /// Name of the upstream stage whose model folder generates (default: the nearest upstream
    /// stage that wrote one), or `"static"`: the trivial image-to-video baseline that repeats
    /// the conditioning frame (no model needed).
    pub model: Option<String>,
    /// Real test clips evaluated, each generated from its own first frame (0 = all).
    pub clips: usize,
    /// Frames per clip given to I3D: 16 by the FVD convention, at least 9. Real and generated
    /// clips must have at least this many.
    pub frames: usize,
    /// Sampler of the generations (default: the one stored with the model).
    pub sampler: Option<SamplerConfig>,
    /// Clips generated per batch.
    pub batch: usize,
    /// A quick check (few clips): logged as `fvd_fast`, never as `fvd`.
    pub fast: bool,
    /// Bootstrap resamples of every interval (0 = point values only).
    pub bootstrap: usize,
    /// Also compute the reference rows: the real-vs-real floor, the static baseline and (for a
    /// model) its autoencoder's ceiling.
    pub references: bool,
    /// Dtype the evaluated model's UNet and image encoder compute in
    /// ([`crate::device::Precision`]): f32 (default, left out of the identity), bf16 or f16.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub dtype: Precision,
}

impl Default for FvdParams {
    fn default() -> Self {
        Self {
            model: None,
            clips: 0,
            frames: FVD_FRAMES,
            sampler: None,
            batch: 8,
            fast: false,
            bootstrap: DEFAULT_RESAMPLES,
            references: true,
            dtype: Precision::F32,
        }
    }
}

pub struct FvdStage;

impl StageKind for FvdStage {
    fn name(&self) -> &'static str {
        "fvd"
    }
    fn version(&self) -> u32 {
        3
    }
    fn seeded(&self) -> bool {
        true
    }
    fn takes_dtype(&self) -> bool {
        true
    }
    /// Stages scoring a multistep consistency sampler are marked with the sampler's noise
    /// levels: they changed (`diffusion::sampler::consistency_sigmas`, 2026-12-07; before, the
    /// last step sat at sigma_min and changed nothing) while every other `fvd` stage's output
    /// did not, so only those get new identities and are computed again. A stage without its
    /// own `sampler` uses the model's stored one, which the plan cannot see: every stored
    /// student sampler of this project is 1-step or Time-Travel.
    fn fingerprint(&self, params: &toml::Value) -> Result<Option<String>> {
        let Some(sampler) = params.get("sampler") else {
            return Ok(None);
        };
        let method = sampler.get("method").and_then(|m| m.as_str());
        let steps = sampler
            .get("steps")
            .and_then(|s| s.as_integer())
            .unwrap_or(1);
        Ok((method == Some("consistency") && steps > 1).then(|| {
            "consistency sampler: the first `steps` sigmas of karras(steps + 1)".to_string()
        }))
    }
    fn references(&self, params: &toml::Value) -> Vec<(&'static str, String)> {
        super::string_params(params, &["model"])
            .into_iter()
            .filter(|(_, m)| m != STATIC)
            .collect()
    }
    fn resolve(&self, params: toml::Value) -> std::result::Result<toml::Value, ParamError> {
        let (p, v) = resolve_typed::<FvdParams>(params)?;
        if p.frames < MIN_FRAMES {
            return Err(ParamError {
                path: "frames".into(),
                message: format!(
                    "is {}; the I3D network needs at least {MIN_FRAMES} frames (16 by the FVD convention)",
                    p.frames
                ),
            });
        }
        if p.batch == 0 {
            return Err(ParamError {
                path: "batch".into(),
                message: "must be at least 1".into(),
            });
        }
        Ok(v)
    }
    fn run(&self, ctx: &mut StageContext<'_>) -> Result<()> {
        let p: FvdParams = ctx.params()?;
        run(ctx, &p)
    }
}

/// I3D logits of the first `frames` frames of each clip, `net.batch()` clips at a time.
pub fn clip_set_logits(
    net: &I3dRunner,
    set: &ClipSet,
    n: usize,
    frames: usize,
    mut on_clip: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let fl = set.height * set.width * 3;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(net.batch()) {
        let end = (start + net.batch()).min(n);
        let clips: Vec<_> = (start..end)
            .map(|i| preprocess(&set.clip(i)[..frames * fl], frames, set.height, set.width))
            .collect();
        out.extend(net.logits(&clips)?);
        on_clip(end);
    }
    Ok(out)
}

/// Cache key of real-set logits: the pixels, the clip count and length, and the network.
fn logits_key(set: &ClipSet, n: usize, frames: usize) -> String {
    let mut h = Sha256::new();
    h.update(b"i3d-kinetics-400 logits; resize 224 bilinear half-pixel; [-1,1]; v1\n");
    h.update(format!("{n} {frames} {} {}\n", set.height, set.width).as_bytes());
    let fl = set.height * set.width * 3;
    for i in 0..n {
        h.update(&set.clip(i)[..frames * fl]);
    }
    hex::encode(h.finalize())
}

/// Write named `[rows, cols]` f32 matrices (one row per clip) as safetensors.
pub fn save_rows(path: &Path, sets: &[(&str, &[Vec<f32>])]) -> Result<()> {
    let datas: Vec<(String, Vec<usize>, Vec<u8>)> = sets
        .iter()
        .map(|(name, rows)| {
            let cols = rows.first().map_or(0, |r| r.len());
            let data: Vec<u8> = rows
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            (name.to_string(), vec![rows.len(), cols], data)
        })
        .collect();
    let views = datas
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Other(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, &None).map_err(|e| Error::Other(e.to_string()))?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    crate::util::atomic_write(path, &bytes)
}

/// Read the matrix `name` written by [`save_rows`]; `None` if the file or tensor is missing
/// or has another number of rows than `n` (when given).
pub fn load_rows(path: &Path, name: &str, n: Option<usize>) -> Option<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor(name).ok()?;
    let (rows, cols) = match t.shape() {
        [r, c] => (*r, *c),
        _ => return None,
    };
    if n.is_some_and(|n| n != rows) || t.dtype() != safetensors::Dtype::F32 {
        return None;
    }
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Some(
        v.chunks_exact(cols.max(1))
            .take(rows)
            .map(|c| c.to_vec())
            .collect(),
    )
}

/// `model = "static"`: each clip is its first frame repeated.
pub const STATIC: &str = "static";

fn static_clips(test: &ClipSet, n: usize) -> ClipSet {
    let fl = test.height * test.width * 3;
    let mut out = ClipSet::new(test.frames, test.height, test.width);
    for i in 0..n {
        let first = &test.clip(i)[..fl];
        out.push(&first.repeat(test.frames), 0, 0);
    }
    out
}

/// A clip set made `batch` test clips at a time: `make` gets the clips' indices and returns
/// them as `[b, frames, 3, H, W]` in [-1, 1]; progress is reported as `what`.
fn in_batches(
    ctx: &mut StageContext<'_>,
    batch: usize,
    n: usize,
    (frames, h, w): (usize, usize, usize),
    what: &str,
    mut make: impl FnMut(&[usize]) -> Result<candle_core::Tensor>,
) -> Result<ClipSet> {
    let mut out = ClipSet::new(frames, h, w);
    let e = ce(what);
    let mut start = 0;
    while start < n {
        let idx: Vec<usize> = (start..(start + batch).min(n)).collect();
        let clips = make(&idx)?;
        for j in 0..idx.len() {
            let v = clips.get(j).map_err(&e)?;
            out.push(&crate::train::to_u8_frames(&v).map_err(&e)?, 0, 0);
        }
        start += idx.len();
        ctx.progress(start as u64, n as u64, &format!("{}: {what}", ctx.name));
    }
    Ok(out)
}

/// Each of the first `n` test clips generated from its own first frame; with the network
/// evaluations per clip.
fn generate(
    ctx: &mut StageContext<'_>,
    p: &FvdParams,
    pipe: &VideoPipeline,
    dev: &candle_core::Device,
    test: &ClipSet,
    n: usize,
) -> Result<(ClipSet, usize)> {
    let mut opts = pipe.default_options();
    if let Some(s) = &p.sampler {
        opts.sampler = s.clone();
    }
    let e = ce("fvd generation");
    let seed = ctx.seed;
    let mut nfe = 0;
    let size = (pipe.settings.frames, test.height, test.width);
    // Each clip's noise comes from its own seed, so a batch split into shards side by side
    // (`train::shard`) makes the same clips.
    let shards = Shards::new(p.batch).map_err(&e)?;
    let gen = in_batches(ctx, p.batch, n, size, "generating", |idx| {
        let first = clip_batch(test, idx, &vec![0; idx.len()], 1, dev)
            .and_then(|x| x.squeeze(1))
            .map_err(&e)?;
        let seeds: Vec<u64> = idx
            .iter()
            .map(|&i| seed.wrapping_mul(1_000_003).wrapping_add(i as u64))
            .collect();
        let parts = shards.map(idx.len(), |r| {
            let first = first.narrow(0, r.start, r.len()).map_err(&e)?;
            pipe.generate(&first, &seeds[r], &opts, |_, _| {})
        })?;
        nfe = parts[0].1;
        let videos: Vec<_> = parts.into_iter().map(|(v, _)| v).collect();
        candle_core::Tensor::cat(&videos, 0).map_err(&e)
    })?;
    Ok((gen, nfe))
}

/// The first `frames` frames of the first `n` real test clips through the model's autoencoder
/// alone (posterior mean, decoded as generations are): the ceiling row.
fn reconstructions(
    ctx: &mut StageContext<'_>,
    p: &FvdParams,
    pipe: &VideoPipeline,
    dev: &candle_core::Device,
    test: &ClipSet,
    n: usize,
    frames: usize,
) -> Result<ClipSet> {
    let chunk = pipe.default_options().decode_chunk_size;
    let e = ce("fvd ceiling: autoencoder reconstruction");
    let shards = Shards::new(p.batch).map_err(&e)?;
    let size = (frames, test.height, test.width);
    in_batches(
        ctx,
        p.batch,
        n,
        size,
        "autoencoder reconstructions",
        |idx| {
            let x = clip_batch(test, idx, &vec![0; idx.len()], frames, dev).map_err(&e)?;
            shards
                .cat(idx.len(), |r| {
                    pipe.reconstruct(&x.narrow(0, r.start, r.len())?, chunk)
                })
                .map_err(&e)
        },
    )
}

/// Seed of every bootstrap: fixed, so that the same sets always give the same interval.
const BOOTSTRAP_SEED: u64 = 0x5eed;

/// I3D logits of a clip set, from the assets cache when the same pixels were scored before.
fn cached_logits(
    ctx: &mut StageContext<'_>,
    net: &I3dRunner,
    set: &ClipSet,
    n: usize,
    frames: usize,
    what: &str,
) -> Result<Vec<Vec<f32>>> {
    let key = logits_key(set, n, frames);
    let cache = ctx
        .assets
        .join("fvd")
        .join(format!("i3d-{key}.safetensors"));
    if let Some(l) = load_rows(&cache, "logits", Some(n)) {
        ctx.note(&format!(
            "I3D logits of the {what} from the cache ({n} clips)"
        ));
        return Ok(l);
    }
    let name = ctx.name.clone();
    let log = &mut *ctx.log;
    let l = clip_set_logits(net, set, n, frames, |i| {
        log.progress(i as u64, n as u64, &format!("{name}: I3D on the {what}"))
    })?;
    save_rows(&cache, &[("logits", &l)])?;
    Ok(l)
}

/// Motion features of the first `frames` frames of the first `n` clips.
fn motion_rows(set: &ClipSet, n: usize, frames: usize) -> Vec<Vec<f32>> {
    let fl = set.height * set.width * 3;
    (0..n)
        .map(|i| {
            motion::motion_features(&set.clip(i)[..frames * fl], frames, set.height, set.width)
        })
        .collect()
}

/// `score` of the first `len` bytes of each of the first `n` clips of `set` against the same
/// real clip (`len` = one frame for first-frame fidelity, more for whole clips).
fn paired_scores(
    real: &ClipSet,
    set: &ClipSet,
    n: usize,
    len: usize,
    score: impl Fn(&[u8], &[u8]) -> f64,
) -> Vec<f64> {
    (0..n)
        .map(|i| score(&real.clip(i)[..len], &set.clip(i)[..len]))
        .collect()
}

/// A metric key, with `_fast` added to its first segment for quick checks.
pub fn key(fast: bool, base: &str) -> String {
    match (fast, base.split_once('/')) {
        (false, _) => base.to_string(),
        (true, Some((a, b))) => format!("{a}_fast/{b}"),
        (true, None) => format!("{base}_fast"),
    }
}

/// Log `name` and, when it has one, its interval as `name/low` and `name/high`.
fn log_interval(ctx: &mut StageContext<'_>, fast: bool, name: &str, iv: Interval) -> Result<()> {
    ctx.metric(&key(fast, name), 0, iv.value)?;
    if iv.has_interval() {
        ctx.metric(&key(fast, &format!("{name}/low")), 0, iv.low)?;
        ctx.metric(&key(fast, &format!("{name}/high")), 0, iv.high)?;
    }
    Ok(())
}

fn run(ctx: &mut StageContext<'_>, p: &FvdParams) -> Result<()> {
    let test = ctx.data()?.test;
    let n = if p.clips == 0 {
        test.len()
    } else {
        p.clips.min(test.len())
    };
    if p.clips > test.len() {
        ctx.note(&format!(
            "clips = {} but the test set has {}; using {n}",
            p.clips,
            test.len()
        ));
    }
    if n < 2 {
        return Err(Error::Data(format!(
            "stage `{}`: {n} real test clip(s); FVD needs at least 2 (and several hundred for a \
             value comparable with published ones)",
            ctx.name
        )));
    }
    if test.frames < p.frames {
        return Err(Error::Data(format!(
            "stage `{}`: the test clips have {} frames but frames = {}; make the data stage's clips longer or lower `frames` (at least {MIN_FRAMES})",
            ctx.name, test.frames, p.frames
        )));
    }
    let is_static = p.model.as_deref() == Some(STATIC);
    let pipe = if is_static {
        None
    } else {
        let dev = device(ctx.device)?;
        let dir = ctx.model_dir(
            p.model.as_deref(),
            "a model to evaluate: put a `teacher` (or student) stage before it, or set model = \"static\"",
        )?;
        let pipe = VideoPipeline::load_with(&dir, &dev, &LoadOptions::precision(p.dtype))?;
        if pipe.settings.frames < p.frames {
            return Err(Error::Data(format!(
                "stage `{}`: the model generates {} frames but frames = {}",
                ctx.name, pipe.settings.frames, p.frames
            )));
        }
        let label = ctx
            .upstream
            .iter()
            .find(|u| u.dir == dir)
            .map_or_else(|| dir.display().to_string(), |u| u.name.clone());
        Some((pipe, dev, label))
    };
    // I3D runs where the run does: its own kernels on the CPU, candle's on CUDA.
    let net = I3dRunner::on(assets::load_i3d(&ctx.assets)?, &device(ctx.device)?)?;
    let (f, fast, b) = (p.frames, p.fast, p.bootstrap);
    let (h, w) = (test.height, test.width);
    let fl = h * w * 3;

    let real_logits = cached_logits(ctx, &net, &test, n, f, "real test clips")?;
    let real_motion = motion_rows(&test, n, f);
    let still = static_clips(&test, n);

    // Generations from each real clip's first frame.
    let t0 = std::time::Instant::now();
    let (gen, nfe) = match &pipe {
        Some((pipe, dev, _)) => generate(ctx, p, pipe, dev, &test, n)?,
        None => (still.clone(), 0),
    };
    let seconds_per_clip = t0.elapsed().as_secs_f64() / n.max(1) as f64;
    gen.save(&ctx.dir.join("generated.safetensors"))?;
    // A model's generations are scored once and kept in this stage's features file; only the
    // real and static sets, shared by every method, go to the assets cache.
    let gen_logits = if is_static {
        cached_logits(ctx, &net, &gen, n, f, "static baseline clips")?
    } else {
        let name = ctx.name.clone();
        let log = &mut *ctx.log;
        clip_set_logits(&net, &gen, n, f, |i| {
            log.progress(
                i as u64,
                n as u64,
                &format!("{name}: I3D on the generated clips"),
            )
        })?
    };
    let gen_motion = motion_rows(&gen, n, f);
    let psnr = paired_scores(&test, &gen, n, fl, fidelity::psnr);
    let with_ssim = h > 10 && w > 10;
    let ssim: Vec<f64> = if with_ssim {
        paired_scores(&test, &gen, n, fl, |a, b| fidelity::ssim(a, b, h, w))
    } else {
        ctx.note("frames under 11x11 pixels: no SSIM (its window is 11 pixels)");
        Vec::new()
    };

    ctx.note(&format!(
        "bootstrap intervals ({b} resamples of the {n} clips)"
    ));
    // Each set's distances to the real clips on every resample, computed once and shared by its
    // distance and the paired differences it takes part in (same resamples: same seed and N).
    let draws = |x: &[Vec<f32>], y: &[Vec<f32>]| bootstrap::paired_draws(x, y, b, BOOTSTRAP_SEED);
    let gen_draws = draws(&real_logits, &gen_logits)?;
    let fvd = gen_draws.distance();
    log_interval(ctx, fast, "fvd", fvd)?;
    ctx.metric(&key(fast, "fvd/clips"), 0, n as f64)?;
    ctx.metric(&key(fast, "fvd/frames"), 0, f as f64)?;
    ctx.metric(&key(fast, "fvd/resolution"), 0, h as f64)?;
    ctx.metric(&key(fast, "fvd/nfe"), 0, nfe as f64)?;
    ctx.metric(&key(fast, "seconds_per_clip"), 0, seconds_per_clip)?;
    ctx.metric(&key(fast, "fvd/resamples"), 0, b as f64)?;
    let comparable = !fast && f == FVD_FRAMES;
    ctx.metric(
        &key(fast, "fvd/comparable"),
        0,
        if comparable { 1.0 } else { 0.0 },
    )?;
    let gen_mdraws = draws(&real_motion, &gen_motion)?;
    let mfd = gen_mdraws.distance();
    log_interval(ctx, fast, "motion_fd", mfd)?;
    let mean_of = |rows: &[Vec<f32>]| {
        rows.iter().map(|r| motion::mean_motion(r)).sum::<f64>() / rows.len() as f64
    };
    ctx.metric(&key(fast, "motion_mean"), 0, mean_of(&gen_motion))?;
    ctx.metric(&key(fast, "motion_mean_real"), 0, mean_of(&real_motion))?;
    let ps = bootstrap::mean(&psnr, b, BOOTSTRAP_SEED)?;
    log_interval(ctx, fast, "first_frame_psnr", ps)?;
    if with_ssim {
        let ss = bootstrap::mean(&ssim, b, BOOTSTRAP_SEED)?;
        log_interval(ctx, fast, "first_frame_ssim", ss)?;
    }

    let first_frame: Vec<Vec<f32>> = (0..n)
        .map(|i| vec![psnr[i] as f32, ssim.get(i).map_or(f32::NAN, |v| *v as f32)])
        .collect();
    let mut statics = None;
    let mut ceiling = None;

    let mut summary = format!("{} {:.2}", key(fast, "fvd"), fvd.value);
    if p.references {
        let half = n / 2;
        if half >= 2 {
            let (a, z) = (&real_logits[..half], &real_logits[half..2 * half]);
            let floor = bootstrap::unpaired_distance(a, z, b, BOOTSTRAP_SEED)?;
            log_interval(ctx, fast, "fvd_floor", floor)?;
            ctx.metric(&key(fast, "fvd_floor/clips"), 0, half as f64)?;
            let (a, z) = (&real_motion[..half], &real_motion[half..2 * half]);
            let mfloor = bootstrap::unpaired_distance(a, z, b, BOOTSTRAP_SEED)?;
            log_interval(ctx, fast, "motion_fd_floor", mfloor)?;
            summary += &format!(", floor {:.2} (N/2 = {half})", floor.value);
        }
        let (st_logits, st_motion) = if is_static {
            (gen_logits.clone(), gen_motion.clone())
        } else {
            (
                cached_logits(ctx, &net, &still, n, f, "static baseline clips")?,
                motion_rows(&still, n, f),
            )
        };
        let (st_draws, st_mdraws) = if is_static {
            (gen_draws.clone(), gen_mdraws.clone())
        } else {
            (
                draws(&real_logits, &st_logits)?,
                draws(&real_motion, &st_motion)?,
            )
        };
        let fs = st_draws.distance();
        log_interval(ctx, fast, "fvd_static", fs)?;
        log_interval(ctx, fast, "motion_fd_static", st_mdraws.distance())?;
        summary += &format!(", static {:.2}", fs.value);
        if !is_static {
            let d = gen_draws.minus(&st_draws);
            log_interval(ctx, fast, "fvd_vs_static", d)?;
            let beats = d.has_interval() && d.high < 0.0;
            ctx.metric(&key(fast, "beats_static"), 0, if beats { 1.0 } else { 0.0 })?;
            let dm = gen_mdraws.minus(&st_mdraws);
            log_interval(ctx, fast, "motion_fd_vs_static", dm)?;
            if !beats {
                ctx.note(&format!(
                    "this model does not beat the static baseline in FVD at N = {n}: \
                     difference {}",
                    d.display(2)
                ));
            }
        }
        if let Some((pipe, dev, _)) = &pipe {
            let t = pipe.settings.frames.min(test.frames);
            let recon = reconstructions(ctx, p, pipe, dev, &test, n, t)?;
            let c_logits = cached_logits(ctx, &net, &recon, n, f, "autoencoder reconstructions")?;
            let c_motion = motion_rows(&recon, n, f);
            let c_draws = draws(&real_logits, &c_logits)?;
            let fc = c_draws.distance();
            log_interval(ctx, fast, "fvd_ceiling", fc)?;
            let mc = draws(&real_motion, &c_motion)?.distance();
            log_interval(ctx, fast, "motion_fd_ceiling", mc)?;
            ctx.metric(&key(fast, "motion_mean_ceiling"), 0, mean_of(&c_motion))?;
            let clip_psnr = paired_scores(&test, &recon, n, f * fl, fidelity::psnr);
            log_interval(
                ctx,
                fast,
                "ceiling_psnr",
                bootstrap::mean(&clip_psnr, b, BOOTSTRAP_SEED)?,
            )?;
            let ff = paired_scores(&test, &recon, n, fl, fidelity::psnr);
            log_interval(
                ctx,
                fast,
                "ceiling_first_frame_psnr",
                bootstrap::mean(&ff, b, BOOTSTRAP_SEED)?,
            )?;
            if with_ssim {
                let ss = paired_scores(&test, &recon, n, fl, |a, b| fidelity::ssim(a, b, h, w));
                log_interval(
                    ctx,
                    fast,
                    "ceiling_first_frame_ssim",
                    bootstrap::mean(&ss, b, BOOTSTRAP_SEED)?,
                )?;
            }
            log_interval(ctx, fast, "fvd_ceiling_vs_static", c_draws.minus(&st_draws))?;
            log_interval(ctx, fast, "fvd_vs_ceiling", gen_draws.minus(&c_draws))?;
            summary += &format!(", autoencoder ceiling {:.2}", fc.value);
            ceiling = Some((c_logits, c_motion));
        }
        statics = Some((st_logits, st_motion));
    }
    let record = Evaluation {
        model: pipe
            .as_ref()
            .map_or_else(|| STATIC.to_string(), |(_, _, l)| l.clone()),
        sampler: pipe.as_ref().map(|(pipe, _, _)| {
            p.sampler
                .clone()
                .unwrap_or_else(|| pipe.default_options().sampler)
        }),
        nfe,
        clips: n,
        frames: f,
        height: h,
        width: w,
        resamples: b,
        fast,
    };
    crate::util::atomic_write(
        &ctx.dir.join(EVALUATION_FILE),
        &serde_json::to_vec_pretty(&record).map_err(|e| Error::Other(e.to_string()))?,
    )?;
    let mut saved: Vec<(&str, &[Vec<f32>])> = vec![
        ("real_logits", &real_logits),
        ("real_motion", &real_motion),
        ("gen_logits", &gen_logits),
        ("gen_motion", &gen_motion),
        ("first_frame_psnr_ssim", &first_frame),
    ];
    if let Some((l, m)) = &statics {
        saved.push(("static_logits", l));
        saved.push(("static_motion", m));
    }
    if let Some((l, m)) = &ceiling {
        saved.push(("ceiling_logits", l));
        saved.push(("ceiling_motion", m));
    }
    save_rows(&ctx.dir.join(FEATURES_FILE), &saved)?;
    ctx.note(&format!(
        "{summary} on {n} clips of {f} frames ({w}x{h} resized to 224; {nfe} NFE per clip); \
         motion_fd {:.3}{}",
        mfd.value,
        if comparable {
            ""
        } else {
            "; not comparable with published FVDs"
        }
    ));
    Ok(())
}

/// Per-clip features of an `fvd` stage, in its folder.
pub const FEATURES_FILE: &str = "features.safetensors";

/// What an `fvd` stage evaluated, in its folder (`evaluation.json`), for the report.
pub const EVALUATION_FILE: &str = "evaluation.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// The evaluated model stage, or "static".
    pub model: String,
    pub sampler: Option<SamplerConfig>,
    pub nfe: usize,
    pub clips: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
    pub resamples: usize,
    pub fast: bool,
}
