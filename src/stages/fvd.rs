//! Stage `fvd`: Fréchet video distance of a model's image-to-video generations against the
//! real test clips, with the Kinetics-400 I3D (see [`crate::metrics`]).
//!
//! For each of the first `clips` real test clips, the model (the pipeline folder of an
//! upstream `teacher` or student stage) generates a clip from that clip's own first frame with
//! the seed `run seed * 1_000_003 + clip index`; the first `frames` frames of the real and the
//! generated clips go through I3D (resized to 224x224, [-1, 1]), and the distance between
//! Gaussians fitted to their 400 logits is logged. The real clips' logits are cached in the
//! assets folder under a hash of their pixels and the preprocessing, so every method evaluated
//! on the same test set reuses them.
//!
//! Metrics (all at step 0): `fvd` (or `fvd_fast` when `fast = true`, so that quick checks never
//! land in a column of comparable values), `fvd/clips`, `fvd/frames`, `fvd/resolution` (the
//! clips' own height before resizing), `fvd/nfe` (network evaluations per generated clip),
//! `fvd/comparable` (1 only for 16 frames and not fast), and `fvd_real_halves` with
//! `fvd_real_halves/clips`: the distance between the first and second half of the real clips,
//! the floor of what any model can reach at that N.

use super::autoencoder::upstream_clips;
use super::{resolve_typed, ParamError, StageContext, StageKind};
use crate::data::ClipSet;
use crate::diffusion::SamplerConfig;
use crate::error::{Error, Result};
use crate::metrics::frechet::{frechet_distance, Gaussian};
use crate::metrics::i3d::{InceptionI3d, MIN_FRAMES, NUM_CLASSES};
use crate::metrics::{assets, preprocess, FVD_FRAMES};
use crate::pipeline::VideoPipeline;
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
        }
    }
}

pub struct FvdStage;

impl StageKind for FvdStage {
    fn name(&self) -> &'static str {
        "fvd"
    }
    fn version(&self) -> u32 {
        1
    }
    fn seeded(&self) -> bool {
        true
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

/// I3D logits of the first `frames` frames of each clip.
pub fn clip_set_logits(
    net: &InceptionI3d,
    set: &ClipSet,
    n: usize,
    frames: usize,
    mut on_clip: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let fl = set.height * set.width * 3;
    (0..n)
        .map(|i| {
            let x = preprocess(&set.clip(i)[..frames * fl], frames, set.height, set.width);
            let l = net.forward(&x, &[])?.logits;
            on_clip(i + 1);
            Ok(l)
        })
        .collect()
}

/// Cache key of real-set logits: the pixels, the clip count and length, and the network.
fn real_key(set: &ClipSet, n: usize, frames: usize) -> String {
    let mut h = Sha256::new();
    h.update(b"i3d-kinetics-400 logits; resize 224 bilinear half-pixel; [-1,1]; v1\n");
    h.update(format!("{n} {frames} {} {}\n", set.height, set.width).as_bytes());
    let fl = set.height * set.width * 3;
    for i in 0..n {
        h.update(&set.clip(i)[..frames * fl]);
    }
    hex::encode(h.finalize())
}

fn save_logits(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let data: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![rows.len(), NUM_CLASSES],
        &data,
    )
    .map_err(|e| Error::Other(e.to_string()))?;
    let bytes = safetensors::serialize([("logits", view)], &None)
        .map_err(|e| Error::Other(e.to_string()))?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    crate::util::atomic_write(path, &bytes)
}

fn load_logits(path: &Path, n: usize) -> Option<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor("logits").ok()?;
    if t.shape() != [n, NUM_CLASSES] {
        return None;
    }
    let v: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Some(v.chunks_exact(NUM_CLASSES).map(|c| c.to_vec()).collect())
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
    let t = pipe.settings.frames;
    let mut gen = ClipSet::new(t, test.height, test.width);
    let e = ce("fvd generation");
    let mut nfe = 0;
    let mut start = 0;
    while start < n {
        let idx: Vec<usize> = (start..(start + p.batch).min(n)).collect();
        let first = clip_batch(test, &idx, &vec![0; idx.len()], 1, dev)
            .and_then(|x| x.squeeze(1))
            .map_err(&e)?;
        let seeds: Vec<u64> = idx
            .iter()
            .map(|&i| ctx.seed.wrapping_mul(1_000_003).wrapping_add(i as u64))
            .collect();
        let (video, k) = pipe.generate(&first, &seeds, &opts, |_, _| {})?;
        nfe = k;
        for j in 0..idx.len() {
            let v = video.get(j).map_err(&e)?;
            gen.push(&crate::train::to_u8_frames(&v).map_err(&e)?, 0, 0);
        }
        start += idx.len();
        ctx.progress(start as u64, n as u64, &format!("{}: generating", ctx.name));
    }
    Ok((gen, nfe))
}

