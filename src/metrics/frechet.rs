//! Fréchet distance between Gaussians fitted to feature sets (FVD when the features are I3D
//! logits), in `f64`.
//!
//! `d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`. The trace of the square root
//! is computed in symmetric form: with a Cholesky factor `S1 = L L^T`, the eigenvalues of
//! `S1 S2` are those of the symmetric PSD matrix `L^T S2 L`, so `tr((S1 S2)^(1/2)) = sum_i
//! sqrt(max(eig_i(L^T S2 L), 0))` (eigenvalues only: Householder tridiagonalisation + the
//! implicit QL of the public-domain JAMA). Singular covariances (fewer distinct clips than
//! dimensions: small sets, and every bootstrap resample of a few hundred clips) have no Cholesky
//! factor: then the pivoted Cholesky factor `S1 = L L^T` with `L` of `d x r` (`r` the numerical
//! rank) gives the same non-zero eigenvalues from the `r x r` matrix `L^T S2 L`. No complex
//! arithmetic, nothing that fails to converge.
//!
//! With fewer clips than dimensions (a bootstrap resample of N = 32 clips against 400 I3D
//! logits), the trace comes from the clips instead, exactly: with centred data `X1`
//! (`n1 x d`) and `X2`, `S1 S2 = X1^T (X1 X2^T X2) / c` with `c = (n1 - 1)(n2 - 1)`, whose
//! non-zero eigenvalues are those of `N^T N / c` for `N = X2 X1^T` (`n2 x n1`). So
//! `tr((S1 S2)^(1/2))` is the sum of the singular values of `N` over `sqrt(c)`: an `n x n`
//! problem instead of a `d x d` one (see [`trace_sqrt_product_low_rank`]).

use crate::error::{Error, Result};

/// Mean and covariance (denominator n - 1, as `numpy.cov`) of `n` feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    pub n: usize,
    pub dim: usize,
    pub mean: Vec<f64>,
    /// Row-major `dim x dim`.
    pub cov: Vec<f64>,
    /// The centred features, row-major `n x dim` (for the low-rank trace).
    pub centered: Vec<f64>,
}

/// Fewest feature vectors from which a covariance is defined.
pub const MIN_SAMPLES: usize = 2;

impl Gaussian {
    /// Fit to `features` (one row of `dim` values per clip).
    pub fn fit(features: &[Vec<f32>], what: &str) -> Result<Self> {
        let n = features.len();
        if n < MIN_SAMPLES {
            return Err(Error::Data(format!(
                "{what}: {n} clip(s); a Fréchet distance needs at least {MIN_SAMPLES} (and far more, \
                 several hundred, for a value comparable with published FVDs)"
            )));
        }
        let dim = features[0].len();
        if let Some((i, f)) = features.iter().enumerate().find(|(_, f)| f.len() != dim) {
            return Err(Error::Data(format!(
                "{what}: feature {i} has {} values, the first has {dim}",
                f.len()
            )));
        }
        if let Some(i) = features
            .iter()
            .position(|f| f.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::Data(format!(
                "{what}: feature {i} holds a non-finite value"
            )));
        }
        let mut mean = vec![0f64; dim];
        for f in features {
            for (m, v) in mean.iter_mut().zip(f) {
                *m += *v as f64;
            }
        }
        for m in &mut mean {
            *m /= n as f64;
        }
        // Centered data [n, dim], then cov = X^T X / (n - 1) with one GEMM.
        let x: Vec<f64> = features
            .iter()
            .flat_map(|f| f.iter().zip(&mean).map(|(v, m)| *v as f64 - m))
            .collect();
        // X^T (dim x n: column stride dim, row stride 1) times X (n x dim).
        let mut cov = product(dim, dim, n, &x, (dim as isize, 1), &x, (1, dim as isize));
        let scale = 1.0 / (n as f64 - 1.0);
        cov.iter_mut().for_each(|c| *c *= scale);
        Ok(Gaussian {
            n,
            dim,
            mean,
            cov,
            centered: x,
        })
    }
}

