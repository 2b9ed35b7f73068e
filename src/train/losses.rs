//! Losses of the distillation and adversarial stages, on per-sample logits / tensors.
//!
//! - [`distance`]: per-sample consistency distance, pseudo-Huber `sqrt((x - y)^2 + c^2) - c`
//!   averaged over elements (as AnimateLCM's and LCM's training code compute it), or the mean
//!   squared error.
//! - Hinge GAN losses (OSV): discriminator `ReLU(1 - D(real)) + ReLU(1 + D(fake))`, generator
//!   `ReLU(1 - D(fake))` (the paper's generator term; the common form `-D(fake)` has the same
//!   gradient wherever `D(fake) < 1`).
//! - Non-saturating losses: discriminator `softplus(-D(real)) + softplus(D(fake))`, generator
//!   `softplus(-D(fake))`.
//!
//! Logits come as a list of heads, each `[b, n]`; every loss is the mean over a head's
//! positions and samples, averaged over heads, so its scale does not depend on how many heads a
//! discriminator has.

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Distance {
    Huber,
    L2,
}

/// Per-sample distance `[b]` between two `[b, ...]` tensors.
pub fn distance(x: &Tensor, y: &Tensor, kind: Distance, huber_c: f64) -> Result<Tensor> {
    let d = (x - y)?;
    let e = match kind {
        Distance::Huber => ((d.sqr()? + huber_c * huber_c)?.sqrt()? - huber_c)?,
        Distance::L2 => d.sqr()?,
    };
    e.flatten_from(1)?.mean(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GanLoss {
    Hinge,
    NonSaturating,
}

fn softplus(x: &Tensor) -> Result<Tensor> {
    // log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

fn mean_over_heads(heads: &[Tensor], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let n = heads.len() as f64;
    let mut total: Option<Tensor> = None;
    for h in heads {
        let v = f(h)?.mean_all()?;
        total = Some(match total {
            None => v,
            Some(t) => (t + v)?,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("no discriminator heads".into()))? / n
}

/// Discriminator loss on real and fake logits.
pub fn d_loss(real: &[Tensor], fake: &[Tensor], kind: GanLoss) -> Result<Tensor> {
    match kind {
        GanLoss::Hinge => {
            mean_over_heads(real, |r| (1.0 - r)?.relu())?
                + mean_over_heads(fake, |f| (f + 1.0)?.relu())?
        }
        GanLoss::NonSaturating => {
            mean_over_heads(real, |r| softplus(&r.neg()?))? + mean_over_heads(fake, softplus)?
        }
    }
}

/// Generator loss on fake logits.
pub fn g_loss(fake: &[Tensor], kind: GanLoss) -> Result<Tensor> {
    match kind {
        GanLoss::Hinge => mean_over_heads(fake, |f| (1.0 - f)?.relu()),
        GanLoss::NonSaturating => mean_over_heads(fake, |f| softplus(&f.neg()?)),
    }
}

/// The approximated R1 penalty: mean squared difference between the logits of real samples
/// and of slightly perturbed real samples, averaged over heads.
pub fn approx_r1(real: &[Tensor], perturbed: &[Tensor]) -> Result<Tensor> {
    let diffs = real
        .iter()
        .zip(perturbed)
        .map(|(a, b)| a - b)
        .collect::<Result<Vec<_>>>()?;
    mean_over_heads(&diffs, |d| d.sqr())
}

/// Mean logit over all heads (a training diagnostic).
pub fn mean_logit(heads: &[Tensor]) -> Result<f64> {
    Ok(mean_over_heads(heads, |h| Ok(h.clone()))?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }
    fn s(x: Tensor) -> f32 {
        x.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn distances_by_hand() {
        let x = t(&[0.0, 3.0, 1.0, 1.0], (2, 2));
        let y = t(&[4.0, 3.0, 1.0, 0.0], (2, 2));
        // pseudo-Huber with c = 3: sample 0: (sqrt(16+9)-3 + 0)/2 = 1; sample 1: (0 + sqrt(1+9)-3)/2
        let h = distance(&x, &y, Distance::Huber, 3.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((h[0] - 1.0).abs() < 1e-6);
        assert!((h[1] - (10f32.sqrt() - 3.0) / 2.0).abs() < 1e-6);
        let l = distance(&x, &y, Distance::L2, 0.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(l, vec![8.0, 0.5]);
    }

    #[test]
    fn gan_losses_by_hand() {
        // Two heads; head means are averaged.
        let real = [t(&[2.0, 0.5], (2, 1)), t(&[-1.0, 1.0], (1, 2))];
        let fake = [t(&[-2.0, 0.0], (2, 1)), t(&[0.5, -0.5], (1, 2))];
        // hinge D: real: head0 mean(relu(1-2), relu(0.5)) = 0.25; head1 mean(2, 0) = 1 -> 0.625
        //          fake: head0 mean(relu(-1), relu(1)) = 0.5; head1 mean(1.5, 0.5) = 1 -> 0.75
        assert!((s(d_loss(&real, &fake, GanLoss::Hinge).unwrap()) - 1.375).abs() < 1e-6);
        // hinge G: head0 mean(3, 1) = 2; head1 mean(0.5, 1.5) = 1 -> 1.5
        assert!((s(g_loss(&fake, GanLoss::Hinge).unwrap()) - 1.5).abs() < 1e-6);
        // non-saturating G on a single logit 0: softplus(0) = ln 2
        let z = [t(&[0.0], (1, 1))];
        assert!((s(g_loss(&z, GanLoss::NonSaturating).unwrap()) - 2f32.ln()).abs() < 1e-6);
        // non-saturating D at large margins is ~0, and softplus is stable for big inputs
        let r = [t(&[50.0], (1, 1))];
        let f = [t(&[-50.0], (1, 1))];
        assert!(s(d_loss(&r, &f, GanLoss::NonSaturating).unwrap()) < 1e-6);
        let big = [t(&[100.0], (1, 1))];
        assert!(
            (s(g_loss(
                &big.iter().map(|x| x.neg().unwrap()).collect::<Vec<_>>(),
                GanLoss::NonSaturating
            )
            .unwrap())
                - 100.0)
                .abs()
                < 1e-3
        );
        assert!((mean_logit(&real).unwrap() - 0.625).abs() < 1e-6);
    }
}
