"""The multi-LoRA engine against transformers + PEFT, and its batching invariants."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from npcd.engine.api import (
    AdapterError,
    Finished,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    QueueFull,
    SamplingParams,
    Started,
    TextDelta,
    UnknownAdapter,
)
from npcd.engine.async_engine import AsyncEngine
from npcd.engine.config import PREFILL_POLICIES
from npcd.engine.engine import Engine
from npcd.engine.kv_cache import PrefixCache

PROMPTS = ["Hello there, traveler.", "Who goes there? Halt!", "Buy my wares, cheap!",
           "I will destroy you all.", "The road is long."]
NAMES = ["elf", "guard", "merchant", "villain", None]


def engine_with_adapters(config, adapters: dict) -> Engine:
    eng = Engine(config)
    for name, path in adapters.items():
        eng.load_adapter(name, str(path))
    return eng


@pytest.fixture
def engine(tiny_config, tiny_adapters) -> Engine:
    return engine_with_adapters(tiny_config, tiny_adapters)


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(text)


def greedy(rid: str, prompt: list[int], adapter: str | None, n: int = 12, **kw) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, **kw), adapter=adapter)


def run_alone(engine: Engine, req: GenerationRequest) -> Finished:
    return engine.generate([GenerationRequest(req.request_id + "-alone", req.prompt_ids, req.sampling,
                                              req.adapter, req.prefix_len)])[0]


def collect(engine: Engine) -> tuple[dict[str, list], callable]:
    events: dict[str, list] = {}

    def sink(event) -> None:
        events.setdefault(event.request_id, []).append(event)
    return events, sink


def run_until_done(engine: Engine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.step() and not engine.has_work():
            return
    raise AssertionError("engine did not finish")


def test_mixed_batch_logits_match_peft_per_request(engine, tiny_model_dir, tiny_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = [ids(engine, p) for p in PROMPTS]
    logits = engine.score(prompts, NAMES)  # one forward, four adapters of different ranks/targets + a base row
    for prompt, name, got in zip(prompts, NAMES, logits):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if name:
            model = PeftModel.from_pretrained(model, tiny_adapters[name])
        with torch.no_grad():
            want = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"row with adapter {name}")


def test_scoring_never_evicts_an_adapter_of_its_own_batch(tiny_config, tiny_adapters, engine):
    small = Engine(tiny_config.replace(max_resident_adapters=2))
    for name, path in tiny_adapters.items():
        small.load_adapter(name, str(path))
    prompts = [ids(small, p) for p in PROMPTS[:3]]
    with pytest.raises(RuntimeError, match="at most max_resident_adapters=2 distinct adapters"):
        small.score(prompts, ["elf", "guard", "merchant"])
    got = small.score(prompts[:2], ["villain", "merchant"])  # both evicted before: reloaded together
    want = engine.score(prompts[:2], ["villain", "merchant"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_adapters_change_the_output(engine):
    prompt = ids(engine, PROMPTS[0])
    texts = {name: engine.generate([greedy(f"x{name}", prompt, name)])[0].text for name in NAMES}
    assert len(set(texts.values())) == len(NAMES)


def test_greedy_mixed_batch_equals_each_request_alone(engine):
    reqs = [greedy(f"r{i}", ids(engine, PROMPTS[i % 5]), NAMES[i % 5]) for i in range(8)]
    batch = engine.generate(reqs)
    assert engine.last_batch_size >= 1 and engine.steps > 0
    for req, got in zip(reqs, batch):
        alone = run_alone(engine, req)
        assert got.text == alone.text and got.completion_tokens == alone.completion_tokens, req.adapter


def test_prefill_packs_prompts_so_padding_costs_no_projection_work(engine, monkeypatch):
    prompts = [ids(engine, p) for p in PROMPTS]
    rows_seen: list[int] = []
    linear = torch.nn.functional.linear

    def counting_linear(x, weight, *args):
        rows_seen.append(x.shape[0])
        return linear(x, weight, *args)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    for i, (p, name) in enumerate(zip(prompts, NAMES)):
        engine.submit(greedy(f"r{i}", p, name, n=1), lambda event: None)
    engine.step()  # one prefill step admits all five
    assert len({len(p) for p in prompts}) > 1
    assert rows_seen[0] == sum(len(p) for p in prompts) < len(prompts) * max(len(p) for p in prompts)


@pytest.mark.parametrize("policy", PREFILL_POLICIES)
def test_continuous_batching_join_and_leave_mid_generation(tiny_config, tiny_adapters, policy):
    engine = engine_with_adapters(tiny_config.replace(prefill_policy=policy), tiny_adapters)
    events, sink = collect(engine)
    early = [greedy(f"early{i}", ids(engine, PROMPTS[i]), NAMES[i], n=6 + 4 * i) for i in range(3)]
    late = [greedy(f"late{i}", ids(engine, PROMPTS[4 - i]), NAMES[4 - i], n=10) for i in range(3)]
    for r in early:
        engine.submit(r, sink)
    for _ in range(4):
        engine.step()
    assert len(engine.running) == 3
    for r in late:  # join a batch that is mid-decode; early0 leaves before late ones finish
        engine.submit(r, sink)
    running = [engine.by_id[r.request_id] for r in early]
    decoded_before = [len(seq.generated) for seq in running]
    engine.step()
    # mixed: the step that prefills the newcomers also decodes every running row
    assert engine.last_batch_size == (6 if policy == "mixed" else 3)
    moved = [len(seq.generated) - n for seq, n in zip(running, decoded_before)]
    assert moved == ([1, 1, 1] if policy == "mixed" else [0, 0, 0])
    run_until_done(engine)
    assert not engine.running
    for r in early + late:
        finished = events[r.request_id][-1]
        assert isinstance(finished, Finished)
        assert finished.text == run_alone(engine, r).text, r.request_id


def test_seeded_sampling_is_independent_of_batch_companions(engine):
    prompt = ids(engine, PROMPTS[1])
    req = GenerationRequest("s", prompt, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50,
                                                        repetition_penalty=1.2, seed=1234), adapter="guard")
    alone = run_alone(engine, req)
    others = [GenerationRequest(f"o{i}", ids(engine, PROMPTS[i]), SamplingParams(max_tokens=20, temperature=1.0,
                                seed=i), adapter=NAMES[i]) for i in range(5)]
    mixed = engine.generate(others[:2] + [req] + others[2:])[2]
    assert mixed.text == alone.text
    other_seed = engine.generate([GenerationRequest("s2", prompt, SamplingParams(
        max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=99), adapter="guard")])[0]
    assert other_seed.text != alone.text


def test_stop_string_spanning_tokens_is_matched_and_removed(engine):
    prompt = ids(engine, PROMPTS[2])
    full = engine.generate([greedy("full", prompt, "merchant", n=24)])[0]
    toks = engine.tokenizer.encode(full.text)
    # a stop string made of the tail of one token and the head of the next
    cut = len(engine.tokenizer.decode(toks[:3]))
    stop = full.text[cut - 2:cut + 2]
    assert len(stop) == 4 and stop in full.text
    events, sink = collect(engine)
    engine.submit(greedy("stop", prompt, "merchant", n=24, stop=(stop,)), sink)
    run_until_done(engine)
    finished = events["stop"][-1]
    want = full.text[:full.text.index(stop)]
    assert finished.reason == FinishReason.STOP and finished.text == want
    streamed = "".join(e.text for e in events["stop"] if isinstance(e, TextDelta))
    assert streamed == want


def test_utf8_streaming_never_splits_characters(engine):
    from npcd.engine.detokenizer import IncrementalDetokenizer

    text = "Élodie said: naïve café — 日本の森 🧝‍♀️🌲 ok"
    detok = IncrementalDetokenizer(engine.tokenizer)
    deltas = [detok.push(t)[0] for t in engine.tokenizer.encode(text)]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were partial characters, held back


def test_cancel_frees_slot_within_one_step(engine):
    events, sink = collect(engine)
    for i in range(3):
        engine.submit(greedy(f"c{i}", ids(engine, PROMPTS[i]), NAMES[i], n=200), sink)
    for _ in range(3):
        engine.step()
    assert len(engine.running) == 3
    users_before = engine.registry.current["guard"].users
    engine.cancel("c1")
    engine.step()
    assert len(engine.running) == 2 and "c1" not in engine.by_id
    assert engine.registry.current["guard"].users == users_before - 1
    assert events["c1"][-1].reason == FinishReason.CANCELLED
    # the survivors keep producing the same tokens they would alone
    engine.cancel("c0")
    engine.cancel("c2")
    run_until_done(engine)
    assert not engine.running and not engine.by_id


def test_adapter_replace_under_traffic_keeps_running_version(engine, tiny_adapters, tiny_model_dir, tmp_path):
    from npcd.engine.testing import write_lora

    events, sink = collect(engine)
    prompt = ids(engine, PROMPTS[0])
    old_text = run_alone(engine, greedy("o", prompt, "elf", n=16)).text
    engine.submit(greedy("running", prompt, "elf", n=16), sink)
    engine.step()
    engine.step()
    new_path = write_lora(tiny_model_dir, tmp_path / "elf2", 8, ["q_proj", "v_proj"], seed=42)
    info = engine.load_adapter("elf", str(new_path))  # replace while "running" decodes
    assert info.version > 0
    run_until_done(engine)
    assert events["running"][-1].text == old_text  # finished with the version it started with
    new_text = run_alone(engine, greedy("n", prompt, "elf", n=16)).text
    assert new_text != old_text
    # the old version's slot was freed once its last user finished
    assert all(v is None or not v.retired for v in engine.registry.slots)


def test_lru_eviction_and_reload(tiny_config, tiny_adapters):
    engine = Engine(tiny_config.replace(max_resident_adapters=2))
    for name, path in tiny_adapters.items():
        engine.load_adapter(name, str(path))
    assert engine.registry.resident == 2 and len(engine.registry.current) == 4
    assert sum(info.resident for info in engine.adapters().values()) == 2
    prompt = ids(engine, PROMPTS[3])
    reqs = [greedy(f"e{i}", prompt, name, n=8) for i, name in enumerate(["elf", "guard", "merchant", "villain"])]
    texts = [f.text for f in engine.generate(reqs)]  # four adapters through two slots
    assert engine.registry.resident == 2
    full = Engine(tiny_config)
    for name, path in tiny_adapters.items():
        full.load_adapter(name, str(path))
    assert texts == [f.text for f in full.generate(reqs)]


def test_bad_adapters_are_refused_without_disturbing_running(engine, tiny_adapters, tmp_path):
    events, sink = collect(engine)
    prompt = ids(engine, PROMPTS[0])
    want = run_alone(engine, greedy("w", prompt, "elf", n=10)).text
    engine.submit(greedy("live", prompt, "elf", n=10), sink)
    engine.step()

    missing = tmp_path / "missing"
    with pytest.raises(AdapterError, match="adapter_config.json does not exist"):
        engine.load_adapter("broken", str(missing))
    too_big = tmp_path / "big"
    shutil.copytree(tiny_adapters["merchant"], too_big)
    with pytest.raises(AdapterError, match="rank 16, above the engine's max_lora_rank 8"):
        Engine(engine.config.replace(max_lora_rank=8)).load_adapter("big", str(too_big))
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_adapters["elf"], wrong)
    from safetensors.torch import load_file, save_file
    tensors = load_file(wrong / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(8, 32)
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"layers\.\d+\.q_proj\.lora_A has shape \(8, 32\), expected \(r, 64\)"):
        engine.load_adapter("wrong", str(wrong))
    dora = tmp_path / "dora"
    shutil.copytree(tiny_adapters["elf"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(AdapterError, match="DoRA"):
        engine.load_adapter("dora", str(dora))

    run_until_done(engine)
    assert events["live"][-1].text == want
    assert "wrong" not in engine.adapters() and "elf" in engine.adapters()


def test_invalid_requests_are_refused_with_reasons(engine):
    prompt = ids(engine, PROMPTS[0])
    with pytest.raises(UnknownAdapter, match="'nobody'"):
        engine.submit(greedy("u", prompt, "nobody"), lambda e: None)
    with pytest.raises(InvalidRequest, match="prompt has 300 tokens; max_seq_len is 256"):
        engine.submit(greedy("long", [5] * 300, None), lambda e: None)
    with pytest.raises(InvalidRequest, match="top_p must be in"):
        engine.submit(greedy("p", prompt, None, top_p=0.0), lambda e: None)
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        engine.submit(greedy("e", [], None), lambda e: None)


def test_queue_full(tiny_config):
    engine = Engine(tiny_config.replace(max_queue=2))
    prompt = ids(engine, PROMPTS[0])
    engine.submit(greedy("a", prompt, None), lambda e: None)
    engine.submit(greedy("b", prompt, None), lambda e: None)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(greedy("c", prompt, None), lambda e: None)


def test_prefix_cache_same_output_fewer_prefilled_tokens(engine):
    system = ids(engine, "<|im_start|>system\nYou are a merchant of rare spices and rarer lies.<|im_end|>\n")
    users = [ids(engine, f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
             for q in ("What do you sell?", "Is it cheap?", "Where from?")]
    reqs = [GenerationRequest(f"p{i}", system + u, SamplingParams(max_tokens=10), adapter="merchant",
                              prefix_len=len(system)) for i, u in enumerate(users)]
    no_cache = [dataclass_replace(r, prefix_len=0, request_id=r.request_id + "n") for r in reqs]
    plain = [engine.generate([r])[0] for r in no_cache]
    prefilled_plain = engine.stats().prompt_tokens
    cached = [engine.generate([r])[0] for r in reqs]
    prefilled_cached = engine.stats().prompt_tokens - prefilled_plain
    assert [c.text for c in cached] == [p.text for p in plain]
    assert engine.prefix_cache.hits == 2 and engine.prefix_cache.misses == 1
    assert prefilled_cached == sum(len(r.prompt_ids) for r in reqs) - 2 * len(system)
    assert [c.cached_prompt_tokens for c in cached] == [0, len(system), len(system)]
    # a new adapter version invalidates the persona's cached prefix
    engine.load_adapter("merchant", engine.adapters()["merchant"].path)
    again = engine.generate([dataclass_replace(reqs[0], request_id="again")])[0]
    assert again.cached_prompt_tokens == 0 and again.text == plain[0].text


def dataclass_replace(req: GenerationRequest, **kw) -> GenerationRequest:
    import dataclasses
    return dataclasses.replace(req, **kw)


def test_deadline_and_priority(engine):
    import time

    events, sink = collect(engine)
    prompt = ids(engine, PROMPTS[0])
    engine.submit(GenerationRequest("late", prompt, SamplingParams(max_tokens=200), deadline=time.monotonic() + 0.05),
                  sink)
    engine.step()
    time.sleep(0.06)
    engine.step()
    assert events["late"][-1].reason == FinishReason.DEADLINE
    small = Engine(engine.config.replace(max_batch_size=1))
    ev2, sink2 = collect(small)
    small.submit(greedy("ambient", prompt, None, n=2), sink2)
    small.submit(GenerationRequest("player", prompt, SamplingParams(max_tokens=2), priority=2), sink2)
    small.step()  # one slot: the player's line goes first although it came second
    assert [s.request.request_id for s in small.running] == ["player"]
    assert isinstance(ev2["player"][0], Started) and ev2["player"][0].queue_position == 0
    assert ev2["ambient"][0].queue_position == 0


def test_async_engine_streams_and_cancels(tiny_config, tiny_adapters):
    backend = AsyncEngine(tiny_config)
    for name, path in tiny_adapters.items():
        backend.load_adapter(name, str(path))
    backend.start()
    prompt = backend.tokenizer.encode(PROMPTS[0])

    async def main() -> tuple[list, list]:
        a = backend.submit(greedy("a", prompt, "elf", n=20))
        b = backend.submit(greedy("b", prompt, "guard", n=400))
        got_a = [e async for e in a]
        got_b = []
        async for e in b:
            got_b.append(e)
            if sum(isinstance(x, TextDelta) for x in got_b) == 3:
                backend.cancel("b")
        return got_a, got_b

    try:
        got_a, got_b = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        backend.shutdown(grace_s=0)
    assert isinstance(got_a[0], Started) and isinstance(got_a[-1], Finished)
    assert "".join(e.text for e in got_a if isinstance(e, TextDelta)) == got_a[-1].text
    assert got_b[-1].reason == FinishReason.CANCELLED and got_b[-1].completion_tokens < 400
    assert backend.stats().running == 0


def test_real_model_matches_transformers(real_model_dir):
    """The embedded SmolLM2 through our forward: same logits and greedy text as LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM

    from npcd.engine.config import EngineConfig

    engine = Engine(EngineConfig(weights="fp32", device="cpu", max_batch_size=2, max_seq_len=128))
    chat = [{"role": "system", "content": "You are a bitter forest elf."}, {"role": "user", "content": "Who are you?"}]
    prompt = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    got = engine.score([prompt], [None])[0]
    model = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0]
        ref_ids = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):]
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    text = engine.generate([GenerationRequest("real", prompt, SamplingParams(max_tokens=20))])[0].text
    assert text == engine.tokenizer.decode(ref_ids, skip_special_tokens=True)
    assert "forest" in text.lower() or len(text) > 20  # a real sentence, not noise


