//! onestep's fused CPU kernels over f32 slices, forward and backward, parallel with rayon.
//!
//! A crate of its own so that it is always compiled with optimisations: onestep itself builds
//! at opt-level 1 in tests (quick to compile), where these loops would run several times
//! slower than candle's own (optimised) kernels they replace. `src/models/fused.rs` wraps them
//! as candle custom ops; the maths is documented there.

use rayon::prelude::*;

fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + (-y).exp())
}

/// `sum f(x)` over a slice with 16 independent f32 lanes (which the compiler vectorises; a
/// single running sum cannot be reordered), combined in f64.
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = xs.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + rest.iter().map(|&v| f(v) as f64).sum::<f64>()
}

/// Mean and `1 / sqrt(var + eps)` of a group (biased variance, two passes, as PyTorch).
fn moments(xs: &[f32], eps: f64) -> (f32, f32) {
    let n = xs.len() as f64;
    let mean = (lane_sum(xs, |v| v) / n) as f32;
    let var = lane_sum(xs, |v| (v - mean) * (v - mean)) / n;
    (mean, (1.0 / (var + eps).sqrt()) as f32)
}

/// The layout of a GroupNorm input `[n, c, spatial...]` in C order: each (sample, group) is one
/// contiguous block of `channels_per_group * spatial` values.
#[derive(Debug, Clone, Copy)]
pub struct Groups {
    pub groups: usize,
    /// Channels per group.
    pub cpg: usize,
    /// Elements per channel (product of the trailing axes).
    pub spatial: usize,
    pub eps: f64,
    /// Apply SiLU after the affine part.
    pub silu: bool,
}

impl Groups {
    fn chunk(&self) -> usize {
        (self.cpg * self.spatial).max(1)
    }
}

/// `out = [silu](group_norm(x) * w + b)`; `w`, `b`: one value per channel.
pub fn group_norm_fwd(x: &[f32], w: &[f32], b: &[f32], g: Groups, out: &mut [f32]) {
    let (cpg, spatial) = (g.cpg, g.spatial);
    out.par_chunks_mut(g.chunk())
        .zip(x.par_chunks(g.chunk()))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let grp = i % g.groups;
            let (mean, rstd) = moments(xs, g.eps);
            for k in 0..cpg {
                let ch = grp * cpg + k;
                let scale = rstd * w[ch];
                let shift = b[ch] - mean * scale;
                let r = k * spatial..(k + 1) * spatial;
                let (o, xs) = (&mut o[r.clone()], &xs[r]);
                if g.silu {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        let y = v * scale + shift;
                        *o = y * sigmoid(y);
                    }
                } else {
                    for (o, &v) in o.iter_mut().zip(xs) {
                        *o = v * scale + shift;
                    }
                }
            }
        });
}

/// Gradients of [`group_norm_fwd`] from the output gradient `go`: `dx` (like `x`), and `dw`,
/// `db` (one per channel, overwritten).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_bwd(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    go: &[f32],
    g: Groups,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (cpg, spatial) = (g.cpg, g.spatial);
    // Per (sample, group): d weight and d bias of its channels, summed over samples below.
    let partial: Vec<(usize, Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(g.chunk())
        .zip(x.par_chunks(g.chunk()).zip(go.par_chunks(g.chunk())))
        .enumerate()
        .map(|(i, (dx, (xs, gs)))| {
            let grp = i % g.groups;
            let (mean, rstd) = moments(xs, g.eps);
            let (mut pw, mut pb) = (vec![0f32; cpg], vec![0f32; cpg]);
            // Pass 1: d xhat into dx, the parameter gradients, and the two group sums.
            let (mut sum_d, mut sum_dx) = (0f64, 0f64);
            for k in 0..cpg {
                let ch = grp * cpg + k;
                let r = k * spatial..(k + 1) * spatial;
                let (mut acc_w, mut acc_b) = (0f64, 0f64);
                for ((d, &v), &go) in dx[r.clone()].iter_mut().zip(&xs[r.clone()]).zip(&gs[r]) {
                    let xhat = (v - mean) * rstd;
                    let gy = if g.silu {
                        let y = xhat * w[ch] + b[ch];
                        let s = sigmoid(y);
                        go * s * (1.0 + y * (1.0 - s))
                    } else {
                        go
                    };
                    acc_b += gy as f64;
                    acc_w += (gy * xhat) as f64;
                    let dxhat = gy * w[ch];
                    sum_d += dxhat as f64;
                    sum_dx += (dxhat * xhat) as f64;
                    *d = dxhat;
                }
                pw[k] = acc_w as f32;
                pb[k] = acc_b as f32;
            }
            // Pass 2: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)).
            let m = xs.len() as f64;
            let (mean_d, mean_dx) = ((sum_d / m) as f32, (sum_dx / m) as f32);
            for (d, &v) in dx.iter_mut().zip(xs) {
                let xhat = (v - mean) * rstd;
                *d = rstd * (*d - mean_d - xhat * mean_dx);
            }
            (grp, pw, pb)
        })
        .collect();
    dw.fill(0.0);
    db.fill(0.0);
    for (grp, pw, pb) in partial {
        for k in 0..cpg {
            dw[grp * cpg + k] += pw[k];
            db[grp * cpg + k] += pb[k];
        }
    }
}