/// Fréchet distance between two Gaussians.
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64> {
    if a.dim != b.dim {
        return Err(Error::Data(format!(
            "Fréchet distance of {}-d and {}-d features",
            a.dim, b.dim
        )));
    }
    let n = a.dim;
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y).powi(2))
        .sum();
    let tr_a: f64 = (0..n).map(|i| a.cov[i * n + i]).sum();
    let tr_b: f64 = (0..n).map(|i| b.cov[i * n + i]).sum();
    let low_rank = a.n.min(b.n) < n && a.centered.len() == a.n * n && b.centered.len() == b.n * n;
    let tr_sqrt = if low_rank {
        trace_sqrt_product_low_rank(a, b)
    } else {
        trace_sqrt_product(&a.cov, &b.cov, n)
    };
    Ok((mean_term + tr_a + tr_b - 2.0 * tr_sqrt).max(0.0))
}

/// `tr((S1 S2)^(1/2))` from the centred features of the two Gaussians: the sum of the singular
/// values of `N = X2 X1^T` (`n2 x n1`), over `sqrt(c)` with `c = (n1 - 1)(n2 - 1)` (the
/// eigenvalues of `N^T N / c` are those of `S1 S2`). Singular values come from one-sided Jacobi
/// ([`singular_values`]), so the zero ones of a singular `N` come out at `eps` times the
/// largest, not at `sqrt(eps)` as square roots of `N^T N`'s eigenvalues would: the distance of
/// a set to itself stays at rounding level. Equal to [`trace_sqrt_product`] of their
/// covariances, at `O(n1 n2 d + min(n1, n2)^3)` instead of `O(d^3)`.
pub fn trace_sqrt_product_low_rank(a: &Gaussian, b: &Gaussian) -> f64 {
    let (n1, n2) = (a.n, b.n);
    let nm = gemm_abt(&b.centered, &a.centered, n2, n1, a.dim);
    let c = (n1 as f64 - 1.0) * (n2 as f64 - 1.0);
    singular_values(&nm, n2, n1).iter().sum::<f64>() / c.sqrt()
}

/// Singular values of a row-major `m x n` matrix by one-sided Jacobi (Hestenes): columns are
/// rotated pairwise until orthogonal, and their norms are the singular values. Accurate to
/// `eps` times the largest singular value; meant for small matrices (tens of rows).
pub fn singular_values(a: &[f64], m: usize, n: usize) -> Vec<f64> {
    // Columns of A, or of A^T when that has fewer: the same singular values.
    let (rows, cols) = if n <= m { (m, n) } else { (n, m) };
    let mut c: Vec<Vec<f64>> = (0..cols)
        .map(|j| {
            (0..rows)
                .map(|i| if n <= m { a[i * n + j] } else { a[j * n + i] })
                .collect()
        })
        .collect();
    // Squared column norms, carried through the rotations (recomputed at each sweep's start so
    // that no drift accumulates): one pass per pair for the inner product, one for a rotation.
    let mut norms: Vec<f64> = c.iter().map(|x| dot4(x, x)).collect();
    for sweep in 0..80 {
        if sweep > 0 {
            norms = c.iter().map(|x| dot4(x, x)).collect();
        }
        let mut rotated = false;
        for p in 0..cols {
            for q in p + 1..cols {
                let (alpha, beta) = (norms[p], norms[q]);
                if alpha == 0.0 || beta == 0.0 {
                    continue;
                }
                let gamma = dot4(&c[p], &c[q]);
                if gamma.abs() <= 1e-15 * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let cs = 1.0 / (1.0 + t * t).sqrt();
                let sn = cs * t;
                let (lo, hi) = c.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (u, v) = (*x, *y);
                    *x = cs * u - sn * v;
                    *y = sn * u + cs * v;
                }
                // The rotation that zeroes gamma moves t * gamma of squared norm from p to q.
                norms[p] = alpha - t * gamma;
                norms[q] = beta + t * gamma;
            }
        }
        if !rotated {
            break;
        }
    }
    c.iter().map(|x| dot4(x, x).sqrt()).collect()
}

/// `A B^T` for row-major `A` (`m x k`) and `B` (`n x k`): `m x n`.
fn gemm_abt(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    // B^T is k x n with column stride k and row stride 1.
    product(m, n, k, a, (1, k as isize), b, (k as isize, 1))
}

