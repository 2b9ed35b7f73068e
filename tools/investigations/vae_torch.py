"""Why the tiny SVD VAE learns slowly (issue 3): diffusers' AutoencoderKLTemporalDecoder trained in PyTorch
on onestep's synthetic clips with onestep's recipe (AdamW lr, warm-up 50, grad clip 1, L1 + 1e-6 KL,
2 clips x 4 frames). Prints the mean L1 (pixels in [-1, 1]) every 50 steps.

    python tools/investigations/vae_torch.py results/cache/<data stage>/train.safetensors STEPS LR ['{"block_out_channels": [64, 64, 64]}']

Options in the JSON: diffusers config keys, and _mode (decode the posterior mean), _plain (2-D
AutoencoderKL), _l2, _noclip, _bs. Numbers quoted in results/teacher-tiny/README.md (torch 2.15.0,
diffusers 0.42.1, 2 threads).
"""
import sys, time, torch, numpy as np
from safetensors.numpy import load_file
from diffusers import AutoencoderKLTemporalDecoder
torch.manual_seed(0); torch.set_num_threads(2)
d = load_file(sys.argv[1])['clips']
steps = int(sys.argv[2]); lr=float(sys.argv[3])
import json
kw = json.loads(sys.argv[4]) if len(sys.argv)>4 else {}
mode = kw.pop('_mode', False); l2 = kw.pop('_l2', False); noclip = kw.pop('_noclip', False); bs = kw.pop('_bs', 2); plain = kw.pop('_plain', False)
boc = kw.pop('block_out_channels',[32,64,64])
from diffusers import AutoencoderKL
vae = (AutoencoderKL if plain else AutoencoderKLTemporalDecoder)(down_block_types=["DownEncoderBlock2D"]*len(boc), block_out_channels=boc, layers_per_block=1, sample_size=64, **kw)
lat = 32//(2**(len(boc)-1)); lc = kw.get('latent_channels',4)
opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.01)
rng = np.random.default_rng(0)
t0=time.time(); acc=[]
for s in range(steps):
    idx = rng.integers(0, len(d), bs); st = rng.integers(0, 5, bs)
    x = np.stack([d[i, j:j+4] for i,j in zip(idx,st)])
    x = torch.tensor(x).permute(0,1,4,2,3).float().reshape(bs*4,3,32,32)/127.5-1
    post = vae.encode(x).latent_dist
    z = post.mode() if mode else post.sample()
    xr = vae.decode(z).sample if plain else vae.decode(z, num_frames=4).sample
    rec = ((xr-x)**2).mean() if l2 else (xr-x).abs().mean()
    l1 = (xr-x).abs().mean()
    kl = post.kl().mean()/(lc*lat*lat)
    loss = rec + 1e-6*kl
    opt.zero_grad(); loss.backward()
    None if noclip else torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    for g in opt.param_groups: g['lr'] = lr*min(1,(s+1)/50)
    opt.step(); acc.append(l1.item())
    if (s+1)%50==0: print(s+1, np.mean(acc[-50:]), f"{time.time()-t0:.0f}s", flush=True)
