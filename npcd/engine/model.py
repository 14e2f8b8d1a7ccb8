"""A Llama decoder that reads like the paper, written for batched serving.

A step is a list of tokens from one or two blocks of rows: decode rows (one
new token each) and prefill rows (their new prompt tokens, right-padded to a
block width T). Row i of a block lives in KV-cache slot `slot_start + i`, so
a block is a contiguous view of the cache and attention never copies keys.
New keys/values are written into the cache first, then every query attends
over the cache up to its own position (a causal mask built once per step),
which covers prefill, prefill after a cached persona prefix, and decode with
one code path. Everything but attention runs once over the token list, real
tokens only: padding costs no GEMM work, and decode rows share the
projections' GEMMs with the prompts being prefilled in the same step.

Projections are fused where they share an input (q/k/v, gate/up): fewer, larger
GEMMs, and the LoRA operator (npcd.engine.lora) adds each adapter's delta into the
matching column block of the fused output. What a projection runs (fp32, bf16, or
npcd's block-quantized kernel) is the weights mode's (npcd.engine.quant); the
operators between projections are `self.ops` (npcd.engine.ops). With the fused CPU
ops, attention takes the step's tokens as one flat list with each token's cache
slot and position, so the blocks' padded grid is only used by PyTorch's path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from npcd.engine.lora import GROUPS, LoraBatch, SegmentedLoraBatch
from npcd.engine.ops import pick_ops
from npcd.engine.quant import BlockLinear, Linear, WeightFactory, gather_in_huge_pages


@dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaSpec":
        if cfg.get("model_type") not in ("llama", "mistral", "qwen2", None) and "Llama" not in str(cfg.get("architectures")):
            raise ValueError(f"unsupported model_type {cfg.get('model_type')!r}: npcd serves Llama-family decoders")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError("biased attention/MLP projections are not supported")
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} or None
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", "llama3"):
            raise ValueError(f"unsupported rope scaling {scaling!r} (default and llama3 are)")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            eos_token_ids=eos_ids,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-targetable projection."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size), "k_proj": (h, self.kv_size), "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }


@dataclass
class RowBlock:
    """Rows of a step that share a padded width T, in cache slots [slot_start, slot_start + rows).

    A decode block has T == 1; a prefill block holds right-padded new prompt
    tokens. Only attention sees the padded [rows, T] grid; `packed` maps the
    block's real tokens into it (None: every cell is real).
    """

    slot_start: int
    positions: torch.Tensor            # [rows, T] long: absolute position of each cell
    kv_len: int                        # keys to attend over: max over rows of (position of last token + 1)
    packed: torch.Tensor | None = None  # [n] long: the real tokens' cells in positions.view(-1)

    @classmethod
    def for_prompts(cls, news: list[list[int]], starts: list[int], slot_start: int,
                    device: torch.device | None = None) -> "RowBlock":
        """Rows of new tokens (row i continues at position starts[i]), padded to the longest for attention."""
        T = max(len(t) for t in news)
        lengths = torch.tensor([len(t) for t in news])
        first = torch.tensor(starts)
        packed = None
        if any(len(t) != T for t in news):
            packed = (torch.arange(T) < lengths.view(-1, 1)).view(-1).nonzero().view(-1).to(device)
        return cls(slot_start=slot_start, positions=(first.view(-1, 1) + torch.arange(T)).to(device),
                   kv_len=int((first + lengths).max()), packed=packed)

    @property
    def token_count(self) -> int:
        return self.positions.numel() if self.packed is None else self.packed.numel()


@dataclass
class StepInputs:
    """One forward step: a token list covering one or two row blocks (decode rows, then prefill rows)."""

    tokens: torch.Tensor      # [n] long: the real tokens of every block, block after block, row after row
    blocks: list[RowBlock]
    last_index: torch.Tensor  # [rows] long: each row's last token, as an index into `tokens`
    lora: LoraBatch | SegmentedLoraBatch | None = None  # routes `tokens` to adapters
    all_logits: bool = False  # logits for every token (scoring) instead of each row's last


@dataclass
class _BlockPlan:
    """What a block needs in every layer, computed once per step."""

    block: RowBlock
    tokens: slice             # its part of the step's token list
    slots: slice
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor
    write_pos: torch.Tensor
    row_index: torch.Tensor


class LayerWeights:
    __slots__ = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")

    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        """The layer's projections, in the order the forward runs them."""
        return self.qkv, self.o, self.gate_up, self.down


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.x long-context frequency scaling (smooth interpolation between bands)."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
    return torch.where(is_mid, mid, scaled)