/// `X Y` into a new row-major `m x n` matrix, `X` (`m x k`) and `Y` (`k x n`) read through
/// their (column, row) strides.
fn product(
    m: usize,
    n: usize,
    k: usize,
    x: &[f64],
    (xcs, xrs): (isize, isize),
    y: &[f64],
    (ycs, yrs): (isize, isize),
) -> Vec<f64> {
    let reach = |(cs, rs): (isize, isize), rows: usize, cols: usize| {
        (rows.saturating_sub(1) as isize * rs + cols.saturating_sub(1) as isize * cs) as usize
    };
    assert!(
        reach((xcs, xrs), m, k) < x.len().max(1) && reach((ycs, yrs), k, n) < y.len().max(1),
        "product: strides reach past the matrices"
    );
    let mut out = vec![0f64; m * n];
    // SAFETY: out is m x n row-major; x and y are read within their lengths (asserted above).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            xcs,
            xrs,
            y.as_ptr(),
            ycs,
            yrs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
    out
}

/// `tr((A B)^(1/2))` for symmetric PSD `A`, `B` (row-major `n x n`).
///
/// When `A` (or else `B`) has a Cholesky factor `L`, the eigenvalues of `A B` are those of the
/// symmetric `L^T B L`, and only its eigenvalues are needed. Singular covariances (fewer
/// distinct clips than feature dimensions, as every bootstrap resample of a few hundred clips
/// is) have no Cholesky factor; then the pivoted one ([`pivoted_cholesky`]) gives `A = L L^T`
/// with `L` of `n x r`, `r` the numerical rank, and the non-zero eigenvalues of `A B` are those
/// of the `r x r` matrix `L^T B L`: `O(n^2 r)` instead of a full eigendecomposition's `9 n^3`,
/// and the null space of `A` contributes no rounding-level eigenvalues to the square roots.
pub fn trace_sqrt_product(a: &[f64], b: &[f64], n: usize) -> f64 {
    let (m, r) = match cholesky(a, n)
        .map(|l| (l, b))
        .or_else(|| cholesky(b, n).map(|l| (l, a)))
    {
        Some((l, other)) => {
            let ol = matmul(other, false, &l, false, n);
            (matmul(&l, true, &ol, false, n), n)
        }
        None => {
            let scale = (0..n).map(|i| a[i * n + i]).fold(0.0, f64::max);
            let (l, r) = pivoted_cholesky(a, n, n as f64 * f64::EPSILON * scale);
            let (ni, ri) = (n as isize, r as isize);
            // B L (n x r), then L^T (B L) (r x r).
            let bl = product(n, r, n, b, (1, ni), &l, (1, ri));
            (product(r, r, n, &l, (ri, 1), &bl, (1, ri)), r)
        }
    };
    symmetric_eigenvalues(&m, r)
        .iter()
        .map(|l| l.max(0.0).sqrt())
        .sum()
}

/// `A = L L^T` for a symmetric positive semi-definite `a` (row-major `n x n`) by Cholesky with
/// diagonal pivoting (as LAPACK's `dpstrf`): each step eliminates the largest remaining
/// diagonal entry, and the factorisation stops once none exceeds `tol`. Returns `L` (row-major
/// `n x r`, rows in the original order) and the numerical rank `r`.
pub fn pivoted_cholesky(a: &[f64], n: usize, tol: f64) -> (Vec<f64>, usize) {
    // Row i of `l` holds L[i, ..k] after k steps (row-contiguous, so the updates vectorise).
    let mut l = vec![0f64; n * n];
    let mut d: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    let mut done = vec![false; n];
    let mut r = 0;
    while r < n {
        let (j, dj) = (0..n).filter(|&i| !done[i]).map(|i| (i, d[i])).fold(
            (usize::MAX, f64::NEG_INFINITY),
            |m, x| if x.1 > m.1 { x } else { m },
        );
        if !(dj > tol) || !dj.is_finite() {
            break;
        }
        done[j] = true;
        let s = dj.sqrt();
        l[j * n + r] = s;
        let lj = l[j * n..j * n + r].to_vec();
        for i in 0..n {
            if done[i] {
                continue;
            }
            let li = &l[i * n..i * n + r];
            let v = (a[i * n + j] - dot4(li, &lj)) / s;
            l[i * n + r] = v;
            d[i] -= v * v;
        }
        r += 1;
    }
    // Keep the first r columns.
    let mut out = vec![0f64; n * r];
    for i in 0..n {
        out[i * r..(i + 1) * r].copy_from_slice(&l[i * n..i * n + r]);
    }
    (out, r)
}

