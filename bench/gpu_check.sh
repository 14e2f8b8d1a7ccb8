#!/usr/bin/env bash
# The CUDA check, for a developer lent a machine with an NVIDIA GPU: under 8 minutes.
#   1. the engine's CUDA tests (tests/engine/test_cuda.py: PEFT logits on the GPU, bf16 against fp32)
#   2. the multi-LoRA benchmark against transformers + PEFT on the same GPU, quick workload, same table
# Needs the project's venv with a CUDA build of torch==2.13.0 (make setup TORCH_PIP_ARGS=... on that
# machine); nothing is downloaded at run time. Writes the benchmark records to $OUT (default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp}
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, '| CUDA:', torch.cuda.get_device_name() if ok else 'none'); sys.exit(0 if ok else 'no CUDA device visible to torch: install a CUDA build of torch==2.13.0 in the venv')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py
timeout 240 "$PY" bench/multilora.py --quick --systems npcd_mixed,npcd_base,peft_mixed,peft_serial,hf_generate \
    --npcd-weights auto --out "$OUT/gpu_multilora.json"
