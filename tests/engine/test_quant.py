"""`weights:` modes: how far each moves the bundled model, that a line's text does not depend on its batch
companions, and which mode `auto` picks where."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from npcd.engine import platform
from npcd.engine.api import GenerationRequest, SamplingParams
from npcd.engine.config import EngineConfig
from npcd.engine.engine import Engine
from npcd.engine.kernels import runnable_isa_levels, why_unavailable

needs_kernel = pytest.mark.skipif(why_unavailable() is not None, reason=f"block kernel: {why_unavailable()}")

LINES = ["Who are you, and why do you hate the king?", "What do you sell, merchant?",
         "Tell me a story about a lighthouse.", "Halt! Papers, please."]
PERSONA_ADAPTERS = Path(__file__).resolve().parents[2] / "personas" / "adapters"
ADAPTERS = ("forest_elf", "merchant", "town_guard")  # the shipped ones: int8 stacks in the block modes
MORE_LINES = ["The dragon burned the mill last night.", "Can you fix my sword?",
              "What news from the capital?", "Why are the wolves so bold this winter?"]


def chat_prompts(engine: Engine, lines: list[str]) -> list[list[int]]:
    tok = engine.tokenizer
    return [tok(tok.apply_chat_template([{"role": "user", "content": line}], add_generation_prompt=True,
                                        tokenize=False))["input_ids"] for line in lines]


# The quality gate's prompt set: 8 requests of 30-40 words, 341 distinct next-token positions. Each distinct
# context counts once: the 4 short LINES share a ~30-token system prompt, so over them one flipped near-tie
# in the shared part moved top-1 agreement by 2.6% (two kernels of equal KL, 0.0065 and 0.0066, scored 97.4%
# and 93.5% there, and 95.9% and 95.6% over this set).
GATE_TEXTS = [
    "The innkeeper wiped the counter and said the roads north had been quiet since the snows came, though a "
    "trapper swore he saw lights moving on the old barrow at night.",
    "Merchant, I need rope, two lanterns and enough dried meat for a week in the hills. What will that cost me, "
    "and do you know anyone who sells a good mule?",
    "Write a short letter from a soldier to his sister, telling her that the siege is over, that he is tired but "
    "well, and that he will be home before the harvest.",
    "Explain to a young apprentice why a blacksmith quenches a blade in oil rather than water, and what goes "
    "wrong when the steel cools too fast.",
    "Halt! Nobody enters the city after the bells. State your name, your business and the name of the person "
    "who will vouch for you, or turn back to the road.",
    "List three ways a village could protect its sheep from wolves during a hard winter, and say which one you "
    "would try first and why.",
    "The old map shows a river where there is now only a dry gully. Tell me what might have happened to the "
    "river over the last hundred years.",
    "You are the captain of a small fishing boat. A storm is coming and one of your crew wants to stay out for "
    "one more catch. What do you tell him?",
]


def _gate_engine(real_model_dir, mode: str) -> Engine:
    return Engine(EngineConfig(base=str(real_model_dir), weights=mode, max_batch_size=len(GATE_TEXTS),
                               max_seq_len=256))


@pytest.fixture(scope="module")
def fp32_scores(real_model_dir):
    engine = _gate_engine(real_model_dir, "fp32")
    prompts = chat_prompts(engine, GATE_TEXTS)
    return prompts, [t.clone() for t in engine.score(prompts, [None] * len(prompts))]


@needs_kernel
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_modes_stay_close_to_fp32_on_the_real_model(real_model_dir, fp32_scores, mode):
    prompts, exact = fp32_scores
    approx = _gate_engine(real_model_dir, mode).score(prompts, [None] * len(prompts))
    for a, b in zip(exact, approx):
        assert not torch.equal(a, b)  # it really is a different path
    kl, agree = _kl_and_agreement(prompts, [None] * len(prompts), exact, approx)
    print(f"{mode} against fp32: KL {kl:.4f} top-1 {agree:.3f}")
    assert kl <= 0.02, kl      # the quality gate of every quantized mode
    assert agree >= 0.95, agree


def _persona_scores(real_model_dir, mode: str) -> tuple[list[list[int]], list[torch.Tensor]]:
    engine = Engine(EngineConfig(base=str(real_model_dir), weights=mode, max_batch_size=4, max_seq_len=128))
    for name in ADAPTERS:
        engine.load_adapter(name, str(PERSONA_ADAPTERS / name))
    prompts = chat_prompts(engine, LINES[:len(ADAPTERS)])
    return prompts, [t.clone() for t in engine.score(prompts, list(ADAPTERS))]


def _kl_and_agreement(prompts: list[list[int]], adapters: list[str | None], exact: list[torch.Tensor],
                      approx: list[torch.Tensor]) -> tuple[float, float]:
    """Mean KL(exact || approx) per next-token position and the share of positions whose top-1 token agrees,
    counting each distinct (adapter, token prefix) once."""
    kl, agree, seen = 0.0, 0, set()
    for prompt, adapter, a, b in zip(prompts, adapters, exact, approx):
        fresh = []
        for j in range(len(prompt)):
            if (context := (adapter, tuple(prompt[:j + 1]))) not in seen:
                seen.add(context)
                fresh.append(j)
        log_a, log_b = torch.log_softmax(a[fresh], -1), torch.log_softmax(b[fresh], -1)
        kl += (log_a.exp() * (log_a - log_b)).sum().item()
        agree += int((a[fresh].argmax(-1) == b[fresh].argmax(-1)).sum())
    return kl / len(seen), agree / len(seen)


@needs_kernel
def test_personas_pass_the_quality_gate_with_int8_adapter_stacks(real_model_dir, monkeypatch):
    """The block modes keep adapters in int8 (npcd.engine.quant.lora_dtype): each shipped persona on the 4-bit
    base with its adapter in int8 passes the quality gate against fp32 weights and fp32 adapters, and adds
    little to what the 4-bit base costs with bf16 adapters."""
    prompts, exact = _persona_scores(real_model_dir, "fp32")
    gate = {}
    for dtype in (torch.bfloat16, torch.int8):
        monkeypatch.setattr("npcd.engine.engine.lora_dtype", lambda mode, dtype=dtype: dtype)
        gate[dtype] = _kl_and_agreement(prompts, list(ADAPTERS), exact, _persona_scores(real_model_dir, "int4")[1])
    print(f"int4 personas against fp32: bf16 stacks KL {gate[torch.bfloat16][0]:.4f} top-1 {gate[torch.bfloat16][1]:.3f}, "
          f"int8 stacks KL {gate[torch.int8][0]:.4f} top-1 {gate[torch.int8][1]:.3f}")
    kl, agree = gate[torch.int8]
    assert kl <= 0.02 and agree >= 0.95, gate
    assert kl <= 1.5 * gate[torch.bfloat16][0], gate


@pytest.mark.parametrize("mode", ["fp32", pytest.param("int4", marks=needs_kernel)])
def test_greedy_and_seeded_text_alone_equals_batched(real_model_dir, mode):
    engine = Engine(EngineConfig(base=str(real_model_dir), weights=mode, max_batch_size=8, max_seq_len=128))
    for name in ADAPTERS:
        engine.load_adapter(name, str(PERSONA_ADAPTERS / name))
    adapters = [*ADAPTERS, None] * 2  # mixed adapters and base rows in one batch
    prompts = chat_prompts(engine, LINES + MORE_LINES)
    for temperature, seed in ((0.0, None), (0.8, 7)):
        def requests(tag: str) -> list[GenerationRequest]:
            return [GenerationRequest(f"{tag}{i}", p, SamplingParams(max_tokens=24, temperature=temperature,
                                                                     seed=seed, ignore_eos=True), adapter=a)
                    for i, (p, a) in enumerate(zip(prompts, adapters))]
        alone = [engine.generate([r])[0].text for r in requests("alone")]
        batched = [f.text for f in engine.generate(requests("batched"))]
        assert alone == batched, temperature
    assert engine.describe()["batch_invariant"] is True
    stacks = "int8, a scale per column, over int8 inputs per row and block of 32" if mode == "int4" else "float32"
    assert engine.describe()["kernels"]["lora"].endswith(f"adapter stacks in {stacks}")  # the startup log says which


@needs_kernel
def test_the_cpp_layer_loop_gives_the_python_loops_logits_bit_for_bit(real_model_dir):
    """The block modes run the layers in one C++ call (kernels/layers.cpp); it must be the Python loop's
    arithmetic exactly: prompts with three adapters and a base row scored both ways, then a decode step."""
    engine = Engine(EngineConfig(base=str(real_model_dir), weights="int4", max_batch_size=8, max_seq_len=128))
    for name in ADAPTERS:
        engine.load_adapter(name, str(PERSONA_ADAPTERS / name))
    model = engine.model
    assert model.layer_loop is not None and "C++ loop" in model.kernels()["layers"]
    prompts = chat_prompts(engine, LINES[:4])
    adapters = [*ADAPTERS, None]
    by_cpp = engine.score(prompts, adapters)
    loop, model.layer_loop = model.layer_loop, None
    try:
        by_python = engine.score(prompts, adapters)
    finally:
        model.layer_loop = loop
    for row, (a, b) in enumerate(zip(by_cpp, by_python)):
        assert torch.equal(a, b), f"row {row} (adapter {adapters[row]}): max diff {(a - b).abs().max().item()}"
    # a changed stack (an adapter unloaded and another loaded into its slot) reaches the C++ loop's copy
    engine.unload_adapter("merchant")
    engine.load_adapter("merchant", str(PERSONA_ADAPTERS / "town_guard"))
    assert torch.equal(engine.score(prompts[2:3], ["merchant"])[0], by_cpp[2])


def test_weights_modes_are_checked_where_they_are_configured():
    with pytest.raises(ValueError, match="weights must be one of"):
        EngineConfig(weights="int3").validate()
    with pytest.raises(ValueError, match="weights: int4 runs on the CPU only"):
        EngineConfig(weights="int4", device="cuda").validate()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['dtype'\].*dtype is now weights"):
        EngineConfig.from_dict({"dtype": "float32"})


def test_auto_picks_the_block_kernel_where_it_builds_and_says_why(monkeypatch):
    cpu = EngineConfig(device="cpu")
    monkeypatch.setattr("npcd.engine.kernels.why_unavailable", lambda: None)
    monkeypatch.setattr("npcd.engine.kernels.load_cpu_kernels", lambda: object())  # built
    placed = platform.place(cpu)
    assert (placed.device.type, placed.weights) == ("cpu", "int4") and "AVX2" in placed.reason
    monkeypatch.setattr("npcd.engine.kernels.why_unavailable", lambda: "the CPU lacks avx2")
    monkeypatch.setattr("npcd.engine.kernels.load_cpu_kernels", lambda: None)
    monkeypatch.setattr(platform, "cpu_has_native_bf16", lambda: True)
    assert platform.place(cpu).weights == "bf16"
    monkeypatch.setattr(platform, "cpu_has_native_bf16", lambda: False)
    placed = platform.place(cpu)
    assert placed.weights == "fp32" and "the CPU lacks avx2" in placed.reason
    assert platform.place(EngineConfig(device="cpu", weights="int8")).weights == "int8"  # explicit wins


def test_a_failed_kernel_build_falls_back_and_names_the_error(monkeypatch, tmp_path):
    """A machine whose build fails (no Python headers, a broken compiler) still serves, on PyTorch's kernels."""
    from npcd.engine import kernels

    monkeypatch.setenv("NPCD_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "SOURCES", (tmp_path / "broken.cpp",))
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "_build_errors", {})
    monkeypatch.setattr(kernels, "_unavailable", [])
    kernels.load_cpu_kernels.cache_clear()
    try:
        assert kernels.load_cpu_kernels() is None
        assert kernels.why_unavailable().startswith("the kernel build failed in ")
        placed = platform.place(EngineConfig(device="cpu"))
        assert placed.weights in ("fp32", "bf16") and "the kernel build failed" in placed.reason
    finally:
        kernels.load_cpu_kernels.cache_clear()


