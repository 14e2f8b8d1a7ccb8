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
                  and the expand accumulates straight into y (baddbmm_)

One bucket for everything would pad elf and guard to 300 rows: 900 rows of
work for 303 real ones. LoraBatch.plan_buckets picks the cut per step.

The base projection runs once for the whole batch. Projections that share
an input (q/k/v, gate/up) share one shrink: their A matrices sit side by side.

Adapters live in weight *stacks*, one slot per resident adapter, padded with
zeros to the largest resident rank; a module an adapter does not target is
zeros too, so different ranks and target sets share a batch. Scaling
(alpha / r or alpha / sqrt(r) for rsLoRA) is folded into B at load time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

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
    """One layer's adapters for one projection group."""

    A: torch.Tensor         # [slots, in, members * R]: member m's A^T in columns m*R:(m+1)*R
    B: list[torch.Tensor]   # per member [slots, R, out_m]: B^T * scale


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
        for layer in range(self.num_layers):
            for group, members in GROUPS.items():
                fan_in = self.module_shapes[members[0]][0]
                A = torch.zeros(self.slots, fan_in, len(members) * rank, dtype=self.dtype, device=self.device)
                B = [torch.zeros(self.slots, rank, self.module_shapes[m][1], dtype=self.dtype, device=self.device)
                     for m in members]
                out[(layer, group)] = GroupStack(A, B)
        return out

    def ensure_rank(self, rank: int) -> None:
        """Grow every stack to `rank` columns, keeping what is resident."""
        if rank <= self.rank:
            return
        grown = self._alloc(rank)
        for key, old in self.stacks.items():
            new = grown[key]
            members = len(old.B)
            for m in range(members):
                new.A[:, :, m * rank:m * rank + self.rank] = old.A[:, :, m * self.rank:(m + 1) * self.rank]
                new.B[m][:, :self.rank] = old.B[m]
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
            stack.A[slot, :, m * R:m * R + r] = a.t().to(self.dtype)
            stack.B[m][slot, :r] = b.t().to(self.dtype)
        self.generation += 1

    def clear(self, slot: int) -> None:
        for stack in self.stacks.values():
            stack.A[slot].zero_()
            for b in stack.B:
                b[slot].zero_()
        self.generation += 1


# When one more bucket beats padding, measured with bench/lora_mixes.py's shapes (SmolLM2-135M, one layer's 4
# groups; 2-core dev box, 1 thread, thread CPU time, medians of 21, load 2-3), one segment of L rows next to a
# small one, one padded bucket against two: the extra bucket costs 130-240 us (its 1 + members matmul calls
# per group), a padded row 9-26 us (rank 8 to 64; more per row at few rows). Splitting wins past ~13 padded
# rows at R = 8, 6-8 at R = 32, ~3 at R = 64, in-place and gathered buckets alike; 220 / (R + 9) fits them
# (13.0, 5.4, 3.0). Near the break-even both plans cost the same within noise (+-100 us per layer).
BREAK_EVEN_ROWS_X_RANK = 220.0
BREAK_EVEN_RANK_OFFSET = 9.0


def split_cost_rows(rank: int) -> float:
    """How many padded rows one more bucket is worth at this stack rank."""
    return BREAK_EVEN_ROWS_X_RANK / (rank + BREAK_EVEN_RANK_OFFSET)


