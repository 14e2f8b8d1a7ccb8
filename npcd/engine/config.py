"""Engine definitions (`engines/*.yaml`) as a dataclass, validated on load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

WEIGHT_MODES = ("auto", "fp32", "bf16", "int8", "int4")  # npcd.engine.quant says what each runs; auto: npcd.engine.platform
# keys of earlier releases, named in the error with what replaced them
RENAMED_KEYS = {"dtype": f"weights ({'|'.join(WEIGHT_MODES)})", "quantize": f"weights ({'|'.join(WEIGHT_MODES)})",
                "prefix_cache_entries": "prefix_cache_mb (the cache is bounded by memory)"}
BACKENDS = ("torch",)  # "tensorrt-llm" slots in behind npcd.engine.api.Backend
# alternate: a prefill step, then a decode step; eager: prefill whenever requests wait;
# mixed: running rows decode in the same forward that prefills the newcomers.
PREFILL_POLICIES = ("alternate", "eager", "mixed")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that sizes the engine. Memory is allocated once from these at start.

    These defaults are the shipped engine, `engines/default.yaml` (a test keeps the two equal).
    """

    backend: str = "torch"
    base: str = "embedded:smollm2-135m-instruct"  # or a local HF Llama-family directory
    weights: str = "auto"          # auto | fp32 | bf16 | int8 | int4 (npcd.engine.quant; auto picks per CPU / device)
    device: str = "auto"           # auto | cpu | cuda
    max_batch_size: int = 32       # KV-cache slots = sequences decoded together
    max_seq_len: int = 1024        # prompt + output tokens per sequence
    kv_cache_mb: int = 0           # 0 = size for max_batch_size x max_seq_len; else a cap that lowers max_batch_size
    max_lora_rank: int = 64
    max_resident_adapters: int = 8  # adapters held in the weight stacks; LRU-evicted beyond
    max_queue: int = 256           # waiting requests before QUEUE_FULL
    player_queue_share: float = 0.125  # of max_queue kept for player lines: ambient requests see the rest
    # Keys/values of prompt beginnings kept for reuse: personas' system turns and conversations' last lines
    # (npcd.engine.kv_cache.PrefixCache), least recently used dropped beyond. SmolLM2-135M in fp32 holds 46 KB per
    # token: 512 MB keep ~11,000 tokens, a persona prefix (~150) each and some 30 conversations of 300 tokens.
    prefix_cache_mb: int = 512
    prefill_token_budget: int = 256   # new prompt tokens per step: bounds how long running lines wait
    prefill_policy: str = "mixed"  # alternate | eager | mixed (docs/performance.md)
    threads: int = 0               # torch threads; 0 = all cores

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        path = Path(path)
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an engine definition must be a mapping")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "engine config") -> "EngineConfig":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            renamed = "".join(f"; {k} is now {RENAMED_KEYS[k]}"
                              for k in unknown if k in RENAMED_KEYS)
            raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(fields)}{renamed}")
        values = {}
        for key, value in data.items():
            want = type(cls.__dataclass_fields__[key].default)
            if want is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{source}: {key} must be an integer, got {value!r}")
            if want is str and not isinstance(value, str):
                raise ValueError(f"{source}: {key} must be a string, got {value!r}")
            values[key] = value
        config = cls(**values)
        config.validate(source)
        return config

    def validate(self, source: str = "engine config") -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"{source}: {msg}")

        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.weights in WEIGHT_MODES, f"weights must be one of {WEIGHT_MODES}, got {self.weights!r}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.weights in ("int8", "int4"):
            need(self.device in ("auto", "cpu"),
                 f"weights: {self.weights} runs on the CPU only (npcd's block kernel), but device is {self.device!r}")
        need(1 <= self.max_batch_size <= 1024, f"max_batch_size must be in 1..1024, got {self.max_batch_size}")
        need(16 <= self.max_seq_len <= 131072, f"max_seq_len must be in 16..131072, got {self.max_seq_len}")
        need(self.kv_cache_mb >= 0, f"kv_cache_mb must be >= 0, got {self.kv_cache_mb}")
        need(1 <= self.max_lora_rank <= 256, f"max_lora_rank must be in 1..256, got {self.max_lora_rank}")
        need(1 <= self.max_resident_adapters <= 256,
             f"max_resident_adapters must be in 1..256, got {self.max_resident_adapters}")
        need(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        need(0 <= self.player_queue_share < 1, f"player_queue_share must be in [0, 1), got {self.player_queue_share}")
        need(self.prefix_cache_mb >= 0, f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")
        need(self.prefill_token_budget >= 16, f"prefill_token_budget must be >= 16, got {self.prefill_token_budget}")
        need(self.prefill_policy in PREFILL_POLICIES,
             f"prefill_policy must be one of {PREFILL_POLICIES}, got {self.prefill_policy!r}")
        need(self.threads >= 0, f"threads must be >= 0, got {self.threads}")

    @property
    def player_queue_reserve(self) -> int:
        """Queue places only player lines may take."""
        return int(self.max_queue * self.player_queue_share)

    def replace(self, **changes) -> "EngineConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config
