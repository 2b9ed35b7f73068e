//! Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") for
//! candle, which keeps every intermediate of a forward pass for the backward pass and has no
//! checkpointing of its own.
//!
//! A checkpointed unit `y = f(x, emb, context)` runs as one custom op: its forward pass runs `f`
//! on weights that record no graph, so nothing inside the unit is kept; its backward pass runs
//! `f` again on the trainable weights and back-propagates `sum(y * dy)` through that one unit,
//! returning the gradients of the three inputs to the outer backward pass and adding those of
//! the trainable variables to a side store ([`Checkpointing::merge_into`] adds them to the
//! outer gradients before the optimizer step). Memory then holds the units' inputs and outputs
//! plus one unit's intermediates at a time, for a second forward pass of each unit.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, Var,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One unit: `(x, emb, context, trainable)`; with `trainable = false` it must use weights that
/// record no graph (detached), with `true` the trainable ones.
pub type UnitFn = dyn Fn(&Tensor, &Tensor, &Tensor, bool) -> Result<Tensor> + Send + Sync;

/// The state of one checkpointed forward/backward: the trainable variables and the gradients
/// that the units' backward passes found for them.
#[derive(Clone)]
pub struct Checkpointing {
    vars: Arc<Vec<Var>>,
    side: Arc<Mutex<HashMap<candle_core::TensorId, Tensor>>>,
    /// A zero variable added to every unit's input, so that the backward pass enters a unit even
    /// when nothing before it trains (a LoRA student's first unit reads frozen layers' output).
    anchor: Var,
}

impl Checkpointing {
    pub fn new(vars: Vec<Var>) -> Result<Self> {
        let dev = vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        Ok(Self {
            vars: Arc::new(vars),
            side: Arc::new(Mutex::new(HashMap::new())),
            anchor: Var::zeros(1, candle_core::DType::F32, &dev)?,
        })
    }

    /// `unit(x, emb, context)` as a checkpointed op.
    pub fn apply(
        &self,
        unit: Arc<UnitFn>,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let op = CheckpointOp {
            unit,
            state: self.clone(),
        };
        // Offset-free contiguous inputs, so the op can rebuild them from their storage.
        let x = x.broadcast_add(&self.anchor.as_tensor().to_dtype(x.dtype())?)?;
        x.copy()?.apply_op3(&emb.copy()?, &context.copy()?, op)
    }

    /// Adds the gradients found inside checkpointed units to `grads` (the outer backward
    /// pass's), and clears them.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        let mut side = self
            .side
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint: gradient store poisoned".into()))?;
        for v in self.vars.iter() {
            if let Some(g) = side.remove(&v.as_tensor().id()) {
                let sum = match grads.get(v.as_tensor()) {
                    Some(outer) => (outer + g)?,
                    None => g,
                };
                grads.insert(v.as_tensor(), sum);
            }
        }
        Ok(())
    }
}

struct CheckpointOp {
    unit: Arc<UnitFn>,
    state: Checkpointing,
}

fn detached_tensor(s: Storage, l: &Layout) -> Result<Tensor> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("checkpoint: inputs must be contiguous without offset");
    }
    Ok(Tensor::from_storage(
        s,
        l.shape().clone(),
        BackpropOp::none(),
        false,
    ))
}

/// `y` (contiguous, offset 0) as the storage a custom op returns.
fn output_storage(y: Tensor) -> Result<(Storage, Shape)> {
    let y = y.detach().copy()?;
    let (s, l) = y.storage_and_layout();
    let s = match &*s {
        Storage::Cpu(c) => Storage::Cpu(c.try_clone(l)?),
        Storage::Cuda(c) => Storage::Cuda(c.try_clone(l)?),
        Storage::Metal(m) => Storage::Metal(m.try_clone(l)?),
    };
    Ok((s, l.shape().clone()))
}

impl CustomOp3 for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = detached_tensor(Storage::Cpu(s1.try_clone(l1)?), l1)?;
        let e = detached_tensor(Storage::Cpu(s2.try_clone(l2)?), l2)?;
        let c = detached_tensor(Storage::Cpu(s3.try_clone(l3)?), l3)?;
        match output_storage((self.unit)(&x, &e, &c, false)?)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("checkpoint: the unit left the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let x = detached_tensor(Storage::Cuda(s1.try_clone(l1)?), l1)?;
        let e = detached_tensor(Storage::Cuda(s2.try_clone(l2)?), l2)?;
        let c = detached_tensor(Storage::Cuda(s3.try_clone(l3)?), l3)?;
        match output_storage((self.unit)(&x, &e, &c, false)?)? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("checkpoint: the unit left the GPU"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        emb: &Tensor,
        context: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (vx, ve, vc) = (
            Var::from_tensor(&x.detach())?,
            Var::from_tensor(&emb.detach())?,
            Var::from_tensor(&context.detach())?,
        );
        let y = (self.unit)(vx.as_tensor(), ve.as_tensor(), vc.as_tensor(), true)?;
        let grads = (y * grad.detach())?.sum_all()?.backward()?;
        let mut side =
            self.state.side.lock().map_err(|_| {
                candle_core::Error::Msg("checkpoint: gradient store poisoned".into())
            })?;
        for v in self.state.vars.iter() {
            if let Some(g) = grads.get(v.as_tensor()) {
                let id = v.as_tensor().id();
                let sum = match side.remove(&id) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                side.insert(id, sum);
            }
        }
        // An input the unit does not read (the context of a block without attention) gets a zero
        // gradient: candle expects one for every tracked input of an op.
        let grad_of = |v: &Var| -> Result<Option<Tensor>> {
            Ok(Some(match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            }))
        };
        Ok((grad_of(&vx)?, grad_of(&ve)?, grad_of(&vc)?))
    }
}
