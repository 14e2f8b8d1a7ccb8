"""The mixed-adapter LoRA operator against a plain per-row loop, over the adapter mixes a server sees.

Real LoraStacks with random fp32 weights; the reference reads the adapters' own (A, B) tensors, not the
stacks, so slot writing, rank padding and untargeted modules are checked along with the routing.
"""

from __future__ import annotations

import itertools
import random
import sys

import pytest
import torch

from npcd.engine.kernels import build_cpu_kernels, load_cpu_kernels, runnable_isa_levels, why_unavailable
from npcd.engine.lora import (
    GROUPS,
    GatherCache,
    LoraBatch,
    LoraStacks,
    SegmentedLoraBatch,
    plan_buckets,
    quantize_columns,
    split_cost_rows,
)

# Small shapes with the real structure: q/k/v and gate/up fused, k/v narrower, down wider in than out.
SHAPES = {"q_proj": (24, 24), "k_proj": (24, 8), "v_proj": (24, 8), "o_proj": (24, 24),
          "gate_proj": (24, 40), "up_proj": (24, 40), "down_proj": (40, 24)}
LAYERS = 2
SLOTS = 8
ALL = tuple(SHAPES)
# slot -> (rank, targets): ranks 2..16 and partial target sets share one stack padded to rank 16
ADAPTERS = {0: (4, ALL), 1: (16, ("q_proj", "v_proj")), 2: (2, ("gate_proj", "up_proj", "down_proj")),
            3: (8, ALL), 4: (8, ("k_proj", "o_proj", "down_proj")), 5: (1, ("v_proj",)),
            6: (12, ALL), 7: (4, ("q_proj", "up_proj"))}

Adapter = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def make_adapter(rank: int, targets: tuple[str, ...], gen: torch.Generator) -> Adapter:
    """(layer, module) -> (A [r, in], B_scaled [out, r]), scaled so deltas are O(1)."""
    return {(layer, m): (torch.randn(rank, SHAPES[m][0], generator=gen) / SHAPES[m][0] ** 0.5,
                         torch.randn(SHAPES[m][1], rank, generator=gen) / rank ** 0.5)
            for layer in range(LAYERS) for m in targets}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matmuls are tiny: on a loaded 2-core box, two OpenMP threads made this file 11-17 s instead of 1.5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapters() -> dict[int, Adapter]:
    gen = torch.Generator().manual_seed(0)
    return {slot: make_adapter(rank, targets, gen) for slot, (rank, targets) in ADAPTERS.items()}


@pytest.fixture(scope="module")
def stacks(adapters) -> LoraStacks:
    st = LoraStacks(SHAPES, LAYERS, SLOTS, torch.float32, torch.device("cpu"))
    for slot, tensors in adapters.items():  # rank 4 then 16: the stacks grow with slot 0 resident
        st.write(slot, tensors)
    assert st.rank == 16
    return st


def int8_inputs(v: torch.Tensor) -> torch.Tensor:
    """v [..., K] as an int8 stack's kernel reads its inputs: per block of 32, round(v * 127 / max |v|), rounded
    to even, times max |v| / 127, in fp32 as the kernel computes it."""
    out = torch.empty_like(v)
    for k0 in range(0, v.shape[-1], 32):
        block = v[..., k0:k0 + 32]
        amax = block.abs().amax(dim=-1, keepdim=True)
        out[..., k0:k0 + 32] = torch.round(block * torch.where(amax > 0, 127.0 / amax, 0.0)) * (amax / 127.0)
    return out