class LlamaModel:
    """Weights plus a functional forward; no nn.Module machinery on the hot path."""

    def __init__(self, spec: LlamaSpec, weights: dict[str, torch.Tensor], mode: str,
                 device: torch.device, max_seq_len: int):
        """`mode`: the weights mode (npcd.engine.quant.WEIGHT_MODES) of the projections and the LM head."""
        factory = WeightFactory(mode, device)
        self.spec, self.mode, self.dtype, self.device = spec, mode, factory.dtype, device

        def w(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=self.dtype).contiguous()

        def cat(prefix: str, names: tuple[str, ...]) -> torch.Tensor:
            return torch.cat([weights[prefix + n + ".weight"] for n in names])

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        tied = spec.tie_word_embeddings or "lm_head.weight" not in weights
        self.head: Linear = factory.head(weights["model.embed_tokens.weight" if tied else "lm_head.weight"])
        self.layers: list[LayerWeights] = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}."
            layer = LayerWeights()
            layer.input_norm = w(p + "input_layernorm.weight")
            layer.post_norm = w(p + "post_attention_layernorm.weight")
            layer.qkv = factory.projection(cat(p + "self_attn.", ("q_proj", "k_proj", "v_proj")))
            layer.o = factory.projection(weights[p + "self_attn.o_proj.weight"])
            layer.gate_up = factory.projection(cat(p + "mlp.", ("gate_proj", "up_proj")))
            layer.down = factory.projection(weights[p + "mlp.down_proj.weight"])
            self.layers.append(layer)
        gather_in_huge_pages([self.head, *(f for layer in self.layers for f in layer.linears())])
        self.cpu_kernels = factory.cpu_kernels
        self.ops = pick_ops(spec.rms_norm_eps, self.dtype, device, factory.cpu_kernels)
        self.layer_loop = self._layer_loop()
        self._lora_set: tuple[tuple[int, int], object] | None = None  # (stacks' generation and id, LoraSet)
        self._kernels = {**factory.describe(), "glue": self.ops.name}
        self.weight_bytes = sum(f.nbytes for layer in self.layers for f in layer.linears()) + self.head.nbytes

        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
        if spec.rope_scaling:
            inv_freq = _llama3_inv_freq(inv_freq, spec.rope_scaling)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)
        self.cos = angles.cos().to(device=device, dtype=self.dtype)
        self.sin = angles.sin().to(device=device, dtype=self.dtype)
        self.key_index = torch.arange(max_seq_len, device=device)

    @classmethod
    def load(cls, model_dir: Path, mode: str, device: torch.device, max_seq_len: int) -> "LlamaModel":
        spec = LlamaSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()))
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
        weights: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    weights[key] = st.get_tensor(key)
        return cls(spec, weights, mode, device, max_seq_len)

    def kernels(self) -> dict[str, str]:
        """Which operator each part of the forward runs, as the startup log and /metrics report it."""
        return {**self._kernels,
                "attention": "per-token causal attention kernel (npcd/engine/kernels/decode.cpp)"
                             if self.ops.attention is not None else "scaled_dot_product_attention",
                "layers": "one C++ loop over the layers (npcd/engine/kernels/layers.cpp)"
                          if self.layer_loop is not None else "a Python loop over the layers",
                "lora": "segmented kernel, every sum in a fixed order (npcd/engine/kernels/lora.cpp)"
                        if self.ops.lora_add is not None else
                        f"bucketed bmm over adapter segments in {str(self.dtype).removeprefix('torch.')} "
                        "(npcd.engine.lora)"}

    def _layer_loop(self) -> object | None:
        """The C++ loop over the layers (npcd/engine/kernels/layers.cpp) where every projection is a block
        linear and the glue is the fused kernels' (the block modes); None elsewhere, where `forward` loops in
        Python. Both call the same kernels in the same order: the same logits, bit for bit (tested)."""
        blocks = [layer.linears() for layer in self.layers]
        if self.ops.attention is None or not all(isinstance(f, BlockLinear) for fs in blocks for f in fs):
            return None
        module = self.cpu_kernels.module
        layers = [(layer.input_norm, layer.post_norm, *(f.packed() for f in fs))
                  for layer, fs in zip(self.layers, blocks)]
        s = self.spec
        return module.Decoder(layers, s.rms_norm_eps, s.num_heads, s.num_kv_heads, s.head_dim ** -0.5)

    def _lora_set_of(self, lora: SegmentedLoraBatch) -> object:
        """Every layer's stacks as the C++ loop takes them, rebuilt only when the stacks change."""
        stacks = lora.stacks
        key = (stacks.generation, id(stacks.stacks))
        if self._lora_set is None or self._lora_set[0] != key:
            groups = [(g.A, g.B, g.A_scale, g.B_scale) for layer in range(stacks.num_layers)
                      for g in (stacks.stacks[(layer, name)] for name in GROUPS)]
            self._lora_set = (key, self.cpu_kernels.module.LoraSet(groups))
        return self._lora_set[1]

    # -- the forward -------------------------------------------------------

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def _plan(self, step: StepInputs, cache_len: int) -> list[_BlockPlan]:
        plans, start = [], 0
        for b in step.blocks:
            rows, T = b.positions.shape
            L = b.kv_len
            plans.append(_BlockPlan(
                block=b, tokens=slice(start, start + b.token_count), slots=slice(b.slot_start, b.slot_start + rows),
                cos=self.cos[b.positions].unsqueeze(2), sin=self.sin[b.positions].unsqueeze(2),      # [rows, T, 1, hd]
                # query t of row i sees key j iff j <= its position (stale keys of a slot's last user are beyond it)
                mask=self.key_index[:L].view(1, 1, 1, L) <= b.positions.view(rows, 1, T, 1),
                write_pos=b.positions.clamp(max=cache_len - 1),
                row_index=torch.arange(rows, device=self.device).view(rows, 1)))
            start += b.token_count
        return plans

    @staticmethod
    def _token_slots(step: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache slot and position of each of the step's tokens, in token-list order."""
        slots, positions = [], []
        for b in step.blocks:
            rows, T = b.positions.shape
            slot = (torch.arange(rows, device=b.positions.device) + b.slot_start).repeat_interleave(T)
            pos = b.positions.reshape(-1)
            if b.packed is not None:
                slot, pos = slot[b.packed], pos[b.packed]
            slots.append(slot)
            positions.append(pos)
        return torch.cat(slots), torch.cat(positions)

    def _attend(self, qkv: torch.Tensor, p: _BlockPlan, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """One block's attention: [its tokens, q+k+v] -> [its tokens, heads * head_dim]; writes its keys first."""
        s = self.spec
        hd, nh, nkv = s.head_dim, s.num_heads, s.num_kv_heads
        rows, T = p.block.positions.shape
        if p.block.packed is not None:
            qkv = qkv.new_zeros(rows * T, qkv.shape[1]).index_copy_(0, p.block.packed, qkv)
        qkv = qkv.view(rows, T, nh + 2 * nkv, hd)
        q = self._rope(qkv[:, :, :nh], p.cos, p.sin)
        k = self._rope(qkv[:, :, nh:nh + nkv], p.cos, p.sin)
        v = qkv[:, :, nh + nkv:]
        kc, vc = k_cache[p.slots], v_cache[p.slots]                     # [rows, nkv, S, hd] views
        kc[p.row_index, :, p.write_pos] = k
        vc[p.row_index, :, p.write_pos] = v
        L = p.block.kv_len
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), kc[:, :, :L], vc[:, :, :L], attn_mask=p.mask, enable_gqa=nkv != nh)
        attn = attn.transpose(1, 2).reshape(rows * T, nh * hd)
        return attn if p.block.packed is None else attn.index_select(0, p.block.packed)

    def forward(self, step: StepInputs, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Runs one step, writing new keys/values into the cache; returns fp32 logits.

        k_cache / v_cache: [layers, slots, kv_heads, max_seq_len, head_dim].
        Returns [rows, vocab] (each row's last token) or, with all_logits, [n, vocab] for every token.
        The projections, the MLP and the LoRA deltas run once over the whole token list, decode and
        prefill rows together; attention runs per block.
        """
        s, ops = self.spec, self.ops
        if ops.attention is not None:
            slots, positions = self._token_slots(step)
        else:
            plans = self._plan(step, k_cache.shape[3])
        x = F.embedding(step.tokens, self.embed)                        # [n, H]
        lora = step.lora
        if self.layer_loop is not None and not isinstance(lora, LoraBatch):
            lora_set = self._lora_set_of(lora) if lora is not None else None
            self.layer_loop.run(x, slots, positions, self.cos, self.sin, k_cache, v_cache, lora_set,
                                lora.slots if lora is not None else slots)
            return self._logits(x, step)
        h = ops.rms_norm(x, self.layers[0].input_norm)
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(h)
            if lora is not None:
                lora.add_delta(h, qkv, li, "qkv")
            if ops.attention is not None:
                attn = ops.attention(qkv, slots, positions, self.cos, self.sin, k_cache[li], v_cache[li],
                                     s.num_heads, s.num_kv_heads)
            else:
                parts = [self._attend(qkv[p.tokens], p, k_cache[li], v_cache[li]) for p in plans]
                attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            out = layer.o(attn)
            if lora is not None:
                lora.add_delta(attn, out, li, "o")
            h = ops.add_rms_norm(x, out, layer.post_norm)               # x += out

            gate_up = layer.gate_up(h)
            if lora is not None:
                lora.add_delta(h, gate_up, li, "gate_up")
            act = ops.silu_mul(gate_up)
            out = layer.down(act)
            if lora is not None:
                lora.add_delta(act, out, li, "down")
            next_norm = self.layers[li + 1].input_norm if li + 1 < len(self.layers) else None
            if next_norm is not None:
                h = ops.add_rms_norm(x, out, next_norm)
            else:
                x.add_(out)

        return self._logits(x, step)

    def _logits(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        if step.all_logits:
            return self.head(self.ops.rms_norm(x, self.norm)).float()
        return self.head(self.ops.rms_norm(x.index_select(0, step.last_index), self.norm)).float()

