"""Base weights as the forward pass reads them: dense (fp32, bf16) or block-quantized (int8, int4).

`weights:` in the engine YAML picks one mode for the decoder projections and the LM head:

  fp32  every projection an fp32 `F.linear` (the reference mode; the PEFT comparisons run in it)
  bf16  bf16 weights and activations (CPUs with native bf16, CUDA)
  int8  Q8_0: int8 weights with one fp32 scale per 32 inputs, for projections and LM head
  int4  Q4_1: 4-bit weights with a scale and a minimum per 32 inputs for the projections; the LM head in Q8_0

The two block modes run npcd's kernel (npcd/engine/kernels/blockq.cpp), which
quantizes each row's activations to int8 per block of 32 and accumulates in
int32 per block: GGML's Q4_1 x Q8_1 and Q8_0 x Q8_0 arithmetic. Why these
formats: the bundled model *is* a Q4_1 GGUF with a Q8_0 token embedding, so
re-quantizing its dequantized weights recovers them exactly (tested), and the only
loss is the activations' int8 rounding. Measured on the bundled model over 4 chat
prompts (tests/engine/test_quant.py pins the gate, KL <= 0.02, top-1 >= 95%):
int4 KL 0.005 nats/token, top-1 agreement 96.8%; int8 KL 0.009, 97.4%.

Why per-block activation scales: one scale per call (fbgemm's dynamic int8) let the
outlier channels of the down projection's input (|x| ~ 3000) wipe out the rest,
moving the next-token distribution by ~2.7 nats, and made a row's result depend on
its batch companions. With a scale per row and block, every output element is
computed from its own row alone in a fixed order, so a line's text is the same
alone and batched (bit-identical logits; tested).

One step's 210 projection GEMMs, ms (batch 1 / 8 / 32; bench/projections.py prints these
for any machine): on the 2-core AVX2 EPYC fp32 `F.linear` 43.8 / 57.6 / 136, int4
kernel 9.5 / 35.6 / 103, int8 kernel 10.0 / 32.2 / 111; on the 2-core Zen 4, whose
build runs the AVX-512 VNNI path, fp32 28.6 / 33.1 / 62.7, bf16 (native there)
11.5 / 12.7 / 19.5, int4 3.0-3.5 / 6.7-7.8 / 20-22, int8 4.7-4.8 / 10.4-12 / 22-27; on the
2-core Sapphire Rapids, whose build runs the AMX tiles, fp32 21.9 / 52.6 / 77.2, bf16
21.4 / 21.1 / 26.0, int4 4.3 / 7.4 / 17.8 (the VNNI build there: 4.9 / 9.3 / 25.4), int8
7.1 / 8.3 / 12.9 (VNNI: 6.9 / 13.1 / 26.8).

The LoRA deltas are computed on top of the quantized base (QLoRA-style serving), in the block
modes over int8 adapter weights with a scale per column and int8 inputs with a scale per row and
block of 32, summed exactly per block and in fp32 across blocks (`lora_dtype`; npcd.engine.lora,
npcd/engine/kernels/lora.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from npcd.engine.kernels import LoadedKernel, load_cpu_kernels
from npcd.engine.pages import into_huge_pages

WEIGHT_MODES = ("fp32", "bf16", "int8", "int4")
BLOCK = 32  # inputs per scale; the kernel's block


def lora_dtype(mode: str) -> torch.dtype:
    """The LoRA stacks' dtype. A rank-64 adapter on all seven modules is 19.5 M weights: 78 MB per step in fp32,
    more than the whole 4-bit base (57 MB), so 8 distinct adapters in a decode step stream 625 MB. The block
    modes keep the stacks in int8 with a scale per column (156 MB; the kernel sums in fp32 and scales once):
    on the Sapphire Rapids machine a step's 120 deltas of 8 such adapters took 13.7 / 17.2 ms at batch 8 / 32 in
    bf16 and 8.6 / 11.7 ms in int8 (the kernel alone, 2 threads). The kernel quantizes the inputs too (per row
    and block of 32) and sums each block as one integer dot product. Its rounding is small beside the 4-bit
    base's own: the shipped personas on the 4-bit base against fp32 weights and adapters, KL 0.0046 nats/token
    and top-1 97.4% with bf16 stacks, 0.0051 and 96.6% with int8 stacks over fp32 inputs (Sapphire Rapids), 0.0054
    and 97.4% for both bf16 stacks and int8 stacks over int8 inputs (Zen 4; tests/engine/test_quant.py holds it
    to the quality gate). fp32 mode keeps fp32 stacks: it is the reference the PEFT tests compare. bf16 mode keeps
    bf16, its own dtype."""
    return torch.int8 if mode in ("int8", "int4") else dense_dtype(mode)


def dense_dtype(mode: str) -> torch.dtype:
    """The activation (and dense weight) dtype of a weights mode: the block kernels take fp32."""
    return torch.bfloat16 if mode == "bf16" else torch.float32


@dataclass
class BlockWeight:
    """A [N, K] weight in a block format. q4_1: `q` [N, K/2] uint8 nibbles (byte j of a block holds
    element j low and j+16 high), `d`/`m` [N, K/32]; q8_0: `q` [N, K] int8, `d` [N, K/32], `m` empty."""

    kind: str            # "q4_1" | "q8_0"
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        if self.kind == "q4_1":
            packed = self.q.view(n, k // BLOCK, BLOCK // 2)
            q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()
            return (q * self.d.unsqueeze(-1) + self.m.unsqueeze(-1)).view(n, k)
        return (self.q.view(n, k // BLOCK, BLOCK).float() * self.d.unsqueeze(-1)).view(n, k)


def quantize_q4_1(weight: torch.Tensor) -> BlockWeight:
    """Per block of 32: d = (max - min) / 15, m = min, q = round((w - m) / d) in 0..15."""
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    low, high = blocks.amin(-1), blocks.amax(-1)
    d = (high - low) / 15
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = ((blocks - low.unsqueeze(-1)) / d.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
    return BlockWeight("q4_1", packed.reshape(n, k // 2).contiguous(), d.contiguous(), low.contiguous(), (n, k))


def quantize_q8_0(weight: torch.Tensor) -> BlockWeight:
    """Per block of 32: d = max|w| / 127, q = round(w / d) in -127..127."""
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1) / 127
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = (blocks / d.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return BlockWeight("q8_0", q.reshape(n, k).contiguous(), d.contiguous(), torch.empty(0), (n, k))


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """What the kernel does to each row of x before the dot products, as a float reference (for tests)."""
    rows, k = x.shape
    blocks = x.float().reshape(rows, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((blocks * inv).round() * (amax / 127)).reshape(rows, k)


Linear = Callable[[torch.Tensor], torch.Tensor]  # [n, K] -> [n, N]


class DenseLinear:
    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class BlockLinear:
    """x [n, K] fp32 -> [n, N] fp32 through the block kernel. The weight's bytes are kept only in the layout
    the kernel's build reads (`pack`: 8-block groups on AVX2, 16-block groups on AVX-512 VNNI, 16-channel strips on
    AMX)."""

    def __init__(self, weight: BlockWeight, kernel: LoadedKernel):
        self._op = kernel.module.linear
        self._q4 = weight.kind == "q4_1"
        self._n = weight.shape[0]
        self._q, self._sums, self._d, self._m = kernel.module.pack(weight.q, weight.d, weight.m, *weight.shape,
                                                                   self._q4)
        self.nbytes = weight.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x.contiguous(), self._q, self._sums, self._d, self._m, self._n, self._q4)

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
        """The kernel's arguments after x, for the C++ layer loop (npcd/engine/kernels/layers.cpp)."""
        return self._q, self._sums, self._d, self._m, self._n, self._q4