def test_a_tick_is_admitted_atomically(engine):
    """submit_many queues a tick as one unit: all of it joins the same prefill step."""
    events, sink = collect(engine)
    tick = [(greedy(f"t{i}", ids(engine, PROMPTS[i % 5]), NAMES[i % 5], n=4), sink) for i in range(6)]
    bad = (greedy("bad", ids(engine, PROMPTS[0]), "nobody"), sink)
    errors = engine.submit_many(tick[:3] + [bad] + tick[3:])
    assert [type(e).__name__ if e else None for e in errors] == [None] * 3 + ["UnknownAdapter"] + [None] * 3
    engine.step()
    assert engine.last_batch_size == 6 and len(engine.running) == 6
    assert all(isinstance(events[f"t{i}"][0], Started) for i in range(6))
    run_until_done(engine)
    assert all(isinstance(events[f"t{i}"][-1], Finished) for i in range(6))


def test_engine_describes_the_fast_path_it_resolved(tiny_config):
    described = Engine(tiny_config).describe()
    assert described["device"] == "cpu" and described["dtype"] == "float32" and described["weights"] == "fp32"
    assert described["prefill_policy"] == tiny_config.prefill_policy and described["threads"] == 2
    assert described["kernels"]["lm_head"] == "fp32 linear" and described["cpu_capability"]


