"""PyTorch/diffusers side of benches/unet_step.rs: the same tiny UNet configuration, batch and
timing protocol. Prints one JSON line: {"forward_s": .., "train_step_s": .., "params": ..}.

Needs torch and diffusers (`pip install torch diffusers`); run by the Rust bench through
$ONESTEP_BENCH_PYTHON. Threads: $ONESTEP_BENCH_THREADS (default 2)."""
import json
import os
import sys
import time

import torch
from diffusers import UNetSpatioTemporalConditionModel

torch.set_num_threads(int(os.environ.get("ONESTEP_BENCH_THREADS", "2")))
b, t, hw = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (4, 16, 16)
reps = int(os.environ.get("ONESTEP_BENCH_REPS", "5"))

unet = UNetSpatioTemporalConditionModel(
    sample_size=16,
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(64, 128) if os.environ.get("ONESTEP_BENCH_PRESET") == "small" else (32, 64),
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=96,
    layers_per_block=1,
    cross_attention_dim=64,
    num_attention_heads=(2, 4),
    num_frames=16,
)
g = torch.Generator().manual_seed(0)
x = torch.randn(b, t, 8, hw, hw, generator=g)
ts = torch.full((b,), 0.1)
ehs = torch.randn(b, 1, 64, generator=g)
ids = torch.tensor([[7.0, 127.0, 0.02]] * b)
target = torch.randn(b, t, 4, hw, hw, generator=g)
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)


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
        unet(x, ts, encoder_hidden_states=ehs, added_time_ids=ids)


def step():
    opt.zero_grad()
    out = unet(x, ts, encoder_hidden_states=ehs, added_time_ids=ids).sample
    ((out - target) ** 2).mean().backward()
    opt.step()


print(json.dumps({
    "forward_s": timed(fwd),
    "train_step_s": timed(step),
    "params": sum(p.numel() for p in unet.parameters()),
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
}))
