"""PEFT LoRA adapters: reading, validating against the base, and keeping them resident.

An adapter is read and checked on the caller's thread (so a bad file never
stalls generation), then handed to the engine thread, which owns the weight
stacks. Each load creates a new *version*: requests bind to the version that
was current when they were submitted, so replacing a persona's adapter never
changes a line that is already being spoken. A bounded number of versions is
resident in the stacks; the least recently used one that no running request
holds is evicted, and brought back from its host copy when needed again.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from npcd.engine.api import AdapterError, AdapterInfo
from npcd.engine.lora import LoraStacks

_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully fine-tuned modules) are not supported",
    # an activated LoRA applies from its invocation tokens on; npcd would apply it to every token
    "alora_invocation_tokens": "aLoRA adapters (alora_invocation_tokens) are not supported",
}
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha's default: what PEFT uses when a config omits it
_GROUP = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class AdapterVersion:
    name: str
    version: int
    info: AdapterInfo
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> (A, B*scale)
    slot: int | None = None     # resident slot, or None
    users: int = 0              # running requests bound to this version
    last_used: int = 0
    retired: bool = False       # superseded or unloaded: freed once users == 0


def module_name(layer: int, module: str) -> str:
    """The module's name in the transformers Llama, as PEFT matches rank_pattern and alpha_pattern against it."""
    return f"model.layers.{layer}.{_GROUP[module]}.{module}"


