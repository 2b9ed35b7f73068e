"""PyTorch/diffusers side of benches/vae_step.rs: the same tiny AutoencoderKLTemporalDecoder
(`VaeConfig::tiny()`: block channels 32/64/64, one layer per block, 4 latent channels), batch and
timing protocol. Prints one JSON line: {"forward_s": .., "train_step_s": .., "params": ..}.

Needs torch and diffusers; run by the Rust bench through $ONESTEP_BENCH_PYTHON.
Threads: $ONESTEP_BENCH_THREADS (default 2). Args: frames size."""
import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKLTemporalDecoder

torch.set_num_threads(int(os.environ.get("ONESTEP_BENCH_THREADS", "2")))
t, hw = (int(x) for x in sys.argv[1:3]) if len(sys.argv) > 2 else (16, 64)
reps = int(os.environ.get("ONESTEP_BENCH_REPS", "3"))

vae = AutoencoderKLTemporalDecoder(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=hw,
)
g = torch.Generator().manual_seed(0)
x = torch.rand(t, 3, hw, hw, generator=g) * 2 - 1
opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)


def timed(fn):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - s)
    return best


def fwd():
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        vae.decode(z, num_frames=t)


def step():
    opt.zero_grad()
    z = vae.encode(x).latent_dist.mean
    out = vae.decode(z, num_frames=t).sample
    ((out - x) ** 2).mean().backward()
    opt.step()


print(json.dumps({
    "forward_s": timed(fwd),
    "train_step_s": timed(step),
    "params": sum(p.numel() for p in vae.parameters()),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
}))
