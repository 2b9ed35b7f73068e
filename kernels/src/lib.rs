//! onestep's fused CPU kernels over f32 slices, forward and backward, parallel with rayon.
//!
//! A crate of its own so that it is always compiled with optimisations: onestep itself builds
//! at opt-level 1 in tests (quick to compile), where these loops would run several times
//! slower than candle's own (optimised) kernels they replace. `src/models/fused.rs` wraps them
//! as candle custom ops; the maths is documented there.

use rayon::prelude::*;

pub mod fastmath;
use fastmath::{exp, gelu_and_slope};

/// Defines `fn $name(args) -> R` twice over one body: compiled for AVX2 + FMA (8 f32 lanes),
/// chosen at run time where the processor has them, and for the baseline target (SSE2)
/// elsewhere. The body's loops are written to vectorise (no calls into libm; `exp` and `erf`
/// are the branch-free polynomials of [`fastmath`]), so the same code runs at the width the
/// processor offers without building for one machine.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the processor has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[inline(always)]
fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + exp(-y))
}

/// `sum f(x)` over a slice with 16 independent f32 lanes (which the compiler vectorises; a
/// single running sum cannot be reordered), combined in f64.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = xs.chunks_exact(L);
    let rest = chunks.remainder();
    if xs.len() < L {
        return rest.iter().map(|&v| f(v) as f64).sum();
    }
    for c in chunks {
        for i in 0..L {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + rest.iter().map(|&v| f(v) as f64).sum::<f64>()
}

/// `<a, b - shift>` with 16 independent f32 lanes, combined in f64 (as [`lane_sum`]).
#[inline(always)]
fn lane_dot(a: &[f32], b: &[f32], shift: f32) -> f64 {
    const L: usize = 16;
    let n = a.len().min(b.len()) / L * L;
    let mut acc = [0f32; L];
    for (x, y) in a[..n].chunks_exact(L).zip(b[..n].chunks_exact(L)) {
        for i in 0..L {
            acc[i] += x[i] * (y[i] - shift);
        }
    }
    let tail: f64 = (a[n..].iter().zip(&b[n..]))
        .map(|(&x, &y)| (x * (y - shift)) as f64)
        .sum();
    if n == 0 {
        return tail;
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + tail
}

/// Mean and `1 / sqrt(var + eps)` of a group (biased variance, two passes, as PyTorch).
#[inline(always)]
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
    out.par_chunks_mut(g.chunk())
        .zip(x.par_chunks(g.chunk()))
        .enumerate()
        .for_each(|(i, (o, xs))| group_norm_fwd_group(xs, w, b, g, i % g.groups, o));
}

multiversion! {
    /// [`group_norm_fwd`] of one (sample, group) block.
    fn group_norm_fwd_group(xs: &[f32], w: &[f32], b: &[f32], g: Groups, grp: usize, o: &mut [f32]) {
        let (cpg, spatial) = (g.cpg, g.spatial);
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
    }
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
    let cpg = g.cpg;
    // Per (sample, group): d weight and d bias of its channels, summed over samples below.
    let partial: Vec<(usize, Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(g.chunk())
        .zip(x.par_chunks(g.chunk()).zip(go.par_chunks(g.chunk())))
        .enumerate()
        .map(|(i, (dx, (xs, gs)))| {
            let grp = i % g.groups;
            let (mut pw, mut pb) = (vec![0f32; cpg], vec![0f32; cpg]);
            group_norm_bwd_group(xs, gs, w, b, g, grp, dx, &mut pw, &mut pb);
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

multiversion! {
    /// [`group_norm_bwd`] of one (sample, group) block: `dx`, and the block's share of `dw`,
    /// `db` (`pw`, `pb`: one per channel of the group).
    #[allow(clippy::too_many_arguments)]
    fn group_norm_bwd_group(
        xs: &[f32],
        gs: &[f32],
        w: &[f32],
        b: &[f32],
        g: Groups,
        grp: usize,
        dx: &mut [f32],
        pw: &mut [f32],
        pb: &mut [f32],
    ) {
        let (cpg, spatial) = (g.cpg, g.spatial);
        let (mean, rstd) = moments(xs, g.eps);
        let (mut sum_d, mut sum_dxc) = (0f64, 0f64);
        // Pass 1, per channel: d xhat into dx, and the parameter gradients
        // d bias = sum gy, d weight = sum gy xhat (gy: the gradient before the affine part).
        for k in 0..cpg {
            let ch = grp * cpg + k;
            let (wc, bc) = (w[ch], b[ch]);
            let r = k * spatial..(k + 1) * spatial;
            let (dx, xs, gs) = (&mut dx[r.clone()], &xs[r.clone()], &gs[r]);
            for ((d, &v), &go) in dx.iter_mut().zip(xs).zip(gs) {
                let xhat = (v - mean) * rstd;
                *d = if g.silu {
                    let y = xhat * wc + bc;
                    let s = sigmoid(y);
                    go * s * (1.0 + y * (1.0 - s))
                } else {
                    go
                };
            }
            // dx holds gy here; d xhat = gy w, so the group sums of d xhat and d xhat (x - mean)
            // are the channel sums scaled by w.
            let (sum_gy, sum_gy_xc) = (lane_sum(dx, |v| v), lane_dot(dx, xs, mean));
            pb[k] = sum_gy as f32;
            pw[k] = (rstd as f64 * sum_gy_xc) as f32;
            sum_d += wc as f64 * sum_gy;
            sum_dxc += wc as f64 * sum_gy_xc;
            for d in dx.iter_mut() {
                *d *= wc;
            }
        }
        // Pass 2: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), the two means over
        // the group.
        let m = xs.len() as f64;
        let (mean_d, mean_dx) = ((sum_d / m) as f32, (rstd as f64 * sum_dxc / m) as f32);
        for (d, &v) in dx.iter_mut().zip(xs) {
            let xhat = (v - mean) * rstd;
            *d = rstd * (*d - mean_d - xhat * mean_dx);
        }
    }
}

/// `softmax(scale x)` over rows of `dim` values.
pub fn softmax_fwd(x: &[f32], dim: usize, scale: f32, out: &mut [f32]) {
    let dim = dim.max(1);
    out.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .for_each(|(o, xs)| softmax_row(xs, scale, o));
}

multiversion! {
    fn softmax_row(xs: &[f32], scale: f32, o: &mut [f32]) {
        let max = xs.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        for (o, &v) in o.iter_mut().zip(xs) {
            *o = exp(v * scale - max);
        }
        let inv = (1.0 / lane_sum(o, |v| v)) as f32;
        for o in o.iter_mut() {
            *o *= inv;
        }
    }
}

/// `dx = scale y (g - <g, y>)` per row, from the output `y` of `softmax(scale x)` and its
/// gradient `g`.
pub fn softmax_bwd(y: &[f32], g: &[f32], dim: usize, scale: f32, dx: &mut [f32]) {
    let dim = dim.max(1);
    dx.par_chunks_mut(dim)
        .zip(y.par_chunks(dim).zip(g.par_chunks(dim)))
        .for_each(|(o, (ys, gs))| softmax_bwd_row(ys, gs, scale, o));
}

multiversion! {
    fn softmax_bwd_row(ys: &[f32], gs: &[f32], scale: f32, o: &mut [f32]) {
        let dot = lane_dot(ys, gs, 0.0) as f32;
        for ((o, &y), &g) in o.iter_mut().zip(ys).zip(gs) {
            *o = scale * y * (g - dot);
        }
    }
}

/// GEGLU over rows of `2n` values: `out[.., i] = x[.., i] * gelu(x[.., n + i])`.
pub fn geglu_fwd(x: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    out.par_chunks_mut(n)
        .zip(x.par_chunks(2 * n))
        .for_each(|(o, xs)| geglu_row(xs, o));
}

multiversion! {
    fn geglu_row(xs: &[f32], o: &mut [f32]) {
        let (h, g) = xs.split_at(o.len());
        for ((o, &h), &g) in o.iter_mut().zip(h).zip(g) {
            *o = h * gelu_and_slope(g).0;
        }
    }
}

/// Gradient of [`geglu_fwd`]: `dx = [go gelu(g), go h gelu'(g)]` per row.
pub fn geglu_bwd(x: &[f32], go: &[f32], n: usize, dx: &mut [f32]) {
    if n == 0 {
        return;
    }
    dx.par_chunks_mut(2 * n)
        .zip(x.par_chunks(2 * n).zip(go.par_chunks(n)))
        .for_each(|(o, (xs, gs))| geglu_bwd_row(xs, gs, o));
}

multiversion! {
    fn geglu_bwd_row(xs: &[f32], gs: &[f32], o: &mut [f32]) {
        let n = gs.len();
        let (dh, dg) = o.split_at_mut(n);
        let (h, g) = xs.split_at(n);
        for i in 0..n {
            let (gelu, slope) = gelu_and_slope(g[i]);
            dh[i] = gs[i] * gelu;
            dg[i] = gs[i] * h[i] * slope;
        }
    }
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
pub fn conv2d_fwd(x: &[f32], wt: &[f32], bias: &[f32], g: Conv, y: &mut [f32]) {
    let (k, p, cout) = (g.k(), g.p(), g.cout);
    let img = g.cin * g.h * g.w;
    let with_bias = !bias.is_empty();
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
                // The bias is written first and the GEMM adds onto it: no pass of its own.
                if with_bias {
                    for (row, &bc) in y.chunks_mut(p.max(1)).zip(bias) {
                        row.fill(bc);
                    }
                }
                gemm_into(cout, p, k, y, (p, 1), with_bias, wt, (k, 1), b, (p, 1));
            },
        );
}

/// Gradients of [`conv2d_fwd`] from `dy` (`[b, cout, ho, wo]`): `dx` (overwritten), `dw`
/// (`[cout, cin kh kw]`, overwritten) and, where `db` is not empty, the bias gradient
/// (`[cout]`, overwritten: `dy` summed over images and pixels, while each image's `dy` is read
/// for the GEMMs anyway).
pub fn conv2d_bwd(
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    g: Conv,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (k, p, cout) = (g.k(), g.p(), g.cout);
    let img = g.cin * g.h * g.w;
    let nb = if db.is_empty() { 0 } else { cout };
    // Each worker's dW and db partial sums share one buffer: `[cout k | cout]`.
    let partial = dx
        .par_chunks_mut(img.max(1))
        .zip(
            x.par_chunks(img.max(1))
                .zip(dy.par_chunks((cout * p).max(1))),
        )
        .fold(
            || {
                (
                    vec![0f32; k * p],
                    vec![0f32; k * p],
                    vec![0f32; cout * k + nb],
                )
            },
            |(mut cols, mut dcols, mut acc), (dx, (x, dy))| {
                let (dw, db) = acc.split_at_mut(cout * k);
                for (d, row) in db.iter_mut().zip(dy.chunks(p.max(1))) {
                    *d += lane_sum(row, |v| v) as f32;
                }
                // d W += dy[i] cols(x[i])^T.
                let b: &[f32] = if g.pointwise() {
                    x
                } else {
                    g.im2col(x, &mut cols);
                    &cols
                };
                gemm_into(cout, k, p, dw, (k, 1), true, dy, (p, 1), b, (1, p));
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
                (cols, dcols, acc)
            },
        )
        .map(|(_, _, acc)| acc)
        .reduce(
            || vec![0f32; cout * k + nb],
            |mut a, b| {
                for (a, b) in a.iter_mut().zip(&b) {
                    *a += b;
                }
                a
            },
        );
    let (pw, pb) = partial.split_at(cout * k);
    dw.copy_from_slice(pw);
    db.copy_from_slice(pb);
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

/// The geometry of a multi-head attention `softmax(q k^T scale) v` over `[batch, n, heads d]`
/// queries and `[batch, m, heads d]` keys and values, the heads side by side in the last axis
/// as the projections write them (so no head-split copies in either pass).
#[derive(Debug, Clone, Copy)]
pub struct Attn {
    pub batch: usize,
    pub heads: usize,
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub scale: f32,
}

impl Attn {
    fn hd(&self) -> usize {
        self.heads * self.d
    }
    /// Query rows per block: a block's scores stay within 64 Ki values (256 KiB), so the whole
    /// score matrix is never held, forward or backward (each row's softmax reads its own row).
    fn rows(&self) -> usize {
        ((1usize << 16) / self.m.max(1)).clamp(1, self.n.max(1))
    }
    fn empty(&self) -> bool {
        self.batch == 0 || self.heads == 0 || self.n == 0 || self.m == 0 || self.d == 0
    }
}

multiversion! {
    /// `softmax(scale s)` over rows of `m` values, in place.
    fn softmax_rows_inplace(s: &mut [f32], m: usize, scale: f32) {
        for row in s.chunks_mut(m.max(1)) {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v * scale));
            for v in row.iter_mut() {
                *v = exp(*v * scale - max);
            }
            let inv = (1.0 / lane_sum(row, |v| v)) as f32;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// `ds = scale p (dp - <go_i, o_i>)` for the `r` rows of a block, in place over `dp`; row `i`
    /// of `go` and `o` starts at `i hd` and holds `d` values (the head's columns).
    fn softmax_grad_rows(p: &[f32], dp: &mut [f32], go: &[f32], o: &[f32], shape: (usize, usize, usize, usize), scale: f32) {
        let (r, m, d, hd) = shape;
        for i in 0..r {
            let di = lane_dot(&go[i * hd..i * hd + d], &o[i * hd..i * hd + d], 0.0) as f32;
            for (g, &p) in dp[i * m..(i + 1) * m].iter_mut().zip(&p[i * m..(i + 1) * m]) {
                *g = scale * p * (*g - di);
            }
        }
    }
}

/// `out = softmax(q k^T scale) v` per (sample, head) (see [`Attn`]), samples in parallel, each
/// head's scores one block of query rows at a time: two GEMMs and a softmax per block.
pub fn attention_fwd(q: &[f32], k: &[f32], v: &[f32], a: Attn, out: &mut [f32]) {
    if a.empty() {
        out.fill(0.0);
        return;
    }
    let (hd, n, m, d) = (a.hd(), a.n, a.m, a.d);
    let rows = a.rows();
    out.par_chunks_mut(n * hd)
        .zip(
            q.par_chunks(n * hd)
                .zip(k.par_chunks(m * hd).zip(v.par_chunks(m * hd))),
        )
        .for_each_init(
            || vec![0f32; rows * m],
            |s, (o, (q, (k, v)))| {
                for h in 0..a.heads {
                    let mut r0 = 0;
                    while r0 < n {
                        let r = rows.min(n - r0);
                        let s = &mut s[..r * m];
                        let qb = &q[r0 * hd + h * d..];
                        gemm_into(r, m, d, s, (m, 1), false, qb, (hd, 1), &k[h * d..], (1, hd));
                        softmax_rows_inplace(s, m, a.scale);
                        let ob = &mut o[r0 * hd + h * d..];
                        gemm_into(r, d, m, ob, (hd, 1), false, s, (m, 1), &v[h * d..], (hd, 1));
                        r0 += r;
                    }
                }
            },
        );
}

/// Gradients of [`attention_fwd`] from its output `o` and the output gradient `go`, all
/// overwritten: with `p = softmax(scale q k^T)` recomputed block by block,
/// `dv = p^T go`, `ds = scale p (go v^T - <go_i, o_i>)` (the softmax's row sums `<dp_i, p_i>`
/// equal `<go_i, o_i>`, so `p` is never stored), `dq = ds k`, `dk = ds^T q`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    go: &[f32],
    a: Attn,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    if a.empty() {
        dq.fill(0.0);
        dk.fill(0.0);
        dv.fill(0.0);
        return;
    }
    let (hd, n, m, d) = (a.hd(), a.n, a.m, a.d);
    let rows = a.rows();
    let grads = dq
        .par_chunks_mut(n * hd)
        .zip(dk.par_chunks_mut(m * hd).zip(dv.par_chunks_mut(m * hd)));
    let inputs = q
        .par_chunks(n * hd)
        .zip(o.par_chunks(n * hd).zip(go.par_chunks(n * hd)))
        .zip(k.par_chunks(m * hd).zip(v.par_chunks(m * hd)));
    grads.zip(inputs).for_each_init(
        || (vec![0f32; rows * m], vec![0f32; rows * m]),
        |(p, dp), ((dq, (dk, dv)), ((q, (o, go)), (k, v)))| {
            for h in 0..a.heads {
                let mut r0 = 0;
                while r0 < n {
                    let r = rows.min(n - r0);
                    let first = r0 == 0;
                    let (p, dp) = (&mut p[..r * m], &mut dp[..r * m]);
                    let at = r0 * hd + h * d;
                    let (kh, vh) = (&k[h * d..], &v[h * d..]);
                    gemm_into(r, m, d, p, (m, 1), false, &q[at..], (hd, 1), kh, (1, hd));
                    softmax_rows_inplace(p, m, a.scale);
                    // dv (+)= p^T go.
                    let dvh = &mut dv[h * d..];
                    gemm_into(m, d, r, dvh, (hd, 1), !first, p, (1, m), &go[at..], (hd, 1));
                    // dp = go v^T, then ds in its place.
                    gemm_into(r, m, d, dp, (m, 1), false, &go[at..], (hd, 1), vh, (1, hd));
                    softmax_grad_rows(p, dp, &go[at..], &o[at..], (r, m, d, hd), a.scale);
                    // dq = ds k; dk (+)= ds^T q.
                    gemm_into(
                        r,
                        d,
                        m,
                        &mut dq[at..],
                        (hd, 1),
                        false,
                        dp,
                        (m, 1),
                        kh,
                        (hd, 1),
                    );
                    let dkh = &mut dk[h * d..];
                    gemm_into(m, d, r, dkh, (hd, 1), !first, dp, (1, m), &q[at..], (hd, 1));
                    r0 += r;
                }
            }
        },
    );
}

/// The geometry of a depthwise 2-D convolution over `[n, c, h, w]`: one `k x k` filter per
/// channel (`[c, 1, k, k]`), zero padding `pad_top` / `pad_left` (and whatever the bottom and
/// right need for `ho x wo` outputs), stride `stride` (EfficientNet's MBConv depthwise layers).
#[derive(Debug, Clone, Copy)]
pub struct Depthwise {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Depthwise {
    /// The input row of output row `o` and tap `t` (along one axis), if it is inside.
    #[inline(always)]
    fn src(o: usize, t: usize, s: usize, pad: usize, n: usize) -> Option<usize> {
        (o * s + t).checked_sub(pad).filter(|&i| i < n)
    }
    /// Outputs `lo..hi` along the width whose input column for tap `t` is inside.
    #[inline(always)]
    fn span(&self, t: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pad_left.saturating_sub(t).div_ceil(s);
        // ox s + t - pl <= w - 1  <=>  ox <= (w - 1 + pl - t) / s
        let hi = match (self.w + self.pad_left).checked_sub(t + 1) {
            Some(v) => (v / s + 1).min(self.wo),
            None => 0,
        };
        (lo, hi.max(lo))
    }
}

multiversion! {
    /// One channel plane: `y = bias + sum_taps w[t] x[shifted]`.
    fn depthwise_plane_fwd(x: &[f32], wk: &[f32], bias: f32, g: Depthwise, y: &mut [f32]) {
        let (k, s) = (g.k, g.stride);
        y.fill(bias);
        for oy in 0..g.ho {
            let yr = &mut y[oy * g.wo..(oy + 1) * g.wo];
            for ty in 0..k {
                let Some(iy) = Depthwise::src(oy, ty, s, g.pad_top, g.h) else {
                    continue;
                };
                let xr = &x[iy * g.w..(iy + 1) * g.w];
                for tx in 0..k {
                    let wv = wk[ty * k + tx];
                    let (lo, hi) = g.span(tx);
                    let off = tx as isize - g.pad_left as isize;
                    if s == 1 {
                        let a = (lo as isize + off) as usize;
                        for (o, &v) in yr[lo..hi].iter_mut().zip(&xr[a..a + (hi - lo)]) {
                            *o += wv * v;
                        }
                    } else {
                        for ox in lo..hi {
                            yr[ox] += wv * xr[((ox * s) as isize + off) as usize];
                        }
                    }
                }
            }
        }
    }
}

multiversion! {
    /// One channel plane's gradients: `dx` (written) and the filter's and bias's partial sums
    /// (added to `dw` `[k k]` and returned).
    fn depthwise_plane_bwd(
        x: &[f32],
        wk: &[f32],
        dy: &[f32],
        g: Depthwise,
        dx: &mut [f32],
        dw: &mut [f32],
    ) -> f32 {
        let (k, s) = (g.k, g.stride);
        dx.fill(0.0);
        let mut db = 0f32;
        for oy in 0..g.ho {
            let gr = &dy[oy * g.wo..(oy + 1) * g.wo];
            db += gr.iter().sum::<f32>();
            for ty in 0..k {
                let Some(iy) = Depthwise::src(oy, ty, s, g.pad_top, g.h) else {
                    continue;
                };
                let xr = &x[iy * g.w..(iy + 1) * g.w];
                let dxr = &mut dx[iy * g.w..(iy + 1) * g.w];
                for tx in 0..k {
                    let wv = wk[ty * k + tx];
                    let (lo, hi) = g.span(tx);
                    let off = tx as isize - g.pad_left as isize;
                    let mut acc = 0f32;
                    if s == 1 {
                        let a = (lo as isize + off) as usize;
                        for ((d, &v), &go) in dxr[a..a + (hi - lo)]
                            .iter_mut()
                            .zip(&xr[a..a + (hi - lo)])
                            .zip(&gr[lo..hi])
                        {
                            *d += wv * go;
                            acc += go * v;
                        }
                    } else {
                        for ox in lo..hi {
                            let i = ((ox * s) as isize + off) as usize;
                            dxr[i] += wv * gr[ox];
                            acc += gr[ox] * xr[i];
                        }
                    }
                    dw[ty * k + tx] += acc;
                }
            }
        }
        db
    }
}

/// Depthwise convolution forward over `[n, c, h, w]` into `y` `[n, c, ho, wo]`, planes in
/// parallel; `bias` `[c]` or empty.
pub fn depthwise_fwd(x: &[f32], wt: &[f32], bias: &[f32], g: Depthwise, y: &mut [f32]) {
    let (plane, out) = ((g.h * g.w).max(1), (g.ho * g.wo).max(1));
    let kk = g.k * g.k;
    y.par_chunks_mut(out)
        .zip(x.par_chunks(plane))
        .enumerate()
        .for_each(|(i, (y, x))| {
            let c = i % g.c.max(1);
            let b = bias.get(c).copied().unwrap_or(0.0);
            depthwise_plane_fwd(x, &wt[c * kk..(c + 1) * kk], b, g, y);
        });
}

/// Gradients of [`depthwise_fwd`]: `dx` `[n, c, h, w]`, `dw` `[c, 1, k, k]` and `db` `[c]`
/// (left alone when empty), planes in parallel, each filter's sums reduced over the batch.
pub fn depthwise_bwd(
    x: &[f32],
    wt: &[f32],
    dy: &[f32],
    g: Depthwise,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let (plane, out) = ((g.h * g.w).max(1), (g.ho * g.wo).max(1));
    let kk = g.k * g.k;
    // Per plane: its filter's partial sums and its bias's, `[k k | 1]`.
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(plane)
        .zip(x.par_chunks(plane).zip(dy.par_chunks(out)))
        .enumerate()
        .map(|(i, (dx, (x, dy)))| {
            let c = i % g.c.max(1);
            let mut acc = vec![0f32; kk + 1];
            let b = depthwise_plane_bwd(x, &wt[c * kk..(c + 1) * kk], dy, g, dx, &mut acc[..kk]);
            acc[kk] = b;
            acc
        })
        .collect();
    dw.fill(0.0);
    db.fill(0.0);
    for (i, acc) in partial.iter().enumerate() {
        let c = i % g.c.max(1);
        for (d, a) in dw[c * kk..(c + 1) * kk].iter_mut().zip(acc) {
            *d += a;
        }
        if let Some(d) = db.get_mut(c) {
            *d += acc[kk];
        }
    }
}
