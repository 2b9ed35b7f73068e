//! AdamW (Loshchilov & Hutter 2019, decoupled weight decay; PyTorch's `torch.optim.AdamW`
//! update) over named variables, with its moments saved to and restored from safetensors so a
//! resumed stage continues exactly; and an exponential moving average of parameters.

use crate::error::{Error, Result};
use candle_core::{backprop::GradStore, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate after warm-up.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay (PyTorch's default 0.01).
    pub weight_decay: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Gradient clipping by global norm (0 = off).
    pub grad_clip: f64,
    /// Cosine decay after warm-up from `lr` to this learning rate at the stage's last step
    /// (nanoGPT's schedule); absent = constant after warm-up (and left out of the identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_min: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            warmup: 100,
            grad_clip: 1.0,
            lr_min: None,
        }
    }
}

impl AdamWConfig {
    /// The learning rate of update `step` (0-based) of a run of `total` updates: linear
    /// warm-up over `warmup` updates (nanoGPT's), then constant or (with `lr_min`) a cosine
    /// decay reaching `lr_min` at the last update. A function of the step alone, so a resumed
    /// stage continues the schedule.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        match self.lr_min {
            Some(min) => {
                let span = total.saturating_sub(self.warmup + 1).max(1) as f64;
                let r = ((step - self.warmup) as f64 / span).min(1.0);
                min + 0.5 * (1.0 + (std::f64::consts::PI * r).cos()) * (self.lr - min)
            }
            None => self.lr,
        }
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// One update from `grads` at learning rate `lr`; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<f64> {
        let mut sq = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        let clip = if self.cfg.grad_clip > 0.0 && norm > self.cfg.grad_clip {
            self.cfg.grad_clip / norm
        } else {
            1.0
        };
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: otherwise each moment would reference the previous one and this
            // step's backward graph, and memory would grow with every step.
            let g = (g.detach() * clip)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * self.cfg.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(norm)
    }

    /// The moments by name (`m.NAME`, `v.NAME`), for the training state.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments (`take(name)` gives each saved one) and the update count.
    pub fn set_moments(
        &mut self,
        take: &mut dyn FnMut(&str) -> Result<Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (k, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{k}.{name}");
                let t = take(&key)?;
                if t.dims() != var.dims() {
                    return Err(Error::Data(format!(
                        "training state: moment `{key}` has shape {:?}, the variable's is {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                *slot = t
                    .to_dtype(var.dtype())
                    .and_then(|t| t.to_device(var.device()))
                    .map_err(|e| Error::candle(format!("training state: `{key}`"), e))?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of parameters with the warm-up of Karras et al.'s EDM code
/// (`min(decay, (1 + step) / (10 + step))`), so early averages are not dominated by the
/// random initialisation.
pub struct Ema {
    pub decay: f64,
    pub shadow: Vec<(String, Tensor)>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> candle_core::Result<Self> {
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?.detach())))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { decay, shadow })
    }

    pub fn update(&mut self, vars: &[(String, Var)], step: u64) -> candle_core::Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for ((_, s), (_, v)) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
        }
        Ok(())
    }
}

/// Named variables of a VarMap in a stable (sorted) order.
pub fn named_vars(map: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = map.data().lock().expect("variable map poisoned");
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::AdamWConfig;

    #[test]
    fn the_cosine_schedule_warms_up_then_falls_to_lr_min_at_the_last_step() {
        let constant = AdamWConfig {
            lr: 1e-3,
            warmup: 10,
            ..Default::default()
        };
        let cosine = AdamWConfig {
            lr_min: Some(1e-5),
            ..constant.clone()
        };
        // Warm-up is the same in both; without lr_min the rate stays at lr.
        for s in 0..10 {
            assert_eq!(constant.lr_at(s, 110), cosine.lr_at(s, 110));
        }
        assert_eq!(constant.lr_at(109, 110), 1e-3);
        assert!((cosine.lr_at(10, 110) - 1e-3).abs() < 1e-12);
        assert!((cosine.lr_at(109, 110) - 1e-5).abs() < 1e-12);
        let mid = cosine.lr_at(10 + 99 / 2, 110);
        assert!((mid - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 2e-5, "{mid}");
        let rates: Vec<f64> = (10..110).map(|s| cosine.lr_at(s, 110)).collect();
        assert!(rates.windows(2).all(|w| w[1] <= w[0]));
        // Left out of the serialised config when absent: old identities do not change.
        let t = toml::Value::try_from(&constant).unwrap();
        assert!(t.get("lr_min").is_none());
        assert!(toml::Value::try_from(&cosine)
            .unwrap()
            .get("lr_min")
            .is_some());
    }
}
