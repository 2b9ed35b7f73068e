#!/usr/bin/env bash
# Builds onestep with candle's CUDA backend on a machine without a CUDA toolkit or GPU.
#
#   bash tools/cuda/build.sh    # -> target/cuda/release/onestep, and .cuda/carry/ for a GPU machine
#
# .cuda/carry/ is what tools/cuda/device-check.sh needs on a GPU machine without Rust or network:
# the binary stripped and xz-compressed (about 11 MB), and the diffusers wheels its PyTorch
# reference imports. Carry it with the device tool (`carry: [".cuda/carry"]`).
#
# CUDA 13.0 comes from PyPI (NVIDIA's wheels) into .cuda/ (ignored by git): nvcc, the runtime,
# cuBLAS, cuRAND and NVRTC. 13.0 is pinned because the GPU machine's driver (580) runs CUDA 13.0;
# PTX from a newer nvcc does not load there. Kernels are compiled for compute capability 9.0
# (Hopper: H100/H200); set CUDA_COMPUTE_CAP to build for another GPU.
#
# The binary links libcuda.so.1 (the driver), libcudart.so.13, libcublas(Lt).so.13,
# libcurand.so.10 and libnvrtc.so.13 by name. The driver is not on PyPI, so the link step uses a
# stub libcuda.so generated here from cudarc's bindings; at run time the GPU machine's own
# driver is found by its SONAME. The other libraries must be on LD_LIBRARY_PATH there (PyTorch's
# nvidia-* cu13 wheels hold them: tools/cuda/device-check.sh finds them).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
prefix="$root/.cuda"
py="$prefix/py"
cu="$py/nvidia/cu13"
if [ ! -x "$cu/bin/nvcc" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$py" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
"$cu/bin/nvcc" --version | tail -2

# Unversioned names for the linker (the wheels ship only the SONAME files).
for lib in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
    ln -sf "lib$lib" "$cu/lib/lib${lib%%.so.*}.so"
done

# A stub libcuda.so (SONAME libcuda.so.1) exporting every driver entry point cudarc declares.
stub="$prefix/stub"
if [ ! -f "$stub/libcuda.so" ]; then
    mkdir -p "$stub"
    cudarc=$(cargo metadata --format-version 1 --features cuda 2>/dev/null \
        | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"))')
    sys_rs="$(dirname "$cudarc")/src/driver/sys/mod.rs"
    { grep -oE "fn cu[A-Z][A-Za-z0-9_]*" "$sys_rs"; grep -oE "\bcu[A-Z][A-Za-z0-9_]*\s*\(" "$cu/include/cuda.h" | tr -d ' (' | sed 's/^/fn /'; } \
        | sed 's/^fn //' | sort -u | sed 's/.*/void &(void) {}/' > "$stub/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda_stub.c"
fi

export CUDA_HOME="$cu" CUDA_PATH="$cu"
export PATH="$cu/bin:$PATH"
export NVCC="$cu/bin/nvcc"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$stub:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
# nvcc finds its include/ and nvvm/ relative to bin/; the CCCL headers live in include/cccl.
export CPATH="$cu/include:$cu/include/cccl${CPATH:+:$CPATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$stub -L native=$cu/lib"
# A separate target dir, so that the CPU build (CI, tests) and the CUDA build never rebuild each
# other's dependencies.
cargo build --release --features cuda --target-dir target/cuda "$@"
ls -la target/cuda/release/onestep

carry="$prefix/carry"
mkdir -p "$carry"
strip -o "$carry/onestep.stripped" target/cuda/release/onestep
xz -T2 -6 -c "$carry/onestep.stripped" > "$carry/onestep.xz"
rm -f "$carry/onestep.stripped"
if ! ls "$carry"/diffusers-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp -d "$carry" diffusers==0.42.1 importlib_metadata==10.2.0
fi
ls -la "$carry"
