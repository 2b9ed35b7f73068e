"""A plain conv autoencoder (no ResNet blocks, no attention) with no GroupNorm, GroupNorm(32) or
GroupNorm(8), same data and optimiser as vae_torch.py: shows that 32 groups on 32-64 channels is
what stalls learning.

    python tools/investigations/simple_ae.py results/cache/<data stage>/train.safetensors none|g32|g8
"""
import sys, time, torch, numpy as np, torch.nn as nn
from safetensors.numpy import load_file
torch.manual_seed(0); torch.set_num_threads(2)
d = load_file(sys.argv[1])['clips']
norm = sys.argv[2]
def N(c): return nn.GroupNorm(32 if norm=='g32' else 8, c) if norm!='none' else nn.Identity()
enc = nn.Sequential(nn.Conv2d(3,32,3,1,1), N(32), nn.SiLU(), nn.Conv2d(32,64,3,2,1), N(64), nn.SiLU(), nn.Conv2d(64,64,3,2,1), N(64), nn.SiLU(), nn.Conv2d(64,4,3,1,1))
dec = nn.Sequential(nn.Conv2d(4,64,3,1,1), N(64), nn.SiLU(), nn.Upsample(scale_factor=2), nn.Conv2d(64,64,3,1,1), N(64), nn.SiLU(), nn.Upsample(scale_factor=2), nn.Conv2d(64,32,3,1,1), N(32), nn.SiLU(), nn.Conv2d(32,3,3,1,1))
ps = list(enc.parameters())+list(dec.parameters())
opt = torch.optim.AdamW(ps, lr=1e-3)
rng = np.random.default_rng(0); acc=[]; t0=time.time()
for s in range(600):
    idx = rng.integers(0, len(d), 2); st = rng.integers(0, 5, 2)
    x = np.stack([d[i, j:j+4] for i,j in zip(idx,st)])
    x = torch.tensor(x).permute(0,1,4,2,3).float().reshape(8,3,32,32)/127.5-1
    xr = dec(enc(x)); l = (xr-x).abs().mean()
    opt.zero_grad(); l.backward(); opt.step(); acc.append(l.item())
    if (s+1)%100==0: print(s+1, np.mean(acc[-100:]), f"{time.time()-t0:.0f}s", flush=True)
