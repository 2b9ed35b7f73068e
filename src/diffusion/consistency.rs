//! The consistency-model parameterization of a student: `f(x, sigma) = c_skip(sigma) x +
//! c_out(sigma) D(x, sigma)`, where `D` is the student's EDM denoiser (the teacher's
//! architecture and preconditioning) and the scalings enforce the boundary condition
//! `f(x, sigma_min) = x` (Song et al. 2023): with `u = scale (sigma - sigma_min)`,
//! `c_skip = sigma_data^2 / (u^2 + sigma_data^2)`, `c_out = u / sqrt(u^2 + sigma_data^2)`.
//! `scale` plays the role of LCM's / AnimateLCM's `timestep_scaling` (10): it makes `f` follow
//! `D` everywhere but very close to `sigma_min`.

use super::denoiser::{Conditioning, Denoiser};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// Boundary-condition scalings of a consistency student (stored in its `onestep.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsistencyParam {
    /// Where `f(x, sigma) = x` holds exactly.
    pub sigma_min: f64,
    pub sigma_data: f64,
    /// Multiplier of `sigma - sigma_min` in the scalings (LCM's `timestep_scaling`).
    pub scale: f64,
}

impl Default for ConsistencyParam {
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_data: 0.5,
            scale: 10.0,
        }
    }
}

impl ConsistencyParam {
    /// `(c_skip, c_out)` at one sigma.
    pub fn scalings(&self, sigma: f64) -> (f64, f64) {
        let u = self.scale * (sigma - self.sigma_min);
        let sd2 = self.sigma_data * self.sigma_data;
        (sd2 / (u * u + sd2), u / (u * u + sd2).sqrt())
    }

    pub fn wrap<'a>(&'a self, inner: &'a dyn Denoiser) -> ConsistencyDenoiser<'a> {
        ConsistencyDenoiser { inner, param: self }
    }
}

/// A denoiser with the consistency boundary scalings around it.
pub struct ConsistencyDenoiser<'a> {
    pub inner: &'a dyn Denoiser,
    pub param: &'a ConsistencyParam,
}

impl Denoiser for ConsistencyDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let b = sigma.dim(0)?;
        let s: Vec<f32> = sigma.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        let (skip, out): (Vec<f32>, Vec<f32>) = s
            .iter()
            .map(|&v| {
                let (a, c) = self.param.scalings(v as f64);
                (a as f32, c as f32)
            })
            .unzip();
        let dev = x.device();
        let skip = Tensor::from_vec(skip, (b, 1, 1, 1, 1), dev)?;
        let out = Tensor::from_vec(out, (b, 1, 1, 1, 1), dev)?;
        let d = self.inner.denoise(x, sigma, cond)?;
        x.broadcast_mul(&skip)? + d.broadcast_mul(&out)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_condition_holds() {
        let p = ConsistencyParam::default();
        assert_eq!(p.scalings(p.sigma_min), (1.0, 0.0));
        let (skip, out) = p.scalings(80.0);
        assert!(skip < 1e-5 && (out - 1.0).abs() < 1e-5);
        // c_skip^2 + c_out^2 (sigma_data = 1 scaled) stays bounded and monotone.
        let mut last = 1.0;
        for s in [0.01, 0.05, 0.1, 1.0, 10.0] {
            let (k, _) = p.scalings(s);
            assert!(k < last);
            last = k;
        }
    }
}
