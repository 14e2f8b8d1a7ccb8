"""The mixed-adapter LoRA operator: many adapters, one batch, one forward pass.

A LoRA adapter adds `scale * B @ A @ x` to a projection `W @ x`. Serving many
personas means every row of a batch may carry a different (A, B), or none.
Merging weights would serve one adapter at a time; looping over requests
would run thousands of tiny matmuls per step. Instead (the Punica SGMV /
S-LoRA idea), once per step we sort the rows by adapter into segments and cut
the segments into a few *buckets*, each one batched matmul with its segments
padded to its longest:

    rows      [r0:elf, r1:none, r2:guard, r3:elf, r4..r303:bard (a prompt)]
    segments  elf:[r0, r3]   guard:[r2]   bard:[r4..r303]
    buckets   [elf, guard], guard padded to 2 rows:
                  shrink  h = x[r0, r3, r2, r2] @ A     one bmm [2, 2, in] x [2, in, R]
                  expand  d = h @ B                     one bmm per member projection
                  y[r0, r3, r2] += d[real positions]
              [bard], rows already contiguous: x[4:304] and y[4:304] are views,
                  and the expand accumulates straight into y (addmm_)

One bucket for everything would pad elf and guard to 300 rows: 900 rows of
work for 303 real ones. `plan_buckets` picks the cut per step, trading the calls
of one more bucket against padded rows.

The base projection runs once for the whole batch. Projections that share
an input (q/k/v, gate/up) share one shrink: their A matrices sit side by side.

Adapters live in weight *stacks*, one slot per resident adapter, padded with
zeros to the largest resident rank; a module an adapter does not target is
zeros too, so different ranks and target sets share a batch. Scaling
(alpha / r or alpha / sqrt(r) for rsLoRA) is folded into B at load time.
Stacks are fp32, bf16 or int8 with a scale per column (`quantize_columns`), the int8 ones laid out for
integer dot products (`quad_offsets`; only npcd's CPU kernel, `SegmentedLoraBatch`, reads them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, partial

import torch

from npcd.engine.pages import huge_page_bytes

# Projection groups sharing one input, in the column order of the fused base weights.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, members in GROUPS.items() for m in members}


@dataclass
class GroupStack:
    """One layer's adapters for one projection group. An int8 stack holds each slot's matrices as flat bytes
    (quad_offsets says where each weight is), its true weights those times A_scale and B_scale[m], per column
    (LoraStacks.weights); a float stack has an empty A_scale and no B_scale."""

    A: torch.Tensor         # [slots, in, members * R]: member m's A^T in columns m*R:(m+1)*R (int8: flat bytes)
    B: list[torch.Tensor]   # per member [slots, R, out_m]: B^T * scale (int8: flat bytes)
    A_scale: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # [slots, members * R] fp32
    B_scale: list[torch.Tensor] = field(default_factory=list)             # per member [slots, out_m] fp32


QUAD = 4             # consecutive inputs of one column that one 32-bit lane of the kernel's dot products holds
QUAD_ZERO = 128      # an int8 stack's byte for a zero weight: bytes hold q + 128
QUAD_BLOCK_COLS = 128  # columns per contiguous block: the kernel's task unit (kCols in npcd/engine/kernels/lora.cpp)


@cache
def quad_offsets(rows: int, cols: int) -> torch.Tensor:
    """Where element (k, c) of an int8 stack's [rows, cols] matrix (rows: the direction the kernel sums over) sits
    in its flat ceil(rows / 4) * cols * 4 bytes: blocks of QUAD_BLOCK_COLS columns, the last one narrower, each
    block's bytes contiguous and in it the 4 rows of a quad of one column adjacent, quad after quad. Adjacent
    bytes are vpdpbusd's operand; a contiguous block is what one task unit of the kernel streams."""
    k, c = torch.arange(rows).unsqueeze(1), torch.arange(cols).unsqueeze(0)
    start = c - c % QUAD_BLOCK_COLS
    width = (cols - start).clamp(max=QUAD_BLOCK_COLS)
    return start * quads(rows) * QUAD + ((k // QUAD) * width + c % QUAD_BLOCK_COLS) * QUAD + k % QUAD


def quads(rows: int) -> int:
    """How many quads hold `rows` summed-over rows (the last one zero padded)."""
    return -(-rows // QUAD)


def quantize_columns(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] float → (int8 [rows, cols], fp32 scale [cols]) with w ≈ q * scale: symmetric, one scale per
    column, the direction the kernel sums over (rows), so the scale multiplies the finished sum once. An all-zero
    column (an unused rank) gets scale 0."""
    scale = w.abs().amax(dim=0).float() / 127.0
    q = torch.round(w.float() / torch.where(scale > 0, scale, 1.0)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _biased(q: torch.Tensor) -> torch.Tensor:
    """int8 weights as an int8 stack's bytes hold them."""
    return (q.to(torch.int16) + QUAD_ZERO).to(torch.uint8)


class LoraStacks:
    """Resident adapters' weights, slot-indexed, sized to the largest resident rank."""

    def __init__(self, module_shapes: dict[str, tuple[int, int]], num_layers: int, slots: int,
                 dtype: torch.dtype, device: torch.device):
        self.module_shapes, self.num_layers, self.slots = module_shapes, num_layers, slots
        self.dtype, self.device = dtype, device
        self.rank = 0
        self.stacks: dict[tuple[int, str], GroupStack] = {}
        self.generation = 0  # bumped on every change, so per-step gathers know when to refresh

    def _alloc(self, rank: int) -> dict[tuple[int, str], GroupStack]:
        out = {}
        zeros = partial(torch.zeros, device=self.device)
        if self.quantized:  # every int8 matrix in one huge-page buffer (npcd.engine.pages), zero weights to start
            per_slot = [quads(self.module_shapes[members[0]][0]) * len(members) * rank * QUAD
                        for members in GROUPS.values()]
            per_slot += [quads(rank) * self.module_shapes[m][1] * QUAD for members in GROUPS.values() for m in members]
            arena = huge_page_bytes(self.num_layers * self.slots * sum(per_slot), self.device).fill_(QUAD_ZERO)
            taken = 0

            def flat(width: int) -> torch.Tensor:
                nonlocal taken
                taken += self.slots * width
                return arena[taken - self.slots * width:taken].view(self.slots, width)
        for layer in range(self.num_layers):
            for group, members in GROUPS.items():
                fan_in = self.module_shapes[members[0]][0]
                if self.quantized:
                    A = flat(quads(fan_in) * len(members) * rank * QUAD)
                    B = [flat(quads(rank) * self.module_shapes[m][1] * QUAD) for m in members]
                    stack = GroupStack(A, B, zeros(self.slots, len(members) * rank),
                                       [zeros(self.slots, self.module_shapes[m][1]) for m in members])
                else:
                    A = zeros(self.slots, fan_in, len(members) * rank, dtype=self.dtype)
                    B = [zeros(self.slots, rank, self.module_shapes[m][1], dtype=self.dtype) for m in members]
                    stack = GroupStack(A, B)
                out[(layer, group)] = stack
        return out

    def weights(self, layer: int, group: str, slot: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Slot's true weights in one group, fp32: A [in, members * R] and each member's B [R, out_m]."""
        stack = self.stacks[(layer, group)]
        if not self.quantized:
            return stack.A[slot].float(), [b[slot].float() for b in stack.B]
        fan_in = self.module_shapes[GROUPS[group][0]][0]
        A = stack.A[slot][quad_offsets(fan_in, stack.A_scale.shape[1])].float() - QUAD_ZERO
        Bs = [(b[slot][quad_offsets(self.rank, scale.shape[1])].float() - QUAD_ZERO) * scale[slot]
              for b, scale in zip(stack.B, stack.B_scale)]
        return A * stack.A_scale[slot], Bs

    @property
    def quantized(self) -> bool:
        return self.dtype == torch.int8

    def describe(self) -> str:
        """The stacks' dtype as the startup log says it."""
        if self.quantized:
            return "int8, a scale per column, over int8 inputs per row and block of 32"
        return str(self.dtype).removeprefix("torch.")

    def ensure_rank(self, rank: int) -> None:
        """Grow every stack to `rank` columns, keeping what is resident."""
        if rank <= self.rank:
            return
        grown = self._alloc(rank)
        for (layer, group), old in self.stacks.items():
            new = grown[(layer, group)]
            members = len(old.B)
            fan_in = self.module_shapes[GROUPS[group][0]][0]
            for m in range(members):
                was, now = slice(m * self.rank, (m + 1) * self.rank), slice(m * rank, m * rank + self.rank)
                if not self.quantized:
                    new.A[:, :, now] = old.A[:, :, was]
                    new.B[m][:, :self.rank] = old.B[m]
                    continue
                old_a = old.A[:, quad_offsets(fan_in, members * self.rank)[:, was]]
                new.A[:, quad_offsets(fan_in, members * rank)[:, now]] = old_a
                width = self.module_shapes[GROUPS[group][m]][1]
                new.B[m][:, quad_offsets(rank, width)[:self.rank]] = old.B[m][:, quad_offsets(self.rank, width)]
                # B's scales are per output column: zero rows added below them change none
                new.A_scale[:, now] = old.A_scale[:, was]
                new.B_scale[m].copy_(old.B_scale[m])
        self.stacks, self.rank = grown, rank
        self.generation += 1

    def write(self, slot: int, tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Installs an adapter: tensors[(layer, module)] = (A [r, in], B_scaled [out, r])."""
        rank = max((a.shape[0] for a, _ in tensors.values()), default=1)
        self.ensure_rank(rank)
        self.clear(slot)
        R = self.rank
        for (layer, module), (a, b) in tensors.items():
            group = MODULE_GROUP[module]
            m = GROUPS[group].index(module)
            stack = self.stacks[(layer, group)]
            r = a.shape[0]
            if self.quantized:
                qa, stack.A_scale[slot, m * R:m * R + r] = quantize_columns(a.t())
                stack.A[slot][quad_offsets(a.shape[1], len(stack.B) * R)[:, m * R:m * R + r]] = _biased(qa)
                qb, stack.B_scale[m][slot] = quantize_columns(b.t())
                stack.B[m][slot][quad_offsets(R, b.shape[0])[:r]] = _biased(qb)
            else:
                stack.A[slot, :, m * R:m * R + r] = a.t().to(self.dtype)
                stack.B[m][slot, :r] = b.t().to(self.dtype)
        self.generation += 1

    def clear(self, slot: int) -> None:
        zero = QUAD_ZERO if self.quantized else 0
        for stack in self.stacks.values():  # zero weights are a zero delta whatever the scales hold
            stack.A[slot].fill_(zero)
            for b in stack.B:
                b[slot].fill_(zero)
        self.generation += 1


# When one more bucket beats padding, measured on bench/lora_mixes.py's shapes (SmolLM2-135M, one layer's 4
# groups; 2-core dev box, 1 thread, thread CPU time, medians of 21, load ~4): a segment of L rows next to a
# 1- or 2-row one, one padded bucket against two. The extra bucket costs 30-50 us in place, ~115 us gathered
# (its 1 + members matmul calls per group, a cat); a padded row 6-10 us at rank 8 to 32, 19 us at 64 (copies of
# the out_total-wide delta, then FLOPs). Splitting wins past 14-16 padded rows at R = 8 and 16, 7-10 at
# R = 32, 6 at R = 64; 560 / (R + 29) fits them (15.1, 12.4, 9.2, 6.0). Near the break-even both plans cost
# the same within noise (+-30 us per layer), so the rule needs no more precision: on 9 random uniform and zipf
# decode mixes of 16-32 rows, scaling it by 0.5 to 4 moved their total step time by under 5% at R = 8 and 64
# (one padded bucket: +4% at R = 64), less than repeated runs of one plan differ (~10%). Where it matters,
# skewed mixes and prompts, splitting saves hundreds of padded rows.
BREAK_EVEN_ROWS_X_RANK = 560.0
BREAK_EVEN_RANK_OFFSET = 29.0


def split_cost_rows(rank: int) -> float:
    """How many padded rows one more bucket is worth at this stack rank."""
    return BREAK_EVEN_ROWS_X_RANK / (rank + BREAK_EVEN_RANK_OFFSET)


def plan_buckets(lengths: Sequence[int], split_cost: float) -> list[tuple[int, int]]:
    """Cuts segments (slot order) into runs lo:hi minimising the sum over runs of split_cost + (hi - lo) * longest.

    Runs are contiguous in slot order because a run's weights must be a view of the stacks: copying even one
    slot's A and B (2.6 MB per layer at rank 64 on all modules) costs more than a decode step's matmul on it.
    Exact dynamic programme, O(K^2) at worst; the inner loop stops once the run alone costs more than the best
    plan found. A split_cost above any padding (1e9) gives one bucket padded to the longest segment.
    """
    best = [0.0] + [math.inf] * len(lengths)
    cut = [0] * (len(lengths) + 1)
    for hi in range(1, len(lengths) + 1):
        longest = 0
        for lo in range(hi - 1, -1, -1):
            longest = max(longest, lengths[lo])
            run = split_cost + (hi - lo) * longest
            if run >= best[hi]:
                break  # best[lo] >= 0, and the run only grows as lo goes down
            if best[lo] + run < best[hi]:
                best[hi], cut[hi] = best[lo] + run, lo
    runs, hi = [], len(lengths)
    while hi:
        runs.append((cut[hi], hi))
        hi = cut[hi]
    return runs[::-1]


@dataclass(frozen=True)
class _Bucket:
    """Segments lo:hi of the present slots, one bmm over [hi - lo, S, in]: each segment padded to S rows."""

    lo: int
    hi: int
    S: int
    rows: slice  # in the batch for an in-place bucket (one segment on contiguous rows), else in the gathered rows


class LoraBatch:
    """Per-step routing of rows to adapters, planned once per batch and shared by every layer of the step.

    Semantics (per layer and projection group, R the stack rank, scale folded into B):

        for every token row i with slot a_i = row_slots[i] != -1, for each member projection m:
            out[i, cols_m] += (x[i] @ A[a_i][:, m*R:(m+1)*R]) @ B_m[a_i]

    Shapes: x [n, in]; out [n, out_total], member m in columns cols_m (the fused base projection's layout);
    A [slots, in, members*R]; B_m [slots, R, out_m]; row_slots [n]. Rows with -1, an adapter's zero-padded
    rank and the modules it does not target add exactly 0.

    Cost per group, n_real rows with an adapter, K slots present, `run_rows` rows run (n_real plus padding):
      FLOPs    2 * run_rows * R * (members * in + out_total), of which the n_real rows' are useful;
      weights  each present slot's A and B read once: K * R * (members * in + out_total) floats. This bounds
               decode: 8 distinct adapters at rank 64 stream 20.8 MB per layer, the base projections 14 MB;
      copies   none for an in-place bucket (one segment on contiguous rows: views). The gathered buckets
               together: one gather of x (their run rows * in), each one's member deltas joined (its run
               rows * out_total) and the buckets' joined if several (again), the real rows selected if any
               is padded, and one index_add_ into out (their real rows * out_total);
      calls    1 + members matmuls per bucket (+1 cat when gathered), plus those <= 4 copies once.

    Why buckets: torch on CPU has no segmented GEMM. One bmm padded to the longest segment (the grouping
    before buckets) runs K * S rows: 8 x 301 for a 300-token prompt next to 8 decode rows on 8 adapters,
    5.4-5.6x the buckets' time in bench/lora_mixes.py. One matmul per segment pays a bucket's calls per
    segment: 1.3-1.5x on 8 one-row decode segments. Gathering each row's weights (bmm [n, 1, in] x [n, in, R])
    would copy 442 KB per row and layer for q/k/v at rank 64, more than its matmul reads. So plan_buckets
    cuts the slot-ordered segments into contiguous runs, each a padded bmm over a view of the stacks,
    paying one more bucket only where it saves more than split_cost_rows(R) padded rows (measured above).
    """

    def __init__(self, row_slots: list[int], stacks: LoraStacks, gathered: GatherCache,
                 split_cost: float | None = None):
        """split_cost: padded rows one more bucket is worth; None = split_cost_rows(stacks.rank), measured."""
        if stacks.quantized:
            raise ValueError("int8 LoRA stacks are read by npcd's CPU kernel only (SegmentedLoraBatch)")
        present = sorted({s for s in row_slots if s >= 0})
        by_slot: dict[int, list[int]] = {s: [] for s in present}
        for row, s in enumerate(row_slots):
            if s >= 0:
                by_slot[s].append(row)
        segments = [by_slot[s] for s in present]
        self.rank = stacks.rank
        cost = split_cost_rows(self.rank) if split_cost is None else split_cost
        self.in_place: list[_Bucket] = []
        self.gathered: list[_Bucket] = []
        gather: list[int] = []  # the gathered buckets' padded rows, one after the other (pads repeat a real row)
        rows: list[int] = []    # their real rows, in gathered order
        src: list[int] = []     # each real row's gathered position
        for lo, hi in plan_buckets([len(seg) for seg in segments], cost):
            S = max(len(seg) for seg in segments[lo:hi])
            first = segments[lo][0]
            if hi - lo == 1 and segments[lo] == list(range(first, first + S)):
                self.in_place.append(_Bucket(lo, hi, S, slice(first, first + S)))
                continue
            self.gathered.append(_Bucket(lo, hi, S, slice(len(gather), len(gather) + (hi - lo) * S)))
            for seg in segments[lo:hi]:
                src.extend(range(len(gather), len(gather) + len(seg)))
                gather.extend(seg + seg[:1] * (S - len(seg)))
                rows.extend(seg)
        index = partial(torch.tensor, dtype=torch.long, device=stacks.device)
        self.gather, self.rows = index(gather), index(rows)
        self.src = index(src) if len(src) < len(gather) else None  # None: no padding to drop
        self.buckets = self.in_place + self.gathered
        self.run_rows = sum((b.hi - b.lo) * b.S for b in self.buckets)
        self.widths = {g: [stacks.module_shapes[m][1] for m in members] for g, members in GROUPS.items()}
        self.weights = gathered.get(stacks, tuple(present))
        # One bucket over every present slot (most decode steps) uses the stacks as they are: a view costs ~3 us
        # here, and slicing 1 + members of them per call made 8-distinct-adapter decode steps at rank 8 13-15%
        # slower than the operator before buckets (9.2 -> 10.4 ms, 14.7 -> 16.9 ms, two runs). Views taken once
        # per batch instead cost 6 ms per new batch of three buckets (8 decode rows + a 43-token prompt), more
        # than its calls save.
        self.whole = not self.in_place and len(self.gathered) == 1

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, layer: int, group: str) -> None:
        """out[i, cols_m] += x[i] @ A_m[a_i] @ B_m[a_i] for every row i with an adapter (see the class docstring).

        An in-place bucket reads its rows of x and accumulates into its rows of out through views: addmm_ on
        a column block, which BLAS writes with a row stride, no copy. The gathered buckets share one gather
        of x; each joins its members' deltas (bmm, cat), and one index_add_ adds all their real rows into
        out. baddbmm_ into out's column blocks viewed [K, S, out_m] would save the join, but costs more once
        K > 1: 748 us against 648 us for bmm + cat (8 x 4 rows, rank 64, gate and up).
        """
        stack = self.weights[(layer, group)]
        R = self.rank
        for b in self.in_place:
            h = x[b.rows] @ stack.A[b.lo]                                   # [S, members*R]
            for hm, B, col in zip(h.split(R, dim=-1), stack.B, out[b.rows].split(self.widths[group], dim=-1)):
                col.addmm_(hm, B[b.lo])
        if not self.gathered:
            return
        xg = x.index_select(0, self.gather)
        parts = []
        for b in self.gathered:
            A, Bs = (stack.A, stack.B) if self.whole else (stack.A[b.lo:b.hi], [B[b.lo:b.hi] for B in stack.B])
            h = torch.bmm(xg[b.rows].view(b.hi - b.lo, b.S, -1), A)        # [K, S, members*R]
            if len(Bs) == 1:
                d = torch.bmm(h, Bs[0])
            else:
                d = torch.cat([torch.bmm(hm, B) for hm, B in zip(h.split(R, dim=-1), Bs)], dim=-1)
            parts.append(d.flatten(0, 1))
        d = parts[0] if len(parts) == 1 else torch.cat(parts)
        out.index_add_(0, self.rows, d if self.src is None else d.index_select(0, self.src))


class SegmentedLoraBatch:
    """LoraBatch's semantics through npcd's segmented CPU kernel (npcd/engine/kernels/lora.cpp), for fp32
    activations on the CPU over fp32, bf16 or int8 stacks: rows read in place (no gather, no padding, no bucket plan), each adapter's weights streamed once
    per step for all its rows, and every row's delta summed in a fixed order, so a row's result does not
    depend on its batch companions."""

    def __init__(self, row_slots: list[int], stacks: LoraStacks, lora_add: Callable[..., None]):
        self.stacks, self._add = stacks, lora_add
        self.slots = torch.tensor(row_slots, dtype=torch.long)

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, layer: int, group: str) -> None:
        stack = self.stacks.stacks[(layer, group)]
        self._add(x.contiguous(), out, stack.A, stack.B, self.slots, stack.A_scale, stack.B_scale)


class GatherCache:
    """Keeps the stacks of the last set of present slots, so steady decoding never copies weights."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: dict[tuple[int, str], GroupStack] | None = None

    def get(self, stacks: LoraStacks, present: tuple[int, ...]) -> dict[tuple[int, str], GroupStack]:
        key = (stacks.generation, id(stacks.stacks), present)
        if key != self.key:
            if present == tuple(range(stacks.slots)):
                self.value = stacks.stacks
            else:
                idx = torch.tensor(present, dtype=torch.long, device=stacks.device)
                self.value = {k: GroupStack(v.A.index_select(0, idx), [b.index_select(0, idx) for b in v.B])
                              for k, v in stacks.stacks.items()}
            self.key = key
        return self.value