# The macro that only the widest build of each level defines, so a source can fail in that build alone.
WIDEST_MACRO = {"-mavx512vnni": "__AVX512VNNI__", "-mamx-int8": "__AMX_INT8__"}


@pytest.mark.skipif(why_unavailable() is not None or len(runnable_isa_levels()) < 2,
                    reason="no build, or one build level on this CPU: nothing narrower to fall back to")
def test_a_wider_build_that_fails_gives_way_to_the_next_and_says_so(monkeypatch, tmp_path):
    """An AMX build that does not compile (an older compiler) must not cost the VNNI one: the engine loads the
    next narrower build and keeps why it passed over the wider one for the startup log."""
    from npcd.engine import kernels

    levels = runnable_isa_levels()
    widest = levels[-1]
    source = tmp_path / "only_narrow.cpp"
    source.write_text(f"""#ifdef {WIDEST_MACRO[widest[-1]]}
#error "refused on purpose in the widest build"
#endif
#include <torch/extension.h>
std::string path() {{ return "narrow"; }}
std::string refusal() {{ return ""; }}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {{ m.def("path", &path); m.def("refusal", &refusal); }}
""")
    monkeypatch.setenv("NPCD_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "SOURCES", (source,))
    monkeypatch.setattr(kernels, "_build_errors", {})
    monkeypatch.setattr(kernels, "_unavailable", [])
    kernels.load_cpu_kernels.cache_clear()
    try:
        loaded = kernels.load_cpu_kernels()
        assert loaded is not None and loaded.flags == levels[-2] and loaded.module.path() == "narrow"
        assert len(loaded.skipped) == 1 and loaded.skipped[0].startswith("the kernel build failed in ")
        assert kernels.build_error(widest) == loaded.skipped[0] and kernels.why_unavailable() is None
    finally:
        kernels.load_cpu_kernels.cache_clear()


def test_a_block_mode_without_its_kernel_says_why(monkeypatch):
    from npcd.engine import kernels
    from npcd.engine.quant import WeightFactory

    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    assert kernels.why_unavailable() == "no C++ compiler (c++ / g++) on PATH"
    monkeypatch.setattr(kernels, "load_cpu_kernels", lambda: None)
    monkeypatch.setattr("npcd.engine.quant.load_cpu_kernels", lambda: None)
    with pytest.raises(RuntimeError, match=r"weights: int4 needs npcd's block kernel.*no C\+\+ compiler"):
        WeightFactory("int4", torch.device("cpu"))
    assert WeightFactory("fp32", torch.device("cpu")).describe()["projections"] == "fp32 linear"


@needs_kernel
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are madvised on Linux only")
def test_the_block_weights_live_in_one_buffer_aligned_for_huge_pages(real_model_dir):
    """Every packed tensor of the projections and the head is a view of one buffer (npcd.engine.pages: 2 MB
    aligned, madvised for transparent huge pages, each tensor on a cache line)."""
    model = Engine(EngineConfig(base=str(real_model_dir), weights="int4", max_batch_size=2, max_seq_len=64)).model
    linears = [model.head, *(f for layer in model.layers for f in layer.linears())]
    tensors = [t for f in linears for t in f.packed()[:4]]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
    assert min(t.data_ptr() for t in tensors) % (2 << 20) == 0
    assert all(t.data_ptr() % 64 == 0 for t in tensors)