/// Softmax over rows of `dim` values.
pub fn softmax_fwd(x: &[f32], dim: usize, out: &mut [f32]) {
    let dim = dim.max(1);
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, xs)| {
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            for o in o.iter_mut() {
                *o *= inv;
            }
        });
}

/// `dx = y (g - <g, y>)` per row, from the softmax output `y` and its gradient `g`.
pub fn softmax_bwd(y: &[f32], g: &[f32], dim: usize, dx: &mut [f32]) {
    let dim = dim.max(1);
    dx.par_chunks_mut(dim)
        .zip(y.par_chunks(dim).zip(g.par_chunks(dim)))
        .for_each(|(o, (ys, gs))| {
            let dot: f32 = ys.iter().zip(gs).map(|(a, b)| a * b).sum();
            for ((o, &y), &g) in o.iter_mut().zip(ys).zip(gs) {
                *o = y * (g - dot);
            }
        });
}

/// `(gelu(g), gelu'(g))` of the exact GELU `g Phi(g)`, with `erf` from candle's CPU backend
/// passed in (this crate has no dependency on candle).
fn gelu_and_slope(g: f32, erf: fn(f32) -> f32) -> (f32, f32) {
    let cdf = 0.5 * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = (-0.5 * g * g).exp() * 0.398_942_3; // 1 / sqrt(2 pi)
    (g * cdf, cdf + g * pdf)
}

/// GEGLU over rows of `2n` values: `out[.., i] = x[.., i] * gelu(x[.., n + i])`.
pub fn geglu_fwd(x: &[f32], n: usize, erf: fn(f32) -> f32, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    out.par_chunks_mut(n)
        .zip(x.par_chunks(2 * n))
        .for_each(|(o, xs)| {
            let (h, g) = xs.split_at(n);
            for ((o, &h), &g) in o.iter_mut().zip(h).zip(g) {
                *o = h * gelu_and_slope(g, erf).0;
            }
        });
}

/// Gradient of [`geglu_fwd`]: `dx = [go gelu(g), go h gelu'(g)]` per row.
pub fn geglu_bwd(x: &[f32], go: &[f32], n: usize, erf: fn(f32) -> f32, dx: &mut [f32]) {
    if n == 0 {
        return;
    }
    dx.par_chunks_mut(2 * n)
        .zip(x.par_chunks(2 * n).zip(go.par_chunks(n)))
        .for_each(|(o, (xs, gs))| {
            let (dh, dg) = o.split_at_mut(n);
            let (h, g) = xs.split_at(n);
            for i in 0..n {
                let (gelu, slope) = gelu_and_slope(g[i], erf);
                dh[i] = gs[i] * gelu;
                dg[i] = gs[i] * h[i] * slope;
            }
        });
}

/// `out = y + b[c]` over `y` laid out `[outer, c, inner]` (a per-channel bias).
pub fn bias_add_fwd(y: &[f32], b: &[f32], c: usize, inner: usize, out: &mut [f32]) {
    let inner = inner.max(1);
    if inner == 1 {
        // `[rows, c]`: one bias row per output row.
        out.par_chunks_mut(c.max(1))
            .zip(y.par_chunks(c.max(1)))
            .for_each(|(o, ys)| {
                for ((o, &v), &bb) in o.iter_mut().zip(ys).zip(b) {
                    *o = v + bb;
                }
            });
        return;
    }
    out.par_chunks_mut(inner)
        .zip(y.par_chunks(inner))
        .enumerate()
        .for_each(|(i, (o, ys))| {
            let bb = b[i % c];
            for (o, &v) in o.iter_mut().zip(ys) {
                *o = v + bb;
            }
        });
}