def test_a_conversation_line_reuses_the_kv_of_the_last_one_and_answers_the_same(engine):
    """The next line's prompt extends the last one's prompt and reply: it reuses their KV (the longest common
    prefix, here all but the new turn) and its greedy text equals a fresh prefill's."""
    system = ids(engine, "<|im_start|>system\nYou are a guard at the north gate.<|im_end|>\n")
    first = system + ids(engine, "<|im_start|>user\nWho goes there?<|im_end|>\n<|im_start|>assistant\n")
    one = engine.generate([GenerationRequest("c1", first, SamplingParams(max_tokens=8), adapter="merchant",
                                             prefix_len=len(system), cache_key="gate")])[0]
    key = (("merchant", engine.adapters()["merchant"].version), PrefixCache.CONVERSATION, "gate")
    assert engine.prefix_cache.longest([key], first + [0], touch=False)[0] == len(first)  # kept under its key
    extended = (first + ids(engine, one.text) + ids(engine, "<|im_end|>\n<|im_start|>user\nAnd you?<|im_end|>\n"
                                                 "<|im_start|>assistant\n"))
    request = GenerationRequest("c2", extended, SamplingParams(max_tokens=8), adapter="merchant",
                                prefix_len=len(system), cache_key="gate")
    reused = engine.generate([request])[0]
    fresh = engine.generate([dataclass_replace(request, request_id="c2-fresh", cache_key="", prefix_len=0)])[0]
    assert reused.text == fresh.text and fresh.cached_prompt_tokens == 0
    assert reused.cached_prompt_tokens >= len(first)  # the first prompt, and its reply as far as it re-tokenizes
    # another key (another conversation, or another window) never lends its KV
    other = engine.generate([dataclass_replace(request, request_id="c3", cache_key="elsewhere")])[0]
    assert other.cached_prompt_tokens == len(system) and other.text == fresh.text