def gather_in_huge_pages(linears: list[Linear]) -> None:
    """Moves the packed tensors of every BlockLinear among `linears` into one buffer of huge pages
    (npcd.engine.pages says why, with the measurements)."""
    blocks = [f for f in linears if isinstance(f, BlockLinear)]
    moved = iter(into_huge_pages([t for f in blocks for t in (f._q, f._sums, f._d, f._m)]))
    for f in blocks:
        f._q, f._sums, f._d, f._m = next(moved), next(moved), next(moved), next(moved)


class WeightFactory:
    """Turns dense [N, K] weights into the mode's linears; says which kernel each part got."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {mode!r}")
        self.mode, self.device, self.dtype = mode, device, dense_dtype(mode)
        self.kernel: LoadedKernel | None = None
        if mode in ("int8", "int4"):
            from npcd.engine.kernels import why_unavailable

            if device.type != "cpu":
                raise RuntimeError(f"weights: {mode} runs on the CPU only (npcd's block kernel); "
                                   f"use bf16 on {device}")
            self.kernel = load_cpu_kernels()
            if self.kernel is None:
                raise RuntimeError(f"weights: {mode} needs npcd's block kernel, which cannot be built here: "
                                   f"{why_unavailable()}; use weights: fp32 or auto")
        # the fused glue between projections takes fp32 on the CPU: used in fp32 mode too where it builds
        self.cpu_kernels = self.kernel or (load_cpu_kernels() if device.type == "cpu" and mode == "fp32" else None)
        self.fallbacks = 0  # block-mode weights whose K is not a multiple of 32 (kept dense)

    def linear(self, weight: torch.Tensor, kind: str) -> Linear:
        """`kind`: "q4_1" or "q8_0", the block format this weight gets in a block mode."""
        if self.kernel is None:
            return DenseLinear(weight.to(device=self.device, dtype=self.dtype).contiguous())
        if weight.shape[1] % BLOCK:
            self.fallbacks += 1
            return DenseLinear(weight.to(device=self.device, dtype=torch.float32).contiguous())
        quantize = quantize_q4_1 if kind == "q4_1" else quantize_q8_0
        return BlockLinear(quantize(weight), self.kernel)

    def projection(self, weight: torch.Tensor) -> Linear:
        return self.linear(weight, "q4_1" if self.mode == "int4" else "q8_0")

    def head(self, weight: torch.Tensor) -> Linear:
        return self.linear(weight, "q8_0")

    def describe(self) -> dict[str, str]:
        if self.kernel is None:
            dense = f"{self.mode} linear"
            return {"projections": dense, "lm_head": dense}
        flags = " ".join(f.removeprefix("-m") for f in self.kernel.flags)
        activations = (f"int8 activations per row and block of 32, npcd blockq kernel "
                       f"({self.kernel.module.path()}; {flags})")
        proj = "q4_1" if self.mode == "int4" else "q8_0"
        note = f"; {self.fallbacks} weights kept fp32 (inputs not a multiple of 32)" if self.fallbacks else ""
        if self.kernel.skipped:  # a wider build that did not compile or run here: say so, it costs speed
            note += f"; passed over: {'; '.join(self.kernel.skipped)}"
        return {"projections": f"{proj} weights x {activations}{note}", "lm_head": f"q8_0 weights x {activations}"}
