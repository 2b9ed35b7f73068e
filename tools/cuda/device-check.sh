#!/usr/bin/env bash
# The GPU check of issue 16, one command for a GPU machine with no Rust and no network:
#
#   bash tools/cuda/device-check.sh [OUT_DIR]        # default: $OUT, else ./device-check-out
#
# Needs, from this machine (see tools/cuda/build.sh, which prepares them):
#   .cuda/carry/onestep.xz       the CUDA build of onestep (stripped, xz)
#   .cuda/carry/*.whl            diffusers and importlib_metadata (the reference side)
# and on the GPU machine: an NVIDIA driver for CUDA 13, python3 with PyTorch built for CUDA 13
# (its nvidia-* wheels provide libcudart/cublas/curand/nvrtc for onestep too) and peft.
#
# Sections (SECTIONS="parity toy torch svd toycpu", the default), each under its own time limit
# so that one failure does not hide the others, all within TOTAL seconds (default 480):
#   parity  CPU vs CUDA on the same random tiny models (UNet forward and gradients, single ops'
#           gradients, VAE, 4 guided Euler steps), f32 and bf16/f16; I3D with random weights
#           (CPU kernels vs the candle ops the fvd stage runs on CUDA, and clips/s of each);
#           diffusers' tiny SVD folder
#           (tests/fixtures/svd_pipeline) against diffusers' frames on both devices
#   toy     tools/cuda/toy.toml end to end with --device cuda (autoencoder -> teacher ->
#           consistency -> LGP -> ACD -> SF-V GAN), a Time-Travel sample generated on CUDA, and
#           the diffusers SVD folder through `generate` in bf16
#   torch   PyTorch + diffusers: full-size SVD-XT UNet forward, sampling, LoRA steps
#   svd     the same with onestep (bf16)
#   svdtrain  onestep's LoRA step with gradient checkpointing at 14 x 40x64 and at full size
#   toycpu  the toy pipeline on the CPU, and its losses beside CUDA's
# Peak GPU memory per section is sampled with nvidia-smi every 100 ms (it includes the CUDA
# context). At most 7 files are written to OUT_DIR (the device tool brings back 8).
# Results of the first run: results/cuda-h200/README.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-device-check-out}}"
mkdir -p "$out"
log="$out/device-check.log"
exec > >(tee -a "$log") 2>&1
t_start=$(date +%s)
section() { echo; echo "=== $1 (t = $(( $(date +%s) - t_start )) s)"; }
# SECTIONS picks sections (default all: "parity toy torch svd svdtrain toycpu").
SECTIONS=" ${SECTIONS:-parity toy torch svd svdtrain toycpu} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
# Every section's limit is cut to what is left of TOTAL seconds (default 480, 8 minutes).
TOTAL=${TOTAL:-480}
lim() {
    local left=$(( TOTAL - ($(date +%s) - t_start) ))
    [ "$left" -lt 5 ] && left=5
    echo $(( $1 < left ? $1 : left ))
}

# Frames and sizes of the full-size section (latent sizes; SVD-XT at 576x1024 is 25 x 72x128).
FRAMES=${FRAMES:-25} HEIGHT=${HEIGHT:-72} WIDTH=${WIDTH:-128}
TRAIN="--train-frames ${TRAIN_FRAMES:-14} --train-height ${TRAIN_HEIGHT:-40} --train-width ${TRAIN_WIDTH:-64} --lora-rank 64"
SAMPLE_STEPS=${SAMPLE_STEPS:-25}
SIZE="--frames $FRAMES --height $HEIGHT --width $WIDTH"

bin=.cuda/carry/onestep
if [ ! -x "$bin" ]; then
    python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$bin.xz" "$bin" \
        && chmod +x "$bin" || { echo "no $bin.xz: run tools/cuda/build.sh first"; exit 2; }
fi

# CUDA 13 user-space libraries from PyTorch's nvidia-* wheels.
libdirs=$(python3 - <<'EOF'
import glob, os
dirs = []
try:
    import nvidia
    for p in nvidia.__path__:
        dirs += [d for d in glob.glob(os.path.join(p, "*", "lib")) if os.path.isdir(d)]
except Exception:
    pass
need = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13"]
found = [d for d in dirs if any(os.path.exists(os.path.join(d, n)) for n in need)]
print(":".join(dict.fromkeys(found)))
EOF
)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# peak_mem NAME CMD...: runs CMD while nvidia-smi samples the memory in use; prints the peak.
peak_mem() {
    local name=$1; shift
    local f; f=$(mktemp)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$f" 2>/dev/null &
    local smi=$!
    local t0; t0=$(date +%s.%N)
    "$@"
    local rc=$?
    kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
    echo "{\"check\": \"peak_gpu_memory\", \"section\": \"$name\", \"rc\": $rc, \"wall_s\": $(python3 -c "import time; print(round(time.time() - $t0, 1))"), \"peak_mib\": $(sort -n "$f" | tail -1 | tr -d ' ' || echo null)}"
    rm -f "$f"
    return $rc
}

