"""The operators between a layer's projections: PyTorch's, or npcd's fused CPU kernels.

`TorchOps` is the reference and runs everywhere (any dtype, CUDA). `FusedOps`
calls npcd/engine/kernels/decode.cpp, one call per operator per layer instead of
~35 PyTorch operators per layer; it takes fp32 on the CPU only. Its attention
takes the step's tokens as a flat list (cache slot and position of each), so a
token's arithmetic is the same alone, batched, decoding or prefilling.
tests/engine/test_kernels.py holds the two equal within fp32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npcd.engine.kernels import LoadedKernel


class TorchOps:
    name = "torch"

    def __init__(self, eps: float):
        self.eps = eps

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def add_rms_norm(self, x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x += r in place; returns rms_norm(x)."""
        x.add_(r)
        return self.rms_norm(x, w)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    attention = None  # the model's general, per-block attention path
    lora_add = None   # npcd.engine.lora.LoraBatch's bucketed matmuls


class FusedOps(TorchOps):
    name = "npcd fused CPU kernels (norms, SiLU, rotary + cache write + attention per token)"

    def __init__(self, eps: float, kernel: LoadedKernel):
        super().__init__(eps)
        self._k = kernel.module

    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._k.rms_norm(x.contiguous(), w, self.eps)

    def add_rms_norm(self, x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._k.add_rms_norm(x, r.contiguous(), w, self.eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._k.silu_mul(gate_up)

    def lora_add(self, x: torch.Tensor, out: torch.Tensor, A: torch.Tensor, Bs: list[torch.Tensor],
                 slots: torch.Tensor, A_scale: torch.Tensor, B_scale: list[torch.Tensor]) -> None:
        """out += each row's adapter delta (npcd/engine/kernels/lora.cpp; LoraBatch's semantics); the scales
        are an int8 stack's (empty for float ones)."""
        self._k.lora_add(x, out, A, Bs, slots, A_scale, B_scale)

    def attention(self, qkv: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                  kv_heads: int) -> torch.Tensor:
        """qkv [tokens, (heads + 2 kv_heads) * hd]; slots, positions [tokens] -> [tokens, heads * hd]."""
        return self._k.attention(qkv.contiguous(), slots, positions, cos, sin, k_cache, v_cache, heads, kv_heads,
                                 cos.shape[-1] ** -0.5)


def pick_ops(eps: float, dtype: torch.dtype, device: torch.device, kernel: LoadedKernel | None) -> TorchOps:
    if kernel is not None and dtype == torch.float32 and device.type == "cpu":
        return FusedOps(eps, kernel)
    return TorchOps(eps)
