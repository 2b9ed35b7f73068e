//! Data-parallel training steps on the CPU: a batch split into shards, each shard's forward and
//! backward pass on a core of its own, the gradients summed.
//!
//! At toy sizes most of candle's CPU ops are too small to split well between two threads: a
//! `perf` profile of the toy16 teacher step (4 clips x 16 frames x 8x8 latents) spent about a
//! quarter of its samples in idle or spinning rayon workers, one core waiting while the other
//! ran an op that candle does not parallelise or the tail of a small one (results/README.md,
//! issue 13). Running whole shards of the batch side by side, each single-threaded, keeps both
//! cores busy and puts one join per step in place of one per op.
//!
//! The result is the full batch's loss and gradient up to float rounding: each shard's loss
//! is weighted by its share of the batch before its backward pass (the losses are means over
//! the batch's samples), and [`GradStore::extend`] adds the shards' gradients. Nothing in a
//! batch may couple its samples (no batch norm: the models here use group and layer norms).
//! `ONESTEP_SHARDS=1` turns it off; the default is one shard per rayon thread, at most one per
//! sample. The same split serves batches made without gradients ([`Shards::cat`]: the FVD
//! stage's generations).
//!
//! Candle runs large element-wise ops on a global pool of its own, which serialises concurrent
//! callers; so while sharding is on, [`crate::alloc::tune_for_tensors`] leaves that pool at one
//! thread (`CANDLE_NUM_THREADS=1` unless set). That alone made the toy16 sampler faster too
//! (its ops are too small for the pool's spin-and-wake to pay).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

/// What went wrong in [`Shards::run`] itself (a shard's thread panicked, more items than
/// shards), in the caller's error type.
#[derive(Debug)]
pub struct ShardError(pub String);

impl From<ShardError> for candle_core::Error {
    fn from(e: ShardError) -> Self {
        candle_core::Error::Msg(e.0)
    }
}

/// The thread pools of the shards, built once per stage.
pub struct Shards {
    pools: Vec<rayon::ThreadPool>,
}

/// The shard count `ONESTEP_SHARDS` asks for, if it is set.
fn requested() -> Result<Option<usize>> {
    match std::env::var("ONESTEP_SHARDS") {
        Ok(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            candle_core::Error::Msg(format!(
                "ONESTEP_SHARDS={v:?}: expected a number of shards (1 turns sharding off)"
            ))
        }),
        Err(_) => Ok(None),
    }
}

/// Whether steps are sharded at all in this process (`ONESTEP_SHARDS` is not 1 and there is
/// more than one thread). Read once at start-up to leave candle's element-wise thread pool at
/// one thread ([`crate::alloc::tune_for_tensors`]).
pub fn enabled() -> bool {
    // candle's reading of RAYON_NUM_THREADS, without starting rayon's pool.
    let threads = candle_core::utils::get_num_threads();
    match requested() {
        Ok(Some(n)) => n > 1 && threads > 1,
        Ok(None) => threads > 1,
        Err(_) => false,
    }
}

impl Shards {
    /// Up to `max` shards (the batch size): as many as rayon has threads unless
    /// `ONESTEP_SHARDS` says otherwise, the threads shared out between them.
    pub fn new(max: usize) -> Result<Self> {
        let threads = rayon::current_num_threads();
        let n = requested()?.unwrap_or(threads);
        Self::with(n.clamp(1, max.max(1)), threads)
    }

    /// Exactly `n` shards of `threads / n` threads each (at least one); `n` = 1: no pools,
    /// the step runs on the caller's pool as before.
    pub fn with(n: usize, threads: usize) -> Result<Self> {
        let per = (threads / n.max(1)).max(1);
        let pools = if n <= 1 {
            Vec::new()
        } else {
            (0..n)
                .map(|i| {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(per)
                        .thread_name(move |t| format!("onestep-shard-{i}.{t}"))
                        .build()
                        .map_err(|e| candle_core::Error::Msg(format!("shard thread pool: {e}")))
                })
                .collect::<Result<_>>()?
        };
        Ok(Self { pools })
    }

    /// How many shards a batch is split into.
    pub fn count(&self) -> usize {
        self.pools.len().max(1)
    }

    /// The sample ranges of the shards of a batch of `b` samples: contiguous, sizes differing by
    /// at most one, none empty (fewer shards than [`Self::count`] when `b` is smaller).
    pub fn ranges(&self, b: usize) -> Vec<std::ops::Range<usize>> {
        let n = self.count().min(b).max(1);
        (0..n).map(|i| i * b / n..(i + 1) * b / n).collect()
    }

    /// `f` of every shard's range of a batch of `b` samples, each on its shard's pool, side by
    /// side; in shard order. With one shard, `f(0..b)` on the caller's thread.
    pub fn map<T, E, F>(&self, b: usize, f: F) -> std::result::Result<Vec<T>, E>
    where
        T: Send,
        E: Send + From<ShardError>,
        F: Fn(std::ops::Range<usize>) -> std::result::Result<T, E> + Sync,
    {
        self.run(self.ranges(b), |_, r| f(r))
    }

