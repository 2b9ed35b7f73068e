//! Deterministic Gaussian noise: one ChaCha generator per sample, seeded from the sample's own
//! seed (as EDM's `generate.py` does), so a sample is reproducible from its seed alone whatever
//! the batch it is drawn in.

use candle_core::{Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A standard normal generator (Box-Muller over ChaCha8).
pub struct NormalRng {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl NormalRng {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        self.spare = Some(r * th.sin());
        r * th.cos()
    }

    /// A tensor of standard normal values with `shape`.
    pub fn tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() as f32).collect();
        Tensor::from_vec(v, shape, device)
    }
}

/// Noise for a batch where sample `i` is drawn from its own generator seeded with `seeds[i]`.
/// `shape` is the shape of one sample.
pub fn batch_noise(seeds: &[u64], shape: &[usize], device: &Device) -> Result<Tensor> {
    let parts = seeds
        .iter()
        .map(|&s| NormalRng::new(s).tensor(shape, device))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&parts, 0)
}
