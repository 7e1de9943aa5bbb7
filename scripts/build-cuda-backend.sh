#!/usr/bin/env bash
# Adds llama.cpp's CUDA backend to the portable build (scripts/build-portable.sh): compiles
# ggml's CUDA backend as a loadable library (libggml-cuda.so) from the same llama.cpp source
# the binary was built from, and puts it in target/portable/dist/, where ggml finds it at start
# beside the CPU variants. Then `-ngl all` offloads to the NVIDIA GPU:
#
#   LD_LIBRARY_PATH=target/portable/dist target/portable/dist/ggmerge run --base M.gguf -p Hi -ngl all -v
#
# Needs the CUDA toolkit (nvcc, cuBLAS; CUDA 12 or 13), CMake and a C++ compiler; no GPU is
# needed to build. This is how the GPU suites ran on an NVIDIA H200 (README, "GPU offload"):
# there, with 16 cores and CUDA_ARCHITECTURES=90 GGML_CUDA_FA=OFF, the build took about 2 minutes.
#
#   CUDA_ARCHITECTURES  CMake's CUDA architectures (e.g. 90 for H100/H200, 89 for RTX 40xx,
#                       "native" for the GPU of this machine); default: ggml's own list (slower)
#   GGML_CUDA_FA        OFF skips the flash-attention kernels (a much shorter build; llama.cpp
#                       then runs attention without them); default ON
#   JOBS                parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
dist=target/portable/dist
[ -x "$dist/ggmerge" ] || { echo "no portable build in $dist: run scripts/build-portable.sh first" >&2; exit 1; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] ||
  { echo "nvcc not found: install the CUDA toolkit (or put its bin/ on PATH)" >&2; exit 1; }
export PATH=$PATH:/usr/local/cuda/bin

# The llama.cpp source cargo built the binary from (the llama-cpp-sys-2 crate's copy).
manifest=$(cargo metadata --format-version 1 --locked | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "llama-cpp-sys-2"))')
src=$(dirname "$manifest")/llama.cpp/ggml
[ -f "$src/CMakeLists.txt" ] || { echo "no ggml source at $src" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$src" "$work/ggml"
# The crate does not ship ggml's pkg-config template, which ggml's CMakeLists configures.
touch "$work/ggml/ggml.pc.in"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$work/ggml" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_BACKEND_DL=ON -DGGML_NATIVE=OFF -DGGML_CUDA=ON \
  -DGGML_CUDA_NCCL=OFF -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF \
  -DGGML_CUDA_FA="${GGML_CUDA_FA:-ON}" \
  ${CUDA_ARCHITECTURES:+-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES}
cmake --build "$work/build" --target ggml-cuda -j "${JOBS:-$(nproc)}"
lib=$(find "$work/build" -name libggml-cuda.so | head -1)
[ -n "$lib" ] || { echo "the build made no libggml-cuda.so" >&2; exit 1; }
cp "$lib" "$dist/"
echo "CUDA backend in $dist/libggml-cuda.so: LD_LIBRARY_PATH=$dist $dist/ggmerge run … -ngl all -v"
echo "lists the devices and shows the layers on CUDA0"