    /// `f(i, items[i])` for every item, item `i` on shard `i`'s pool, side by side; in item
    /// order (at most [`Self::count`] items; one item, or no pools: on the caller's thread).
    /// A later pass over what an earlier [`Self::map`] made per shard (the GAN's generator
    /// step on the fakes of its discriminator step).
    pub fn run<I, T, E, F>(&self, items: Vec<I>, f: F) -> std::result::Result<Vec<T>, E>
    where
        I: Send,
        T: Send,
        E: Send + From<ShardError>,
        F: Fn(usize, I) -> std::result::Result<T, E> + Sync,
    {
        if items.len() > self.count() {
            let what = format!("{} shard items for {} shards", items.len(), self.count());
            return Err(ShardError(what).into());
        }
        if self.pools.is_empty() || items.len() <= 1 {
            return items
                .into_iter()
                .enumerate()
                .map(|(i, x)| f(i, x))
                .collect();
        }
        let f = &f;
        let results: Vec<std::result::Result<T, E>> = std::thread::scope(|s| {
            let handles: Vec<_> = items
                .into_iter()
                .enumerate()
                .zip(&self.pools)
                .map(|((i, x), pool)| s.spawn(move || pool.install(|| f(i, x))))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ShardError("a parallel shard's thread panicked".into()).into())
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }

    /// `f` of every shard, the results concatenated along dimension 0 (a batch made shard by
    /// shard: generated clips, encoded latents).
    pub fn cat<F>(&self, b: usize, f: F) -> Result<Tensor>
    where
        F: Fn(std::ops::Range<usize>) -> Result<Tensor> + Sync,
    {
        let parts = self.map(b, f)?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().expect("one part"));
        }
        Tensor::cat(&parts, 0)
    }

    /// The loss of a batch of `b` samples and its gradients: `loss(range)` is the mean loss of
    /// the samples `range`, run once per shard and weighted by the shard's share of the batch.
    /// Returns the batch's loss (the weighted sum) and the summed gradients.
    pub fn backward<F>(&self, b: usize, loss: F) -> Result<(f64, GradStore)>
    where
        F: Fn(std::ops::Range<usize>) -> Result<Tensor> + Sync,
    {
        let parts = self.map(b, |r| {
            let share = r.len() as f64 / b.max(1) as f64;
            let l = loss(r)?;
            let l = if share == 1.0 { l } else { (l * share)? };
            let g = l.backward()?;
            Ok::<_, candle_core::Error>(([l.to_scalar::<f32>()? as f64], g))
        })?;
        let ([total], grads) = sum(parts)?;
        Ok((total, grads))
    }
}

/// The shards' weighted values (losses, diagnostics) and gradients (`Shards::map` of closures
/// that each ran their own backward pass) summed into the batch's.
pub fn sum<const N: usize>(parts: Vec<([f64; N], GradStore)>) -> Result<([f64; N], GradStore)> {
    let mut total = [0f64; N];
    let mut grads: Option<GradStore> = None;
    for (v, g) in parts {
        for (t, x) in total.iter_mut().zip(v) {
            *t += x;
        }
        match &mut grads {
            None => grads = Some(g),
            Some(acc) => acc.extend(g)?,
        }
    }
    grads
        .map(|g| (total, g))
        .ok_or_else(|| candle_core::Error::Msg("no shard ran".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A per-sample nonlinear loss whose batch mean couples nothing across samples.
    fn loss(w: &Var, x: &Tensor, r: std::ops::Range<usize>) -> Result<Tensor> {
        let x = x.narrow(0, r.start, r.len())?;
        x.matmul(w.as_tensor())?.tanh()?.sqr()?.mean_all()
    }

    #[test]
    fn sharded_gradients_equal_the_whole_batch() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 3), &dev)?)?;
        // Odd batch sizes too: shards of unequal size must be weighted by their share.
        for b in [1usize, 2, 3, 4, 7] {
            let x = Tensor::randn(0f32, 1.0, (b, 5), &dev)?;
            let (l1, g1) = Shards::with(1, 2)?.backward(b, |r| loss(&w, &x, r))?;
            for n in [2usize, 3] {
                let shards = Shards::with(n, n)?;
                let (ln, gn) = shards.backward(b, |r| loss(&w, &x, r))?;
                assert!(
                    (l1 - ln).abs() < 1e-6,
                    "b {b} shards {n}: loss {l1} vs {ln}"
                );
                let d = (g1.get(w.as_tensor()).unwrap() - gn.get(w.as_tensor()).unwrap())?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-6, "b {b} shards {n}: gradients differ by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn ranges_cover_the_batch_without_empty_shards() -> Result<()> {
        let s = Shards::with(3, 3)?;
        assert_eq!(s.ranges(7), vec![0..2, 2..4, 4..7]);
        assert_eq!(s.ranges(2), vec![0..1, 1..2]);
        assert_eq!(Shards::with(1, 2)?.ranges(4), vec![0..4]);
        Ok(())
    }

    #[test]
    fn a_failing_shard_is_an_error() -> Result<()> {
        let s = Shards::with(2, 2)?;
        let err = s
            .backward(4, |r| {
                if r.start > 0 {
                    candle_core::bail!("shard at {} failed", r.start)
                }
                Tensor::new(1f32, &Device::Cpu)
            })
            .err()
            .expect("an error");
        assert!(err.to_string().contains("shard at 2 failed"), "{err}");
        Ok(())
    }

    #[test]
    fn cat_keeps_the_batch_order() -> Result<()> {
        let x = Tensor::arange(0f32, 14.0, &Device::Cpu)?.reshape((7, 2))?;
        for n in [1usize, 2, 3] {
            let y =
                Shards::with(n, 4)?.cat(7, |r| x.narrow(0, r.start, r.len())?.affine(2.0, 1.0))?;
            assert_eq!(
                y.to_vec2::<f32>()?,
                x.affine(2.0, 1.0)?.to_vec2::<f32>()?,
                "{n} shards"
            );
        }
        Ok(())
    }
}