def reference(adapters: dict[int, Adapter], row_slots: list[int], x: torch.Tensor, layer: int,
              group: str, int8: bool = False) -> torch.Tensor:
    """The delta row by row, from each adapter's own tensors: row i with adapter a gets B_m[a] @ A_m[a] @ x[i];
    `int8`: with x[i] and A_m[a] @ x[i] quantized as int8 stacks' inputs are (in float64 between)."""
    delta = torch.zeros(len(row_slots), sum(SHAPES[m][1] for m in GROUPS[group]))
    for i, slot in enumerate(row_slots):
        col = 0
        for m in GROUPS[group]:
            width = SHAPES[m][1]
            if slot >= 0 and (layer, m) in adapters[slot]:
                a, b = adapters[slot][(layer, m)]
                if int8:
                    h = int8_inputs((a.double() @ int8_inputs(x[i]).double()).float())
                    delta[i, col:col + width] = (b.double() @ h.double()).float()
                else:
                    delta[i, col:col + width] = b @ (a @ x[i])
            col += width
    return delta


SEGMENTED = "segmented"  # as split_cost: the CPU kernel instead of the bucketed operator


def make_batch(stacks: LoraStacks, row_slots: list[int], split_cost: float | str | None):
    if split_cost == SEGMENTED:
        return SegmentedLoraBatch(row_slots, stacks, load_cpu_kernels().module.lora_add)
    return LoraBatch(row_slots, stacks, GatherCache(), split_cost)


def check(adapters: dict[int, Adapter], stacks: LoraStacks, row_slots: list[int], split_cost: float | str | None,
          operator_slots: list[int] | None = None) -> None:
    """add_delta on every layer and group equals base + reference delta, to fp32 rounding."""
    batch = make_batch(stacks, operator_slots or row_slots, split_cost)
    gen = torch.Generator().manual_seed(len(row_slots))
    for layer, group in itertools.product(range(LAYERS), GROUPS):
        x = torch.randn(len(row_slots), SHAPES[GROUPS[group][0]][0], generator=gen)
        base = torch.randn(len(row_slots), sum(SHAPES[m][1] for m in GROUPS[group]), generator=gen)
        out = base.clone()
        batch.add_delta(x, out, layer, group)
        torch.testing.assert_close(out, base + reference(adapters, row_slots, x, layer, group, stacks.quantized),
                                   rtol=1e-5, atol=1e-5, msg=lambda m, where=f"layer {layer} {group}": f"{where}: {m}")


def shuffled(rows: list[int], seed: int) -> list[int]:
    random.Random(seed).shuffle(rows)
    return rows


def zipf(n: int, seed: int) -> list[int]:
    return random.Random(seed).choices(range(SLOTS), weights=[1 / (k + 1) ** 1.2 for k in range(SLOTS)], k=n)


DECODE = [5, 2, 7, 0, 2, 4, 1, 6]
MIXES = {
    "identical": [3] * 12,
    "distinct": shuffled(list(range(SLOTS)), 1),
    "uniform": random.Random(2).choices(range(SLOTS), k=24),
    "zipf": zipf(32, 3),
    "skewed": shuffled([6] * 26 + [0, 1, 2, 3, 4, 5], 4),
    "none_interleaved": random.Random(5).choices([-1, -1, -1, 0, 3, 5, 7], k=20),
    "all_none": [-1] * 5,
    "subset_present": [1, 6, 6, 1, 4, -1, 6],
    "decode_and_prompt": DECODE + [2] * 60,            # the prompt's adapter also decodes: one gathered segment
    "decode_and_lone_prompt": [0, 1, 5, 7, -1] + [3] * 60,   # the prompt's rows are a contiguous range
    "two_prompts": [1] * 9 + [2] * 9,                  # equal adjacent segments: one contiguous bucket of 2
    "prompt_then_decode": [4] * 43 + [-1, 4, 0, 4, 6],
}


needs_kernel = pytest.mark.skipif(why_unavailable() is not None, reason=f"CPU kernels: {why_unavailable()}")
PLANS = [None, 0.0, 1e9, pytest.param(SEGMENTED, marks=needs_kernel)]
PLAN_IDS = ["measured", "every_segment_alone", "one_padded", "segmented_kernel"]


