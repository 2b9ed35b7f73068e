"""A filmstrip of the same conditioning frames under several evaluated methods.

Reads the `generated.safetensors` of `fvd` stages (onestep ClipSet files: `clips` u8
[n, t, h, w, 3]) and the real test clips of the data stage, and writes one PNG: for each of the
first K clips, one row per set (real first), frames left to right, 4 px gaps between clips.

    python tools/figures/eval_strip.py OUT.png K real=results/cache/<data>/test.safetensors \
        teacher=results/cache/<eval_teacher>/generated.safetensors ...
(numpy, safetensors and Pillow)
"""
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

out, k, sets = sys.argv[1], int(sys.argv[2]), [a.split("=", 1) for a in sys.argv[3:]]
clips = {name: load_file(path)["clips"] for name, path in sets}
rows = []
for i in range(k):
    for name, _ in sets:
        c = clips[name][i]  # [t, h, w, 3]
        rows.append(np.concatenate(list(c), axis=1))
    rows.append(np.zeros((4, rows[-1].shape[1], 3), np.uint8))
img = np.concatenate(rows[:-1], axis=0)
Image.fromarray(img).resize((img.shape[1] * 2, img.shape[0] * 2), Image.NEAREST).save(out)
print(out, img.shape, "rows per clip:", [n for n, _ in sets])
