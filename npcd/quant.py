"""An int8 LM head for CPUs without native bf16 (`quantize: lm_head_int8`).

Why the LM head: it is a [576 -> 49152] projection, 21% of this model's
weights, and on an AVX2 CPU fp32 is the only fast dtype. Every generated
token pays for it: at batch 32 it took 50 ms of a ~280 ms decode step, at
batch 1 16 ms, mostly reading 113 MB of fp32 weights. fbgemm's dynamic int8
GEMM (activations quantized per call, weights per output row, int32
accumulation) reads a quarter of the bytes and does it in 10 ms and 1.6 ms.

Why only the LM head: the decoder layers' activations carry outlier
channels (inputs to down_proj reach |x| ~ 3000 here), and per-tensor int8
activations wreck them: quantizing every projection this way moved the
next-token distribution by a KL of ~2.7 nats, and even with SmoothQuant-style
rescaling by ~0.2. The final norm's output has no such outliers: the int8 head
alone moves it by ~0.01 nats and agrees on the top token ~97% of the time
(measured on the bundled model by `tests/test_quant.py`, which pins the bound).
Embeddings, layers, attention, KV cache and LoRA deltas stay in fp32.
"""

from __future__ import annotations

import warnings

import torch

QUANTIZE_MODES = ("none", "lm_head_int8", "auto")  # auto: lm_head_int8 on a CPU without native bf16, else none


def supported() -> bool:
    """Whether this torch build has the x86/fbgemm dynamic int8 linear."""
    return bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def pack_int8(weight: torch.Tensor) -> torch.ScriptObject:
    """[out, in] fp32 weight -> fbgemm packed int8 weight, symmetric per output row."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
    zero_points = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are marked deprecated; the pinned torch has them
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)


def int8_linear(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """x @ W^T with W int8 and x quantized per call over its full 8-bit range."""
    return torch.ops.quantized.linear_dynamic(x, packed, False)