def plan_buckets(lengths: Sequence[int], split_cost: float) -> list[tuple[int, int]]:
    """Cuts segments (slot order) into runs lo:hi minimising the sum over runs of split_cost + (hi - lo) * longest.

    Runs are contiguous in slot order because a run's weights must be a view of the stacks: copying even one
    slot's A and B (2.6 MB per layer at rank 64 on all modules) costs more than a decode step's matmul on it.
    Exact dynamic programme; the inner loop stops once the run alone costs more than the best plan found, so
    it is O(K^2) only when splitting is free. A split_cost above any padding (1e9) gives one bucket padded to
    the longest segment.
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
    in_place: bool  # its rows are a contiguous range in segment order, none padded: x and out are views
    start: int      # first row: of the batch if in_place, else of the gathered rows


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
      copies   for the buckets that are not in place, together: one gather of x (their rows * in), a
               selection of their real rows' deltas (their rows * out_total) and one index_add_ into out;
      calls    1 + members matmuls per bucket, plus those 3 copies once.

    Why buckets: torch on CPU has no segmented GEMM. One bmm padded to the longest segment (the grouping
    before buckets) runs K * S rows: 8 x 301 for a 300-token prompt next to 7 decode rows, 5.6x the
    buckets' time. One matmul per segment pays the calls of a bucket per segment: 1.4x on 8 one-row
    decode segments. Gathering each row's weights (bmm [n, 1, in] x [n, in, R]) would copy 442 KB per row
    and layer for q/k/v at rank 64, more than its matmul reads. So plan_buckets cuts the slot-ordered
    segments into contiguous runs, each a padded bmm over a view of the stacks, paying one more bucket
    only where it saves more than split_cost_rows(R) padded rows (measured above).
    """

    def __init__(self, row_slots: list[int], stacks: LoraStacks, gathered: "GatherCache",
                 split_cost: float | None = None):
        """split_cost: padded rows one more bucket is worth; None = split_cost_rows(stacks.rank), measured."""
        present = sorted({s for s in row_slots if s >= 0})
        by_slot: dict[int, list[int]] = {s: [] for s in present}
        for row, s in enumerate(row_slots):
            if s >= 0:
                by_slot[s].append(row)
        segments = [by_slot[s] for s in present]
        self.rank = stacks.rank
        cost = split_cost_rows(self.rank) if split_cost is None else split_cost
        self.buckets: list[_Bucket] = []
        gather: list[int] = []  # the gathered buckets' padded rows, one after the other (pads repeat a real row)
        rows: list[int] = []    # their real rows, in gathered order
        src: list[int] = []     # each real row's gathered position
        for lo, hi in plan_buckets([len(seg) for seg in segments], cost):
            S = max(len(seg) for seg in segments[lo:hi])
            order = [r for seg in segments[lo:hi] for r in seg]
            if order == list(range(order[0], order[0] + (hi - lo) * S)):
                self.buckets.append(_Bucket(lo, hi, S, in_place=True, start=order[0]))
                continue
            self.buckets.append(_Bucket(lo, hi, S, in_place=False, start=len(gather)))
            for seg in segments[lo:hi]:
                src.extend(range(len(gather), len(gather) + len(seg)))
                gather.extend(seg + seg[:1] * (S - len(seg)))
            rows.extend(order)
        index = partial(torch.tensor, dtype=torch.long, device=stacks.device)
        self.gather = index(gather) if gather else None
        self.rows = index(rows)
        self.src = index(src) if len(src) < len(gather) else None  # None: no padding to drop
        self.run_rows = sum((b.hi - b.lo) * b.S for b in self.buckets)
        self.weights = gathered.get(stacks, tuple(present))

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, layer: int, group: str) -> None:
        """out[i, cols_m] += x[i] @ A_m[a_i] @ B_m[a_i] for every row i with an adapter (see the class docstring).

        In-place buckets read x and accumulate into out through views (baddbmm_, beta 1); the others read one
        gather of x and write (beta 0) one delta buffer, added into out by a single index_add_.
        """
        stack = self.weights[(layer, group)]
        widths = [B.shape[-1] for B in stack.B]
        xg = dg = None
        if self.gather is not None:
            xg = x.index_select(0, self.gather)
            dg = out.new_empty(len(self.gather), out.shape[1])
        for b in self.buckets:
            K = b.hi - b.lo
            xs, ds = (x, out) if b.in_place else (xg, dg)
            h = torch.bmm(xs[b.start:b.start + K * b.S].view(K, b.S, -1), stack.A[b.lo:b.hi])  # [K, S, members*R]
            cols = ds[b.start:b.start + K * b.S].split(widths, dim=-1)
            for hm, B, col in zip(h.split(self.rank, dim=-1), stack.B, cols):
                col.view(K, b.S, -1).baddbmm_(hm, B[b.lo:b.hi], beta=1 if b.in_place else 0)
        if dg is not None:
            out.index_add_(0, self.rows, dg if self.src is None else dg.index_select(0, self.src))


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