@pytest.mark.parametrize("split_cost", PLANS, ids=PLAN_IDS)
@pytest.mark.parametrize("mix", MIXES)
def test_operator_matches_the_per_row_loop(adapters, stacks, mix, split_cost):
    check(adapters, stacks, MIXES[mix], split_cost)


def test_the_comparison_catches_a_misrouted_row(adapters, stacks):
    """Two rows swapped in routing (or a wrong un-permutation) must fail the check, whatever the plan."""
    rows = MIXES["zipf"]
    swapped = rows.copy()
    i, j = next((i, j) for i, j in itertools.combinations(range(len(rows)), 2) if rows[i] != rows[j])
    swapped[i], swapped[j] = swapped[j], swapped[i]
    for split_cost in (None, 0.0, 1e9) + ((SEGMENTED,) if why_unavailable() is None else ()):
        with pytest.raises(AssertionError):
            check(adapters, stacks, rows, split_cost, operator_slots=swapped)


def _rounded(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w as a stack of `dtype` holds it: rounded to bf16, or quantized per column of w.t() (the stack's layout)."""
    if dtype == torch.int8:
        q, scale = quantize_columns(w.t())
        return (q.float() * scale).t()
    return w.to(dtype).float()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_segmented_kernel_reads_compact_stacks(adapters, dtype):
    """bf16 stacks, and the block modes' int8 ones: the kernel equals the loop over the adapters as rounded
    into the stack (int8: and over the inputs as it quantizes them), whatever rank, targets and slot each
    adapter has."""
    rounded = {slot: {key: (_rounded(a, dtype), _rounded(b, dtype)) for key, (a, b) in tensors.items()}
               for slot, tensors in adapters.items()}
    st = LoraStacks(SHAPES, LAYERS, SLOTS, dtype, torch.device("cpu"))
    for slot, tensors in adapters.items():
        st.write(slot, tensors)
    for mix in ("zipf", "skewed", "decode_and_prompt", "none_interleaved"):
        check(rounded, st, MIXES[mix], SEGMENTED)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
def test_segmented_kernel_gives_a_row_the_same_delta_alone_and_batched(adapters, dtype):
    """Bit for bit, in every stack dtype: behind int8 activations, any rounding that depends on the batch changes
    lines (int8 stacks once did: a multiply and add the compiler fused in one tile size and not in another).
    Rows land on an output that already holds values, as the base projection's are."""
    stacks = LoraStacks(SHAPES, LAYERS, SLOTS, dtype, torch.device("cpu"))
    for slot, tensors in adapters.items():
        stacks.write(slot, tensors)
    rows = MIXES["zipf"]
    gen = torch.Generator().manual_seed(9)
    for layer, group in itertools.product(range(LAYERS), GROUPS):
        x = torch.randn(len(rows), SHAPES[GROUPS[group][0]][0], generator=gen)
        width = sum(SHAPES[m][1] for m in GROUPS[group])
        base = torch.randn(len(rows), width, generator=gen)
        batched = base.clone()
        make_batch(stacks, rows, SEGMENTED).add_delta(x, batched, layer, group)
        for i, slot in enumerate(rows):
            alone = base[i:i + 1].clone()
            make_batch(stacks, [slot], SEGMENTED).add_delta(x[i:i + 1], alone, layer, group)
            assert torch.equal(alone[0], batched[i]), (layer, group, i)


# Output widths that take every column path of the kernel (128, 64, 32, 16 and 8 wide, then single columns)
WIDE = {"q_proj": (64, 251), "k_proj": (64, 72), "v_proj": (64, 72), "o_proj": (251, 64),
        "gate_proj": (64, 136), "up_proj": (64, 136), "down_proj": (136, 64)}


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def wide_stacks(request) -> LoraStacks:
    gen = torch.Generator().manual_seed(5)
    st = LoraStacks(WIDE, 1, 4, request.param, torch.device("cpu"))
    for slot in range(4):
        st.write(slot, {(0, m): (torch.randn(64, i, generator=gen) / i ** 0.5, torch.randn(o, 64, generator=gen) / 8)
                        for m, (i, o) in WIDE.items()})
    return st


@needs_kernel
@pytest.mark.parametrize("rows", [[0, 0, 0, 1, 2, 2, 3, -1, 1], [2] * 14 + [0, -1, 1]], ids=["decode", "prompt"])
@pytest.mark.parametrize("group", GROUPS)
def test_segmented_kernel_at_widths_that_take_every_vector_path(build, wide_stacks, group, rows):
    """Against torch matmuls over the same bf16 (or int8, scaled, over inputs quantized as the kernel does)
    stacks, in every build this machine runs; and the AVX-512 and AVX2 builds agree bit for bit: both sum each
    element as one FMA chain over k ascending (int8: exact integer dots per block of 32, then one FMA chain over
    the blocks), only the vector width differs, so a line's adapter delta does not depend on the CPU kind or the
    path a build takes. A prompt's 14 rows of one slot take the AVX2 build's converted panels (bf16: tiles of 6,
    6 and 2 rows; int8: tiles of 4, 2 and 1 on AVX-512): each of its rows gets the bits it gets alone."""
    members = GROUPS[group]
    x = torch.randn(len(rows), WIDE[members[0]][0], generator=torch.Generator().manual_seed(3))
    got = torch.zeros(len(rows), sum(WIDE[m][1] for m in members))
    SegmentedLoraBatch(rows, wide_stacks, build.module.lora_add).add_delta(x, got, 0, group)
    rank = wide_stacks.rank
    inputs = int8_inputs if wide_stacks.quantized else (lambda v: v)
    for i, slot in enumerate(rows):
        if slot < 0:
            assert torch.equal(got[i], torch.zeros_like(got[i]))
            continue
        A, Bs = wide_stacks.weights(0, group, slot)
        h = (inputs(x[i]).double() @ A.double()).float()
        expected = torch.cat([inputs(h[m * rank:(m + 1) * rank]).double() @ b.double() for m, b in enumerate(Bs)])
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-5, atol=1e-5)
    for flags in runnable_isa_levels():
        other = torch.zeros_like(got)
        SegmentedLoraBatch(rows, wide_stacks, build_cpu_kernels(flags).module.lora_add).add_delta(x, other, 0, group)
        assert torch.equal(got, other), flags
    for i, slot in enumerate(rows):
        alone = torch.zeros(1, got.shape[1])
        SegmentedLoraBatch([slot], wide_stacks, build.module.lora_add).add_delta(x[i:i + 1], alone, 0, group)
        assert torch.equal(alone[0], got[i]), i


def test_plan_buckets_is_optimal():
    """Against every cut of random segment lengths: the pruned dynamic programme finds the cheapest."""
    rng = random.Random(7)

    def cost(runs, lengths, split):
        return sum(split + (hi - lo) * max(lengths[lo:hi]) for lo, hi in runs)

    for _ in range(300):
        lengths = [rng.choice([1, 1, 2, 3, 5, 40, 300]) for _ in range(rng.randint(1, 8))]
        split = rng.choice([0.0, 1.0, 3.5, 12.0, 1e9])
        runs = plan_buckets(lengths, split)
        assert [lo for lo, _ in runs] == [0] + [hi for _, hi in runs[:-1]] and runs[-1][1] == len(lengths)
        cheapest = min(cost(list(zip((0,) + cuts, cuts + (len(lengths),))), lengths, split)
                       for k in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), k))
        assert cost(runs, lengths, split) == pytest.approx(cheapest)