fn run(ctx: &mut StageContext<'_>, p: &FvdParams) -> Result<()> {
    let (_, test) = upstream_clips(ctx)?;
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
        let dir = super::consistency::model_dir(
            ctx,
            p.model.as_deref(),
            "a model to evaluate: put a `teacher` (or student) stage before it, or set model = \"static\"",
        )?;
        let pipe = VideoPipeline::load(&dir, &dev)?;
        if pipe.settings.frames < p.frames {
            return Err(Error::Data(format!(
                "stage `{}`: the model generates {} frames but frames = {}",
                ctx.name, pipe.settings.frames, p.frames
            )));
        }
        Some((pipe, dev))
    };
    let net = assets::load_i3d(&ctx.assets)?;

    // Real logits, cached by content.
    let key = real_key(&test, n, p.frames);
    let cache = ctx
        .assets
        .join("fvd")
        .join(format!("real-{key}.safetensors"));
    let real = match load_logits(&cache, n) {
        Some(l) => {
            ctx.note(&format!("real-set I3D logits from the cache ({n} clips)"));
            l
        }
        None => {
            let name = ctx.name.clone();
            let log = &mut *ctx.log;
            let l = clip_set_logits(&net, &test, n, p.frames, |i| {
                log.progress(i as u64, n as u64, &format!("{name}: I3D on real clips"))
            })?;
            save_logits(&cache, &l)?;
            l
        }
    };

    // Generations from each real clip's first frame.
    let (gen, nfe) = match &pipe {
        Some((pipe, dev)) => generate(ctx, p, pipe, dev, &test, n)?,
        None => (static_clips(&test, n), 0),
    };
    gen.save(&ctx.dir.join("generated.safetensors"))?;
    let name = ctx.name.clone();
    let fake = {
        let log = &mut *ctx.log;
        clip_set_logits(&net, &gen, n, p.frames, |i| {
            log.progress(
                i as u64,
                n as u64,
                &format!("{name}: I3D on generated clips"),
            )
        })?
    };
    save_logits(&ctx.dir.join("logits_generated.safetensors"), &fake)?;
    save_logits(&ctx.dir.join("logits_real.safetensors"), &real)?;

    let rg = Gaussian::fit(&real, "real test clips")?;
    let fg = Gaussian::fit(&fake, "generated clips")?;
    let d = frechet_distance(&rg, &fg)?;
    let key = if p.fast { "fvd_fast" } else { "fvd" };
    ctx.metric(key, 0, d)?;
    ctx.metric("fvd/clips", 0, n as f64)?;
    ctx.metric("fvd/frames", 0, p.frames as f64)?;
    ctx.metric("fvd/resolution", 0, test.height as f64)?;
    ctx.metric("fvd/nfe", 0, nfe as f64)?;
    let comparable = !p.fast && p.frames == FVD_FRAMES;
    ctx.metric("fvd/comparable", 0, if comparable { 1.0 } else { 0.0 })?;
    let half = n / 2;
    if half >= 2 {
        let a = Gaussian::fit(&real[..half], "first half of the real clips")?;
        let b = Gaussian::fit(&real[half..2 * half], "second half of the real clips")?;
        ctx.metric("fvd_real_halves", 0, frechet_distance(&a, &b)?)?;
        ctx.metric("fvd_real_halves/clips", 0, half as f64)?;
    }
    ctx.note(&format!(
        "{key} {d:.2} on {n} clips of {} frames ({}x{} resized to 224; {nfe} NFE per clip){}",
        p.frames,
        test.width,
        test.height,
        if comparable {
            ""
        } else {
            "; not comparable with published FVDs"
        }
    ));
    Ok(())
}
