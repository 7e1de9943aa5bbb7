#!/usr/bin/env bash
# Installs what building ggmerge needs on a fresh Debian machine (as root, with Rust):
#   - cmake and libclang-dev (llama-cpp-sys-2 builds llama.cpp/ggml from source with bindgen)
#   - gguf-py and numpy (the independent reference reader used by the tests), curl
# With --test, also what the tests of `ggmerge serve` use as real clients:
#   - the `openai` Python package, selenium, Debian's chromium and chromium-driver
# Idempotent: does nothing when everything is present.
set -euo pipefail
py=${PYTHON:-python3}
tests=0
[ "${1:-}" = --test ] && tests=1

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
# libclang itself (libclang.so / libclang-N.so), not libclang-cpp, which some images carry alone.
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || compgen -G "/usr/lib/llvm-*/lib/libclang-[0-9]*.so*" >/dev/null ||
  need_apt+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if [ "$tests" = 1 ]; then
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
  [ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! "$py" -c "import gguf, numpy" >/dev/null 2>&1; then
  echo "installing gguf-py (gguf==0.19.0) and numpy" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "gguf==0.19.0" numpy
fi
if [ "$tests" = 1 ] && ! "$py" -c "import openai, selenium" >/dev/null 2>&1; then
  echo "installing the openai and selenium Python packages" >&2
  "$py" -m pip install --quiet --disable-pip-version-check "openai>=1.40,<3" "selenium>=4.20,<5"
fi