section "1. env"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
ldd "$bin" | grep -E "cuda|cublas|curand|nvrtc|not found"
nproc

want parity && section "2. parity (CPU vs CUDA, tiny random models)"
want parity && peak_mem parity timeout "$(lim 60)" "$bin" device-check parity | tee "$out/parity.jsonl"

section "3. toy pipeline on CUDA"
toy=$(mktemp -d)
toy_run() {
    local dev=$1 limit=$2
    peak_mem "toy-$dev" timeout "$(lim "$limit")" "$bin" --results "$toy/$dev" --progress lines run tools/cuda/toy.toml \
        --device "$dev" > "$toy/$dev.log" 2>&1
    echo "toy on $dev: exit $? ($(grep -c '' "$toy/$dev.log") log lines)"; tail -n 25 "$toy/$dev.log"
    "$bin" --results "$toy/$dev" export --table metrics --out "$out/toy_metrics_$dev.csv" >/dev/null 2>&1
}
if want toy; then
toy_run cuda 60
acd=$(grep -l '"time_travel"' "$toy"/cuda/cache/*/onestep.json 2>/dev/null | head -1)
if [ -n "$acd" ]; then
    python3 -c "from PIL import Image; Image.new('RGB', (16, 16), (40, 120, 200)).save('$toy/in.png')"
    timeout "$(lim 20)" "$bin" --results "$toy/cuda" generate --checkpoint "$(dirname "$acd")" --image "$toy/in.png" \
        --sampler time-travel --device cuda --out "$out/toy_tts_cuda.gif"
    echo "generate (time-travel, cuda): exit $?"
fi
# A diffusers-saved SVD pipeline folder (tiny, random) through the CLI, fp16 variant, bf16.
timeout "$(lim 30)" "$bin" generate --checkpoint tests/fixtures/svd_pipeline --variant fp16 --dtype bf16 \
    --image tests/fixtures/svd_pipeline_image.png --height 16 --width 24 --device cuda --out "$toy/svd.gif"
echo "generate (diffusers SVD folder, cuda, bf16): exit $?"
fi

if want torch; then
section "4. PyTorch + diffusers, full size"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .cuda/carry/*.whl \
    && export PYTHONPATH=/tmp/site
peak_mem torch timeout "$(lim 120)" python3 tools/cuda/torch_svd_bench.py --dtype bf16 $SIZE $TRAIN \
    --sample-steps "$SAMPLE_STEPS" --full-size-train | tee "$out/torch.jsonl"
fi

if want svd; then
section "5. onestep, full size"
peak_mem onestep timeout "$(lim 300)" "$bin" device-check svd --dtype bf16 $SIZE $TRAIN \
    --sample-steps "$SAMPLE_STEPS" | tee "$out/onestep_svd.jsonl"
fi

if want svdtrain; then
section "5b. onestep LoRA steps with gradient checkpointing (PyTorch's rows: section 4)"
for size in "--train-frames 14 --train-height 40 --train-width 64" "--train-frames $FRAMES --train-height $HEIGHT --train-width $WIDTH"; do
    peak_mem onestep-checkpointed timeout "$(lim 120)" "$bin" device-check svd --dtype bf16 --skip forward,sample \
        --iters 2 --lora-rank 64 --checkpointing $size | tee -a "$out/onestep_svd.jsonl"
done
fi

if want toycpu; then
section "6. the toy pipeline on the CPU, and its losses beside CUDA's"
toy_run cpu 60
python3 - "$out" <<'PYEOF'
import csv, sys, os
out = sys.argv[1]
rows = {}
for dev in ("cuda", "cpu"):
    p = os.path.join(out, f"toy_metrics_{dev}.csv")
    if not os.path.exists(p):
        print(f"toy: no metrics from {dev}"); continue
    for r in csv.DictReader(open(p)):
        rows.setdefault((r.get("stage", ""), r.get("key"), r.get("step")), {})[dev] = float(r["value"])
both = [(k, v) for k, v in rows.items() if len(v) == 2 and k[1] and k[1].startswith("loss")]
worst = max((abs(v["cuda"] - v["cpu"]) / max(abs(v["cpu"]), 1e-12), k) for k, v in both) if both else None
print(f"toy: {len(both)} loss values logged by both devices; worst relative difference {worst}")
PYEOF
fi

section "done"
