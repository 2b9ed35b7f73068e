//! Training utilities shared by the stages: the compute device, AdamW with a state that can be
//! checkpointed, an EMA of parameters, learning-rate warm-up, and clip batches as tensors.

pub mod lora;
pub mod losses;
pub mod optim;
pub mod shard;
pub mod state;

pub use optim::{AdamW, AdamWConfig, Ema};
pub use state::{Stateful, TrainState};

use crate::data::clips::ClipSet;
use crate::error::Error;
use candle_core::{DType, Device, Tensor};

pub use crate::device::{candle_device as device, cuda_compiled};

/// Converts a candle error into the library's error with context (keeping it as the source).
pub fn ce(context: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::candle(context, e)
}

/// Frames `[start, start + len)` of clips `idx` as a float tensor in [-1, 1]:
/// `[b, len, 3, h, w]`.
pub fn clip_batch(
    set: &ClipSet,
    idx: &[usize],
    start: &[usize],
    len: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (h, w) = (set.height, set.width);
    let frame = h * w * 3;
    let mut data = Vec::with_capacity(idx.len() * len * frame);
    for (&i, &s) in idx.iter().zip(start) {
        let c = set.clip(i);
        data.extend_from_slice(&c[s * frame..(s + len) * frame]);
    }
    let t = Tensor::from_vec(data, (idx.len(), len, h, w, 3), &Device::Cpu)?;
    let t = t.permute((0, 1, 4, 2, 3))?.to_dtype(DType::F32)?;
    ((t / 127.5)? - 1.0)?.to_device(device)
}

/// All frames of clip `i` as a float tensor in [-1, 1]: `[t, 3, h, w]`.
pub fn clip_frames(set: &ClipSet, i: usize, device: &Device) -> candle_core::Result<Tensor> {
    let x = clip_batch(set, &[i], &[0], set.frames, device)?;
    x.squeeze(0)
}

/// The generator of training step `step`: every step's randomness comes from (seed, step), so
/// a run resumed from a checkpoint draws exactly what an uninterrupted one would.
pub fn step_rng(seed: u64, step: u64) -> crate::diffusion::noise::NormalRng {
    crate::diffusion::noise::NormalRng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(step))
}

/// `batch` random clips of a set of `n` clips and, for each, a random start of a window of
/// `frames` frames within its `clip_frames` (indices, starts).
pub fn random_windows(
    rng: &mut crate::diffusion::noise::NormalRng,
    n: usize,
    clip_frames: usize,
    frames: usize,
    batch: usize,
) -> (Vec<usize>, Vec<usize>) {
    let idx: Vec<usize> = (0..batch)
        .map(|_| (rng.uniform() * n as f64) as usize % n)
        .collect();
    let last = clip_frames - frames;
    let starts = idx
        .iter()
        .map(|_| ((rng.uniform() * (last + 1) as f64) as usize).min(last))
        .collect();
    (idx, starts)
}

/// A float video in [-1, 1] `[t, 3, h, w]` to u8 frames `[t, h, w, 3]`.
pub fn to_u8_frames(x: &Tensor) -> candle_core::Result<Vec<u8>> {
    let x = ((x.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?;
    let x = x.permute((0, 2, 3, 1))?.to_dtype(DType::U8)?;
    x.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<u8>()
}

/// A `VarBuilder` that creates missing variables in `varmap` from a seeded generator, so a
/// model's initial weights are a function of the seed (candle's CPU generator cannot be
/// seeded). Variables are drawn in construction order; the supported initialisations are
/// those onestep's layers use (constants, uniform, normal).
pub fn seeded_varbuilder(
    varmap: &candle_nn::VarMap,
    seed: u64,
    device: &Device,
) -> candle_nn::VarBuilder<'static> {
    candle_nn::VarBuilder::from_backend(
        Box::new(SeededVars {
            map: varmap.clone(),
            rng: std::sync::Mutex::new(crate::diffusion::noise::NormalRng::new(seed)),
        }),
        DType::F32,
        device.clone(),
    )
}

struct SeededVars {
    map: candle_nn::VarMap,
    rng: std::sync::Mutex<crate::diffusion::noise::NormalRng>,
}

impl candle_nn::var_builder::SimpleBackend for SeededVars {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("{name}: shape {:?} requested, {:?} exists", s, v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let n = s.elem_count();
        let mut rng = self
            .rng
            .lock()
            .map_err(|_| candle_core::Error::Msg("generator poisoned".into()))?;
        let values: Vec<f32> = match h {
            candle_nn::Init::Const(c) => vec![c as f32; n],
            candle_nn::Init::Uniform { lo, up } => (0..n)
                .map(|_| (lo + (up - lo) * rng.uniform()) as f32)
                .collect(),
            candle_nn::Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * rng.normal()) as f32)
                .collect(),
            other => candle_core::bail!("{name}: initialisation {other:?} is not supported"),
        };
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = candle_core::Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self
            .map
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map poisoned".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("no variable `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}
