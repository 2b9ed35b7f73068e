"""The PyTorch + diffusers side of tools/cuda/device-check.sh: the same measurements as
`onestep device-check svd` on diffusers' UNetSpatioTemporalConditionModel (its default config is
SVD's; random weights), one JSON object per line.

    python3 tools/cuda/torch_svd_bench.py [--dtype bf16] [--frames 25 --height 72 --width 128]
        [--iters 2] [--train-frames 14 --train-height 40 --train-width 64 --lora-rank 64]
        [--sample-steps 25]

Sizes are latent sizes (SVD-XT at 576x1024: 72x128). Attention is diffusers' default processor
(torch's scaled_dot_product_attention, flash attention on Hopper). The LoRA step uses peft with
the same targets and rank as onestep (to_q, to_k, to_v, to_out.0). Sampling runs the same EDM
v-prediction Euler loop with SVD's frame-wise CFG ramp as onestep's sampler (UNet calls only, no
VAE or image encoder).
"""
import argparse
import json
import math
import time

import torch


def emit(**kw):
    print(json.dumps(kw), flush=True)


def karras(n, smin=0.002, smax=700.0, rho=7.0):
    r = [(smax ** (1 / rho) + i / max(n - 1, 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    return r + [0.0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--height", type=int, default=72)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--train-frames", type=int, default=14)
    p.add_argument("--train-height", type=int, default=40)
    p.add_argument("--train-width", type=int, default=64)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--full-size-train", action="store_true",
                   help="also a LoRA step at the full size with gradient checkpointing")
    a = p.parse_args()
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    import diffusers
    from diffusers import UNetSpatioTemporalConditionModel

    dev = torch.device("cuda")
    emit(check="torch_env", torch=torch.__version__, diffusers=diffusers.__version__,
         gpu=torch.cuda.get_device_name(0))
    torch.manual_seed(0)
    t0 = time.time()
    unet = UNetSpatioTemporalConditionModel().to(dev, dt)
    torch.cuda.synchronize()
    params = sum(p.numel() for p in unet.parameters())
    emit(check="svd_unet_init", dtype=a.dtype, params=params, s=time.time() - t0,
         mem_gib=torch.cuda.memory_allocated() / 2**30)

    def inputs(b, f, h, w):
        g = torch.Generator(device=dev).manual_seed(7)
        x = torch.randn(b, f, 8, h, w, device=dev, generator=g, dtype=dt)
        ts = torch.full((b,), 0.5, device=dev)
        ctx = torch.randn(b, 1, 1024, device=dev, generator=g, dtype=dt)
        ids = torch.tensor([[6.0, 127.0, 0.02]], device=dev).repeat(b, 1)
        return x, ts, ctx, ids

    def timed(fn):
        torch.cuda.synchronize()
        t = time.time()
        out = fn()
        torch.cuda.synchronize()
        return out, time.time() - t

    unet.eval()
    with torch.no_grad():
        for b in (1, 2):
            x, ts, ctx, ids = inputs(b, a.frames, a.height, a.width)
            torch.cuda.reset_peak_memory_stats()
            ms = []
            for i in range(a.iters + 1):
                _, s = timed(lambda: unet(x, ts, ctx, ids, return_dict=False)[0])
                if i > 0:
                    ms.append(s * 1e3)
            emit(check="svd_unet_forward", dtype=a.dtype, batch=b, frames=a.frames,
                 latent=[a.height, a.width], ms=ms, peak_gib=torch.cuda.max_memory_allocated() / 2**30)

        # Sampling: EDM v-prediction scalings as SVD (c_noise = 0.25 ln sigma).
        f, h, w = a.frames, a.height, a.width
        g = torch.Generator(device=dev).manual_seed(9)
        img = torch.randn(1, 1, 4, h, w, device=dev, generator=g)
        emb = torch.randn(1, 1, 1024, device=dev, generator=g, dtype=dt)
        ids = torch.tensor([[6.0, 127.0, 0.02]], device=dev)

        def denoise(x, sigma, image, emb, ids):
            b = x.shape[0]
            s = torch.full((b,), sigma, device=dev)
            c_in = 1 / math.sqrt(sigma**2 + 1)
            c_skip = 1 / (sigma**2 + 1)
            c_out = -sigma / math.sqrt(sigma**2 + 1)
            inp = torch.cat([x * c_in, image.expand(-1, f, -1, -1, -1)], 2).to(dt)
            out = unet(inp, 0.25 * torch.log(s), emb, ids, return_dict=False)[0].float()
            return x * c_skip + out * c_out

        def euler_cfg(steps):
            sig = karras(steps)
            x = torch.randn(1, f, 4, h, w, device=dev, generator=g) * sig[0]
            wf = torch.linspace(1.0, 3.0, f, device=dev).view(1, f, 1, 1, 1)
            image2 = torch.cat([torch.zeros_like(img), img])
            emb2 = torch.cat([torch.zeros_like(emb), emb])
            ids2 = ids.repeat(2, 1)
            for i in range(steps):
                d = denoise(torch.cat([x, x]), sig[i], image2, emb2, ids2)
                du, dc = d[:1], d[1:]
                d = du + wf * (dc - du)
                x = x + (x - d) / sig[i] * (sig[i + 1] - sig[i])
            return x

        def cm(sigma, x):  # consistency boundary scalings (sigma_min 0.002, sigma_data 0.5, scale 10)
            u = 10 * (sigma - 0.002)
            skip, out = 0.25 / (u * u + 0.25), u / math.sqrt(u * u + 0.25)
            return x * skip + denoise(x, sigma, img, emb, ids) * out

        def one_step():
            x = torch.randn(1, f, 4, h, w, device=dev, generator=g) * 700.0
            return cm(700.0, x)

        def tts():
            x = torch.randn(1, f, 4, h, w, device=dev, generator=g) * 700.0
            f0 = cm(700.0, x)
            eps = (x - f0) / 700.0
            x1 = f0 + (torch.randn_like(x) + eps) * 0.5
            return cm(1.0, x1)

        for name, fn, nfe in [("consistency_1_step", one_step, 1), ("time_travel", tts, 2),
                              ("euler_cfg", lambda: euler_cfg(a.sample_steps), 2 * a.sample_steps)]:
            torch.cuda.reset_peak_memory_stats()
            _, s = timed(fn)
            emit(check="svd_sampling", sampler=name, steps=a.sample_steps if name == "euler_cfg" else 1,
                 nfe=nfe, dtype=a.dtype, frames=f, latent=[h, w], s=s,
                 peak_gib=torch.cuda.max_memory_allocated() / 2**30)

    # LoRA training step (forward, MSE backward, AdamW on the adapters).
    from peft import LoraConfig, get_peft_model

    unet.train()
    model = get_peft_model(unet, LoraConfig(r=a.lora_rank, lora_alpha=a.lora_rank,
                                            target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p_ in trainable:
        p_.data = p_.data.float()
    opt = torch.optim.AdamW(trainable, lr=1e-4)

    def train_rows(f, h, w, checkpointing):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        x, ts, ctx, ids = inputs(1, f, h, w)
        target = torch.randn(1, f, 4, h, w, device=dev)
        torch.cuda.reset_peak_memory_stats()
        ms = []
        for i in range(a.iters + 1):
            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=dt):
                    out = model(x, ts, ctx, ids, return_dict=False)[0]
                loss = (out.float() - target).pow(2).mean()
                loss.backward()
                opt.step()
                return loss.item()
            loss, s = timed(step)
            if i > 0:
                ms.append(s * 1e3)
        emit(check="svd_lora_train_step", dtype=a.dtype, lora_rank=a.lora_rank,
             trainable_params=sum(p.numel() for p in trainable), frames=f, latent=[h, w],
             gradient_checkpointing=checkpointing, ms=ms, loss=loss,
             peak_gib=torch.cuda.max_memory_allocated() / 2**30)

    train_rows(a.train_frames, a.train_height, a.train_width, False)
    if a.full_size_train:
        try:
            train_rows(a.frames, a.height, a.width, True)
        except torch.OutOfMemoryError as e:
            emit(check="svd_lora_train_step", frames=a.frames, gradient_checkpointing=True, error=str(e)[:200])


if __name__ == "__main__":
    main()