/// The bias gradient of [`bias_add_fwd`]: `db[c] = sum over outer and inner of g`.
pub fn bias_add_grad(g: &[f32], c: usize, inner: usize, db: &mut [f32]) {
    let inner = inner.max(1);
    let row = c * inner;
    if row == 0 {
        return;
    }
    // Partial sums over blocks of outer rows, in f64, then one reduction.
    let outer = g.len() / row;
    let per = outer
        .div_ceil(rayon::current_num_threads().max(1) * 4)
        .max(1);
    let partial: Vec<Vec<f64>> = g
        .par_chunks(per * row)
        .map(|block| {
            let mut acc = vec![0f64; c];
            for r in block.chunks(row) {
                if inner == 1 {
                    for (a, &v) in acc.iter_mut().zip(r) {
                        *a += v as f64;
                    }
                } else {
                    for (a, ch) in acc.iter_mut().zip(r.chunks(inner)) {
                        *a += ch.iter().map(|&v| v as f64).sum::<f64>();
                    }
                }
            }
            acc
        })
        .collect();
    for (k, d) in db.iter_mut().enumerate() {
        *d = partial.iter().map(|p| p[k]).sum::<f64>() as f32;
    }
}

/// The geometry of a 2-D convolution over `[b, cin, h, w]` images with `[cout, cin, kh, kw]`
/// weights (no dilation or groups): stride, padding (top, left; bottom and right only shape
/// `ho`, `wo`), output size.
#[derive(Debug, Clone, Copy)]
pub struct Conv {
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Conv {
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn p(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1x1 stride-1 unpadded convolution reads the image itself as its columns.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad_top == 0 && self.pad_left == 0
    }

    /// `cols[(c kh + ky) kw + kx, oy wo + ox] = x[c, oy s + ky - pt, ox s + kx - pl]` (0 outside).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (p, wo) = (self.p(), self.wo);
        for c in 0..self.cin {
            let xc = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let r = (c * self.kh + ky) * self.kw + kx;
                    let row = &mut cols[r * p..(r + 1) * p];
                    for oy in 0..self.ho {
                        let iy = (oy * self.stride + ky) as isize - self.pad_top as isize;
                        let out = &mut row[oy * wo..(oy + 1) * wo];
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &xc[iy as usize * self.w..(iy as usize + 1) * self.w];
                        for (ox, o) in out.iter_mut().enumerate() {
                            let ix = (ox * self.stride + kx) as isize - self.pad_left as isize;
                            *o = if ix < 0 || ix >= self.w as isize {
                                0.0
                            } else {
                                src[ix as usize]
                            };
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Conv::im2col`]: adds every column entry back to its input pixel.
    fn col2im_add(&self, cols: &[f32], dx: &mut [f32]) {
        let (p, wo) = (self.p(), self.wo);
        for c in 0..self.cin {
            let dxc = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let r = (c * self.kh + ky) * self.kw + kx;
                    let row = &cols[r * p..(r + 1) * p];
                    for oy in 0..self.ho {
                        let iy = (oy * self.stride + ky) as isize - self.pad_top as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut dxc[iy as usize * self.w..(iy as usize + 1) * self.w];
                        for (ox, &v) in row[oy * wo..(oy + 1) * wo].iter().enumerate() {
                            let ix = (ox * self.stride + kx) as isize - self.pad_left as isize;
                            if ix >= 0 && (ix as usize) < self.w {
                                dst[ix as usize] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst[m, n] (+)= a[m, k] b[k, n]` with row and column strides, single-threaded (the caller
/// parallelises over images).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    (d_rs, d_cs): (usize, usize),
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let span =
        |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    assert!(dst.len() >= span(m, d_rs, n, d_cs));
    if k > 0 {
        assert!(a.len() >= span(m, a_rs, k, a_cs) && b.len() >= span(k, b_rs, n, b_cs));
    }
    // SAFETY: the asserts bound every element the GEMM reads or writes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            d_cs as isize,
            d_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `y[i] = W cols(x[i])` for every image `i` of `x` (`[b, cin, h, w]`), written in
/// `[b, cout, ho, wo]` order: one GEMM per image, images in parallel.
pub fn conv2d_fwd(x: &[f32], wt: &[f32], g: Conv, y: &mut [f32]) {
    let (k, p, cout) = (g.k(), g.p(), g.cout);
    let img = g.cin * g.h * g.w;
    y.par_chunks_mut((cout * p).max(1))
        .zip(x.par_chunks(img.max(1)))
        .for_each_init(
            || vec![0f32; if g.pointwise() { 0 } else { k * p }],
            |cols, (y, x)| {
                let b: &[f32] = if g.pointwise() {
                    x
                } else {
                    g.im2col(x, cols);
                    cols
                };
                gemm_into(cout, p, k, y, (p, 1), false, wt, (k, 1), b, (p, 1));
            },
        );
}

/// Gradients of [`conv2d_fwd`] from `dy` (`[b, cout, ho, wo]`): `dx` (overwritten) and `dw`
/// (`[cout, cin kh kw]`, overwritten).
pub fn conv2d_bwd(x: &[f32], wt: &[f32], dy: &[f32], g: Conv, dx: &mut [f32], dw: &mut [f32]) {
    let (k, p, cout) = (g.k(), g.p(), g.cout);
    let img = g.cin * g.h * g.w;
    let partial = dx
        .par_chunks_mut(img.max(1))
        .zip(
            x.par_chunks(img.max(1))
                .zip(dy.par_chunks((cout * p).max(1))),
        )
        .fold(
            || (vec![0f32; k * p], vec![0f32; k * p], vec![0f32; cout * k]),
            |(mut cols, mut dcols, mut dw), (dx, (x, dy))| {
                // d W += dy[i] cols(x[i])^T.
                let b: &[f32] = if g.pointwise() {
                    x
                } else {
                    g.im2col(x, &mut cols);
                    &cols
                };
                gemm_into(cout, k, p, &mut dw, (k, 1), true, dy, (p, 1), b, (1, p));
                // d cols = W^T dy[i], then back onto the image.
                if g.pointwise() {
                    gemm_into(k, p, cout, dx, (p, 1), false, wt, (1, k), dy, (p, 1));
                } else {
                    gemm_into(
                        k,
                        p,
                        cout,
                        &mut dcols,
                        (p, 1),
                        false,
                        wt,
                        (1, k),
                        dy,
                        (p, 1),
                    );
                    dx.fill(0.0);
                    g.col2im_add(&dcols, dx);
                }
                (cols, dcols, dw)
            },
        )
        .map(|(_, _, dw)| dw)
        .reduce(
            || vec![0f32; cout * k],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(&b) {
                    *a += b;
                }
                a
            },
        );
    dw.copy_from_slice(&partial);
}

/// `out = a s + (1 - a) t` (SVD's `AlphaBlender` with the blend factor `a` already computed).
pub fn blend_fwd(s: &[f32], t: &[f32], a: f32, out: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(s.par_chunks(CHUNK).zip(t.par_chunks(CHUNK)))
        .for_each(|(o, (s, t))| {
            for ((o, &s), &t) in o.iter_mut().zip(s).zip(t) {
                *o = a * s + (1.0 - a) * t;
            }
        });
}

/// Gradients of [`blend_fwd`] from `g`: `ds = a g`, `dt = (1 - a) g` (written), and the
/// returned `da = sum g (s - t)`.
pub fn blend_bwd(s: &[f32], t: &[f32], g: &[f32], a: f32, ds: &mut [f32], dt: &mut [f32]) -> f32 {
    const CHUNK: usize = 1 << 14;
    ds.par_chunks_mut(CHUNK)
        .zip(dt.par_chunks_mut(CHUNK))
        .zip(
            s.par_chunks(CHUNK)
                .zip(t.par_chunks(CHUNK))
                .zip(g.par_chunks(CHUNK)),
        )
        .map(|((ds, dt), ((s, t), g))| {
            let mut acc = [0f32; 16];
            for (i, (((ds, dt), &s), &t)) in
                ds.iter_mut().zip(dt.iter_mut()).zip(s).zip(t).enumerate()
            {
                let gi = g[i];
                *ds = a * gi;
                *dt = (1.0 - a) * gi;
                acc[i % 16] += gi * (s - t);
            }
            acc.iter().map(|&v| v as f64).sum::<f64>()
        })
        .sum::<f64>() as f32
}