def _alpha_for(cfg: dict, name: str) -> float:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first alpha_pattern key that matches the end of the
    full module name at a dot boundary, as a regular expression, else lora_alpha (default 8)."""
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return float(value)
    return float(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))


def _scale_for(cfg: dict, name: str, rank: int) -> float:
    alpha = _alpha_for(cfg, name)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _expected_layers(cfg: dict, num_layers: int) -> set[int]:
    wanted = cfg.get("layers_to_transform")
    if wanted is None:
        return set(range(num_layers))
    return {int(wanted)} if isinstance(wanted, int) else {int(i) for i in wanted}


def _span(layers: set[int]) -> str:
    ordered = sorted(layers)
    return f"{ordered[0]}-{ordered[-1]}" if ordered == list(range(ordered[0], ordered[-1] + 1)) else str(ordered)


def base_mismatch(cfg: dict, base_names: set[str]) -> str:
    """A warning when the adapter names a base other than ours (paths differ between machines, so only the
    last path component is compared), else ""."""
    named = cfg.get("base_model_name_or_path")
    if not named or not base_names:
        return ""
    known = {Path(n).name.lower() for n in base_names} | {n.lower() for n in base_names}
    if str(named).lower() in known or Path(str(named)).name.lower() in known:
        return ""
    return f"trained on base {named!r}, served on {sorted(base_names)[0]!r}"


def read_peft_adapter(name: str, path: str | Path, module_shapes: dict[str, tuple[int, int]],
                      num_layers: int, max_rank: int, dtype: torch.dtype, version: int,
                      base_names: set[str] | None = None) -> AdapterVersion:
    """Reads a PEFT LoRA directory; every refusal names the file or tensor and why.

    Widths alone do not prove an adapter fits: one trained on a smaller model of the same width loads into
    any layers it names. So its layers must be exactly those its config says it transforms (all of them,
    unless `layers_to_transform`), and a `base_model_name_or_path` other than ours is a warning in its info.
    """
    path = Path(path)
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise AdapterError(f"adapter {name!r}: {f} does not exist")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {name!r}: {cfg_file} is not valid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: {cfg_file}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key):
            raise AdapterError(f"adapter {name!r}: {cfg_file}: {why}")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: {cfg_file}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("fan_in_fan_out"):
        raise AdapterError(f"adapter {name!r}: {cfg_file}: fan_in_fan_out is not supported")

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        weights = safe_open(str(weights_file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(f"adapter {name!r}: {weights_file} is not a readable safetensors file: {e}") from e
    with weights as st:
        for key in st.keys():
            m = _KEY.search(key)
            if not m:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA A/B weight of a "
                                   f"q/k/v/o/gate/up/down projection")
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            if module not in module_shapes:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} targets unknown module {module!r}")
            if layer >= num_layers:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} is for layer {layer}, "
                                   f"but the base model has {num_layers} layers")
            pairs.setdefault((layer, module), {})[which] = st.get_tensor(key)

    if not pairs:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA tensors")
    tensors, ranks, modules = {}, set(), set()
    for (layer, module), ab in sorted(pairs.items()):
        where = f"layers.{layer}.{module}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: {where} has lora_{''.join(ab)} but not its pair")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out = module_shapes[module]
        r = a.shape[0]
        if a.dim() != 2 or a.shape[1] != fan_in:
            raise AdapterError(f"adapter {name!r}: {where}.lora_A has shape {tuple(a.shape)}, "
                               f"expected (r, {fan_in}) for this base model")
        if b.dim() != 2 or b.shape != (fan_out, r):
            raise AdapterError(f"adapter {name!r}: {where}.lora_B has shape {tuple(b.shape)}, "
                               f"expected ({fan_out}, {r}) for this base model")
        if r > max_rank:
            raise AdapterError(f"adapter {name!r}: {where} has rank {r}, above the engine's max_lora_rank {max_rank}")
        scale = _scale_for(cfg, module_name(layer, module), r)
        tensors[(layer, module)] = (a.to(dtype), (b.float() * scale).to(dtype))
        ranks.add(r)
        modules.add(module)

    expected = _expected_layers(cfg, num_layers)
    for module in sorted(modules):
        layers = {layer for layer, m in pairs if m == module}
        if layers != expected:
            hint = "" if cfg.get("layers_to_transform") is not None else (
                f" (the config names no layers_to_transform, so all {num_layers}; was it trained on another base "
                f"model? its base_model_name_or_path is {cfg.get('base_model_name_or_path')!r})")
            raise AdapterError(f"adapter {name!r}: {module} has LoRA weights for layers {_span(layers)}, but "
                               f"{cfg_file.name} says layers {_span(expected)}{hint}")
    rank = max(ranks)
    info = AdapterInfo(name=name, path=str(path), rank=rank, alpha=_alpha_for(cfg, ""),
                       scaling=_scale_for(cfg, "", rank), target_modules=tuple(sorted(modules)), version=version,
                       warning=base_mismatch(cfg, base_names or set()))
    return AdapterVersion(name=name, version=version, info=info, tensors=tensors)


@dataclass
class AdapterRegistry:
    """Name -> current version, and which versions occupy the engine's slots. Engine thread only."""

    stacks: LoraStacks
    current: dict[str, AdapterVersion] = field(default_factory=dict)
    slots: list[AdapterVersion | None] = field(default_factory=list)
    _clock: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.slots = [None] * self.stacks.slots

    def install(self, adapter: AdapterVersion) -> None:
        """Makes `adapter` the current version of its name; the old one retires when idle."""
        old = self.current.get(adapter.name)
        self.current[adapter.name] = adapter
        if old is not None:
            self._retire(old)
        self.make_resident(adapter)  # eager when a slot is free or evictable; else on demand

    def unload(self, name: str) -> None:
        old = self.current.pop(name, None)
        if old is None:
            raise KeyError(name)
        self._retire(old)

    def _retire(self, version: AdapterVersion) -> None:
        version.retired = True
        if version.users == 0:
            self._free(version)

    def _free(self, version: AdapterVersion) -> None:
        if version.slot is not None:
            self.slots[version.slot] = None
            self.stacks.clear(version.slot)
            version.slot = None

    def make_resident(self, version: AdapterVersion) -> bool:
        """Puts a version into a slot (evicting an idle LRU one); False when every slot is busy."""
        version.last_used = next(self._clock)
        if version.slot is not None:
            return True
        free = [i for i, v in enumerate(self.slots) if v is None]
        if not free:
            idle = [v for v in self.slots if v is not None and v.users == 0]
            if not idle:
                return False
            victim = min(idle, key=lambda v: v.last_used)
            free = [victim.slot]
            self._free(victim)
        version.slot = free[0]
        self.slots[version.slot] = version
        self.stacks.write(version.slot, version.tensors)
        return True

    def acquire(self, version: AdapterVersion) -> None:
        version.users += 1

    def release(self, version: AdapterVersion) -> None:
        version.users -= 1
        if version.users == 0 and version.retired:
            self._free(version)

    @property
    def resident(self) -> int:
        return sum(v is not None for v in self.slots)
