#!/usr/bin/env bash
# GPU offload without a GPU: builds ggmerge with llama.cpp's Vulkan backend and runs the GPU
# tests (tests/gpu.rs: whole and partial offload, experts written into device memory, A → B → A
# and restore bit-identical) and the runtime tests with every layer offloaded, on Mesa's
# software Vulkan device (lavapipe, "llvmpipe" — a Vulkan implementation running on the CPU).
#
# On a fresh Debian 12 machine (as root, Rust installed), from the repository root. Not part of
# .ci/run: the Vulkan build compiles llama.cpp's shaders (about 20–30 minutes on 2 cores). The
# build goes to target/vulkan so the default build in target/ is left alone.
#
# llama.cpp's Vulkan backend skips devices of type CPU unless told: GGML_VK_VISIBLE_DEVICES=0
# selects lavapipe. With a real GPU, unset it (or pick the GPU's index).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! dpkg -s libvulkan-dev glslc mesa-vulkan-drivers spirv-headers >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq libvulkan-dev glslc mesa-vulkan-drivers spirv-headers >/dev/null
fi
# llama.cpp's Vulkan backend needs Vulkan-Hpp headers newer than Debian 12's (1.3.239 lacks
# vk::LayerSettingEXT, VK_EXT_layer_settings, from 1.3.261 on): take the headers alone from
# Debian 13's libvulkan-dev (no library is replaced; the loader and driver stay the system's).
if ! grep -qs 'LayerSettingEXT' /usr/include/vulkan/vulkan_structs.hpp; then
  headers=$PWD/target/vulkan-headers
  if [ ! -f "$headers/usr/include/vulkan/vulkan.hpp" ]; then
    apt_dir=$(mktemp -d)
    trap 'rm -rf "$apt_dir"' EXIT
    mkdir -p "$apt_dir/lists/partial"
    # The machine's own Debian mirror (from its apt sources), suite trixie.
    mirror=$(grep -rhsoE '^(URIs:|deb)[[:space:]]+[^[:space:]]+' /etc/apt/sources.list \
      /etc/apt/sources.list.d/ | awk '{print $2}' | grep -E '/debian/?$' | head -1 || true)
    [ -n "$mirror" ] || { echo "no Debian mirror in /etc/apt: cannot fetch newer Vulkan headers" >&2; exit 1; }
    echo "deb $mirror trixie main" >"$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir" -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" download libvulkan-dev >/dev/null 2>&1)
    mkdir -p "$headers"
    dpkg-deb -x "$apt_dir"/libvulkan-dev_*.deb "$headers"
  fi
  export CPLUS_INCLUDE_PATH=$headers/usr/include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
  export C_INCLUDE_PATH=$headers/usr/include${C_INCLUDE_PATH:+:$C_INCLUDE_PATH}
fi
models=$(scripts/fetch-models.sh)
export GGMERGE_MODELS=$models
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/vulkan}
if [ -z "${GGML_VK_VISIBLE_DEVICES+x}" ] && ! ls /dev/dri/renderD* >/dev/null 2>&1; then
  export GGML_VK_VISIBLE_DEVICES=0 # no GPU here: Mesa's software device
fi
echo "Vulkan devices:"
(command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -E 'deviceName|deviceType') || true

cargo build --release --features vulkan --bins
cargo test --release --features vulkan --test gpu -- --test-threads 1
# The runtime suites with every layer offloaded (ModelOptions read GGMERGE_TEST_NGL there).
GGMERGE_TEST_NGL=all cargo test --release --features vulkan --test run --test runtime -- --test-threads 1
# The CLI end to end on the device.
target=$CARGO_TARGET_DIR/release/ggmerge
"$target" run --base "$models/SmolLM2-135M-Instruct.Q4_1.gguf" -p "The capital of France is" \
  -n 16 -c 256 -ngl all -v
echo "Vulkan: all GPU tests passed"
