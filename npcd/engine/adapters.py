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
}


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


def _scale_for(cfg: dict, module_key: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha", rank)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", module_key):
            alpha = value
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def read_peft_adapter(name: str, path: str | Path, module_shapes: dict[str, tuple[int, int]],
                      num_layers: int, max_rank: int, dtype: torch.dtype, version: int) -> AdapterVersion:
    """Reads a PEFT LoRA directory; every refusal names the file or tensor and why."""
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
        scale = _scale_for(cfg, f"model.layers.{layer}.{module}", r)
        tensors[(layer, module)] = (a.to(dtype), (b.float() * scale).to(dtype))
        ranks.add(r)
        modules.add(module)

    rank = max(ranks)
    info = AdapterInfo(name=name, path=str(path), rank=rank, alpha=float(cfg.get("lora_alpha", rank)),
                       scaling=_scale_for(cfg, "", rank), target_modules=tuple(sorted(modules)), version=version)
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