/// Dot product with four independent sums (vectorises; rounding differs from a single sum
/// only at `eps` level).
fn dot4(x: &[f64], y: &[f64]) -> f64 {
    let mut s = [0f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (a, b) in xc.zip(yc) {
        for k in 0..4 {
            s[k] += a[k] * b[k];
        }
    }
    (s[0] + s[1]) + (s[2] + s[3]) + tail
}

/// Lower Cholesky factor (row-major), or `None` when the matrix is not positive definite
/// (a pivot below `1e-12` times the largest diagonal entry).
pub fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let tol = 1e-12 * (0..n).map(|i| a[i * n + i]).fold(0.0, f64::max);
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (&l[i * n..i * n + j], &l[j * n..j * n + j]);
            let s = a[i * n + j] - ri.iter().zip(rj).map(|(x, y)| x * y).sum::<f64>();
            if i == j {
                if s <= tol || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

/// Eigenvalues (ascending) of a symmetric matrix (symmetrised first): Householder
/// tridiagonalisation on full row-major storage (row-contiguous, so it vectorises) and
/// JAMA's implicit QL without vectors.
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Vec<f64> {
    if n == 0 {
        return vec![];
    }
    let mut m = a.to_vec();
    for i in 0..n {
        for j in 0..i {
            let s = 0.5 * (m[i * n + j] + m[j * n + i]);
            m[i * n + j] = s;
            m[j * n + i] = s;
        }
    }
    let mut d = vec![0f64; n];
    // JAMA's convention: e[i] couples i - 1 and i, e[0] = 0.
    let mut e = vec![0f64; n];
    let mut v = vec![0f64; n];
    let mut p = vec![0f64; n];
    for k in 0..n.saturating_sub(2) {
        let lo = k + 1;
        // x = column k below the diagonal = row k right of it (symmetry).
        let x = &m[k * n + lo..k * n + n];
        let norm = x.iter().map(|t| t * t).sum::<f64>().sqrt();
        d[k] = m[k * n + k];
        if norm == 0.0 {
            e[lo] = 0.0;
            continue;
        }
        let alpha = if x[0] > 0.0 { -norm } else { norm };
        let vs = &mut v[lo..n];
        vs.copy_from_slice(x);
        vs[0] -= alpha;
        let vv: f64 = vs.iter().map(|t| t * t).sum();
        e[lo] = alpha;
        if vv == 0.0 {
            continue;
        }
        let beta = 2.0 / vv;
        // p = beta B v over the trailing block.
        for i in lo..n {
            let row = &m[i * n + lo..i * n + n];
            p[i] = beta * row.iter().zip(&v[lo..n]).map(|(a, b)| a * b).sum::<f64>();
        }
        let kk = 0.5 * beta * (lo..n).map(|i| v[i] * p[i]).sum::<f64>();
        for i in lo..n {
            p[i] -= kk * v[i];
        }
        // B -= v w^T + w v^T (w = p).
        for i in lo..n {
            let (vi, wi) = (v[i], p[i]);
            let row = &mut m[i * n + lo..i * n + n];
            for ((r, vj), wj) in row.iter_mut().zip(&v[lo..n]).zip(&p[lo..n]) {
                *r -= vi * wj + wi * vj;
            }
        }
    }
    if n >= 2 {
        d[n - 2] = m[(n - 2) * n + n - 2];
        e[n - 1] = m[(n - 1) * n + n - 2];
    }
    d[n - 1] = m[(n - 1) * n + n - 1];
    let mut none = Vec::new();
    tql2(&mut none, &mut d, &mut e, n, false);
    d
}

/// `op(x) op(y)` for square row-major matrices, `op` = transpose when the flag is set.
fn matmul(x: &[f64], tx: bool, y: &[f64], ty: bool, n: usize) -> Vec<f64> {
    let n_ = n as isize;
    let strides = |t: bool| if t { (n_, 1) } else { (1, n_) };
    product(n, n, n, x, strides(tx), y, strides(ty))
}

/// Eigenvalues (ascending) and, if `vectors`, eigenvectors (columns of a row-major matrix) of
/// a symmetric matrix. JAMA's `tred2` + `tql2`.
pub fn symmetric_eigen(a: &[f64], n: usize, vectors: bool) -> (Vec<f64>, Vec<f64>) {
    let mut v = a.to_vec();
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    if n == 0 {
        return (d, v);
    }
    tred2(&mut v, &mut d, &mut e, n, vectors);
    tql2(&mut v, &mut d, &mut e, n, vectors);
    (d, v)
}

/// Householder reduction to tridiagonal form (JAMA `tred2`, row-major `v`). Without `vectors`,
/// the transformations are not accumulated.
fn tred2(v: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize, vectors: bool) {
    for j in 0..n {
        d[j] = v[(n - 1) * n + j];
    }
    for i in (1..n).rev() {
        let mut scale = 0.0;
        let mut h = 0.0;
        for k in 0..i {
            scale += d[k].abs();
        }
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = v[(i - 1) * n + j];
                v[i * n + j] = 0.0;
                v[j * n + i] = 0.0;
            }
        } else {
            for k in 0..i {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            let mut f = d[i - 1];
            let mut g = h.sqrt();
            if f > 0.0 {
                g = -g;
            }
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for ej in e.iter_mut().take(i) {
                *ej = 0.0;
            }
            // Apply the similarity transformation to the remaining columns (v holds the lower
            // triangle of the working matrix, row j col k for k <= j).
            for j in 0..i {
                f = d[j];
                v[j * n + i] = f;
                g = e[j] + v[j * n + j] * f;
                for k in j + 1..i {
                    g += v[k * n + j] * d[k];
                    e[k] += v[k * n + j] * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            for j in 0..i {
                f = d[j];
                g = e[j];
                for k in j..i {
                    v[k * n + j] -= f * e[k] + g * d[k];
                }
                d[j] = v[(i - 1) * n + j];
                v[i * n + j] = 0.0;
            }
        }
        d[i] = h;
    }
    if vectors {
        // Accumulate transformations.
        for i in 0..n - 1 {
            v[(n - 1) * n + i] = v[i * n + i];
            v[i * n + i] = 1.0;
            let h = d[i + 1];
            if h != 0.0 {
                for k in 0..=i {
                    d[k] = v[k * n + i + 1] / h;
                }
                for j in 0..=i {
                    let mut g = 0.0;
                    for k in 0..=i {
                        g += v[k * n + i + 1] * v[k * n + j];
                    }
                    for k in 0..=i {
                        v[k * n + j] -= g * d[k];
                    }
                }
            }
            for k in 0..=i {
                v[k * n + i + 1] = 0.0;
            }
        }
        for j in 0..n {
            d[j] = v[(n - 1) * n + j];
            v[(n - 1) * n + j] = 0.0;
        }
        v[(n - 1) * n + n - 1] = 1.0;
    } else {
        for j in 0..n {
            d[j] = v[j * n + j];
        }
    }
    e[0] = 0.0;
}

/// Symmetric tridiagonal QL with implicit shifts (JAMA `tql2`); sorts ascending.
fn tql2(v: &mut [f64], d: &mut [f64], e: &mut [f64], n: usize, vectors: bool) {
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    let mut f = 0.0;
    let mut tst1: f64 = 0.0;
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n {
            if e[m].abs() <= eps * tst1 {
                break;
            }
            m += 1;
        }
        if m > l {
            loop {
                let mut g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let mut h = g - d[l];
                for di in d.iter_mut().take(n).skip(l + 2) {
                    *di -= h;
                }
                f += h;
                p = d[m];
                let mut c = 1.0;
                let mut c2 = c;
                let mut c3 = c;
                let el1 = e[l + 1];
                let mut s = 0.0;
                let mut s2 = 0.0;
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    if vectors {
                        for k in 0..n {
                            let vk = &mut v[k * n..k * n + n];
                            h = vk[i + 1];
                            vk[i + 1] = s * vk[i] + c * h;
                            vk[i] = c * vk[i] - s * h;
                        }
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    // Sort ascending (with vectors).
    for i in 0..n.saturating_sub(1) {
        let mut k = i;
        let mut p = d[i];
        for (j, dj) in d.iter().enumerate().skip(i + 1) {
            if *dj < p {
                k = j;
                p = *dj;
            }
        }
        if k != i {
            d[k] = d[i];
            d[i] = p;
            if vectors {
                for r in 0..n {
                    v.swap(r * n + i, r * n + k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_features(n: usize, d: usize, seed: u64, shift: f32) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let z: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                // correlated features
                (0..d)
                    .map(|j| z[j] + 0.5 * z[(j + 1) % d] + shift)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn eigen_reconstructs_the_matrix() {
        let g = Gaussian::fit(&random_features(50, 12, 1, 0.0), "t").unwrap();
        let n = 12;
        let (vals, vecs) = symmetric_eigen(&g.cov, n, true);
        for w in vals.windows(2) {
            assert!(w[0] <= w[1]);
        }
        for i in 0..n {
            for j in 0..n {
                let r: f64 = (0..n)
                    .map(|k| vecs[i * n + k] * vals[k] * vecs[j * n + k])
                    .sum();
                assert!((r - g.cov[i * n + j]).abs() < 1e-12, "{i} {j}");
            }
        }
        let (vals2, _) = symmetric_eigen(&g.cov, n, false);
        let vals3 = symmetric_eigenvalues(&g.cov, n);
        for ((a, b), c) in vals.iter().zip(&vals2).zip(&vals3) {
            assert!(
                (a - b).abs() < 1e-12 && (a - c).abs() < 1e-12,
                "{a} {b} {c}"
            );
        }
    }

    #[test]
    fn distance_invariants() {
        let a = Gaussian::fit(&random_features(40, 16, 2, 0.0), "a").unwrap();
        let b = Gaussian::fit(&random_features(40, 16, 3, 0.3), "b").unwrap();
        let aa = frechet_distance(&a, &a).unwrap();
        assert!(aa.abs() < 1e-9, "d(a,a) = {aa}");
        let ab = frechet_distance(&a, &b).unwrap();
        let ba = frechet_distance(&b, &a).unwrap();
        assert!(ab > 1.0);
        assert!((ab - ba).abs() < 1e-9 * ab.max(1.0), "{ab} vs {ba}");
        // Rank-deficient covariances (n < dim) work too.
        let c = Gaussian::fit(&random_features(5, 16, 4, 0.0), "c").unwrap();
        assert!(frechet_distance(&c, &c).unwrap().abs() < 1e-9);
        assert!(frechet_distance(&a, &c).unwrap().is_finite());
    }

    #[test]
    fn low_rank_trace_equals_the_covariance_one() {
        // Fewer clips than dimensions, unequal counts, repeated rows (a bootstrap resample).
        // The covariance path takes square roots of the eigenvalues of a singular d x d
        // matrix, whose zero eigenvalues come out at rounding level (1e-16 relative): each of
        // the d - rank adds up to 1e-8 of the scale. So the two agree to about 1e-7.
        let tol = 1e-7;
        for (n1, n2, d, seed) in [
            (5, 20, 16, 5),
            (12, 70, 40, 7),
            (5, 9, 16, 5),
            (32, 32, 64, 6),
            (3, 3, 4, 8),
        ] {
            let mut x = random_features(n1, d, seed, 0.0);
            x[n1 - 1] = x[0].clone();
            let a = Gaussian::fit(&x, "a").unwrap();
            let b = Gaussian::fit(&random_features(n2, d, seed + 100, 0.2), "b").unwrap();
            let full = trace_sqrt_product(&a.cov, &b.cov, d);
            let low = trace_sqrt_product_low_rank(&a, &b);
            assert!(
                (full - low).abs() < tol * full.max(1.0),
                "n1 {n1} n2 {n2} d {d}: {full} vs {low}"
            );
            let rev = trace_sqrt_product_low_rank(&b, &a);
            assert!((rev - low).abs() < tol * low.max(1.0), "{rev} vs {low}");
        }
    }

    #[test]
    fn pivoted_cholesky_finds_the_rank_and_reconstructs() {
        for (k, n, seed) in [(3, 8, 1), (12, 40, 2), (40, 40, 3), (60, 40, 4)] {
            // A = X^T X / k for X of k x n: rank min(k, n) (k - 1 after centring, as a fit).
            let x = random_features(k, n, seed, 0.3);
            let g = Gaussian::fit(&x, "x").unwrap();
            let scale = (0..n).map(|i| g.cov[i * n + i]).fold(0.0, f64::max);
            let (l, r) = pivoted_cholesky(&g.cov, n, n as f64 * f64::EPSILON * scale);
            assert_eq!(r, (k - 1).min(n), "k {k} n {n}");
            for i in 0..n {
                for j in 0..n {
                    let v: f64 = (0..r).map(|m| l[i * r + m] * l[j * r + m]).sum();
                    assert!(
                        (v - g.cov[i * n + j]).abs() < 1e-12 * scale,
                        "k {k} n {n} ({i}, {j}): {v} vs {}",
                        g.cov[i * n + j]
                    );
                }
            }
        }
        // The zero matrix has rank 0, and the trace of a product with it is 0.
        let (_, r) = pivoted_cholesky(&[0.0; 9], 3, 0.0);
        assert_eq!(r, 0);
        assert_eq!(trace_sqrt_product(&[0.0; 9], &[0.0; 9], 3), 0.0);
    }

    #[test]
    fn low_rank_distance_of_a_set_to_itself_is_at_rounding_level() {
        // Logit-like scale (tens), 3 clips of 400 values: rank 2 after centring.
        let x: Vec<Vec<f32>> = random_features(3, 400, 9, 0.0)
            .into_iter()
            .map(|r| r.into_iter().map(|v| 20.0 * v).collect())
            .collect();
        let a = Gaussian::fit(&x, "a").unwrap();
        let tr: f64 = (0..400).map(|i| a.cov[i * 400 + i]).sum();
        let d = frechet_distance(&a, &a).unwrap();
        assert!(d < 1e-10 * tr, "d(a, a) = {d}, tr = {tr}");
    }

    #[test]
    fn jacobi_singular_values_of_a_known_matrix() {
        // diag(3, 2, 0) rotated on both sides: singular values 3, 2, 0.
        let (c, s) = (0.6f64, 0.8f64);
        let u = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0];
        let v = [1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c];
        let dg = [3.0, 2.0, 0.0];
        let mut a = [0f64; 9];
        for i in 0..3 {
            for j in 0..3 {
                a[i * 3 + j] = (0..3).map(|k| u[i * 3 + k] * dg[k] * v[j * 3 + k]).sum();
            }
        }
        let mut sv = singular_values(&a, 3, 3);
        sv.sort_by(|x, y| y.total_cmp(x));
        for (got, want) in sv.iter().zip([3.0, 2.0, 0.0]) {
            assert!((got - want).abs() < 1e-14, "{sv:?}");
        }
        // A wide matrix has the singular values of its transpose.
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let wt = [1.0, 4.0, 2.0, 5.0, 3.0, 6.0];
        let (mut x, mut y) = (singular_values(&w, 2, 3), singular_values(&wt, 3, 2));
        x.sort_by(|p, q| p.total_cmp(q));
        y.sort_by(|p, q| p.total_cmp(q));
        assert!(
            x.iter().zip(&y).all(|(p, q)| (p - q).abs() < 1e-13),
            "{x:?} {y:?}"
        );
    }

    #[test]
    fn too_few_clips_is_a_clear_error() {
        let e = Gaussian::fit(&random_features(1, 4, 0, 0.0), "real clips").unwrap_err();
        assert!(e.to_string().contains("real clips: 1 clip"), "{e}");
    }
}