@pytest.mark.parametrize("row_slots, most", [
    ([6] * 25 + list(range(6)) + [7], 32),          # skewed: one adapter 25 rows, 7 singletons; padded: 200
    (list(range(8)) + [2] * 300, 309),               # a 300-token prompt next to 8 decode rows; padded: 2408
    ([i % 8 for i in range(32)], 32),                # cycling: one bucket, nothing to pad
])
def test_skewed_mixes_run_about_their_real_rows(stacks, row_slots, most):
    assert LoraBatch(row_slots, stacks, GatherCache()).run_rows <= most


def test_split_cost_falls_with_rank():
    """The per-row padding cost grows with rank, so a bucket is worth fewer padded rows."""
    assert split_cost_rows(8) > split_cost_rows(64) > 1


def test_int8_stacks_keep_the_delta_within_a_percent_and_grow_their_rank(adapters):
    """The block modes' int8 stacks: the rows' deltas within 1% (median; RMS) of the fp32 stacks', including
    after a higher-rank adapter arrives and every stack is re-laid (ensure_rank moves the scales with their
    columns); and the loop-based operator, which reads float stacks, refuses them by name."""
    dense = LoraStacks(SHAPES, LAYERS, SLOTS, torch.float32, torch.device("cpu"))
    packed = LoraStacks(SHAPES, LAYERS, SLOTS, torch.int8, torch.device("cpu"))
    low = {slot: tensors for slot, tensors in adapters.items() if ADAPTERS[slot][0] < 16}
    for st in (dense, packed):
        for slot, tensors in low.items():
            st.write(slot, tensors)
        st.write(1, adapters[1])  # rank 16 after the rest: the stacks grow
    kernel = load_cpu_kernels()
    if kernel is None:
        pytest.skip(f"npcd's CPU kernel is unavailable: {why_unavailable()}")
    rows = MIXES["zipf"]
    gen = torch.Generator().manual_seed(4)
    errors = []
    for layer, group in itertools.product(range(LAYERS), GROUPS):
        x = torch.randn(len(rows), SHAPES[GROUPS[group][0]][0], generator=gen)
        width = sum(SHAPES[m][1] for m in GROUPS[group])
        want, got = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
        SegmentedLoraBatch(rows, dense, kernel.module.lora_add).add_delta(x, want, layer, group)
        SegmentedLoraBatch(rows, packed, kernel.module.lora_add).add_delta(x, got, layer, group)
        for i in range(len(rows)):
            if want[i].abs().sum() == 0:
                assert torch.equal(got[i], want[i])
                continue
            errors.append(((got[i] - want[i]).norm() / want[i].norm()).item())
    # at these tiny shapes (24 inputs share a column's scale, ranks 1-16) the median row is off by 0.6%, the worst
    # by 4.6%; a rank-64 adapter over SmolLM2's 576-wide inputs rounds less (tests/engine/test_quant.py)
    assert sorted(errors)[len(errors) // 2] < 0.01 and max(errors) < 0.06, (sorted(errors)[len(errors) // 2], max(errors))
    with pytest.raises(ValueError, match="int8 LoRA stacks"):
        LoraBatch(rows, packed, GatherCache())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are madvised on Linux only")
def test_int8_stacks_live_in_one_buffer_aligned_for_huge_pages():
    """Every int8 matrix of the stacks is a view of one buffer (huge_page_bytes: 2 MB aligned, madvised for
    transparent huge pages), so a step's stream of adapter weights crosses few page boundaries; growing the
    rank lays them out in a new such buffer."""
    st = LoraStacks({m: (576, 576) for m in SHAPES}, 4, 8, torch.int8, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    st.write(0, {(0, "q_proj"): (torch.randn(16, 576, generator=gen), torch.randn(576, 16, generator=gen))})
    for rank in (16, 64):
        st.ensure_rank(rank)
        tensors = [t for stack in st.stacks.values() for t in (stack.A, *stack.B)]
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1
        first = min(t.data_ptr() for t in tensors)
        assert first % (2 << 20) == 0
        assert sum(t.numel() for t in tensors) == max(t.data_ptr() + t.numel() for t in tensors) - first
