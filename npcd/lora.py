"""The mixed-adapter LoRA operator: many adapters, one batch, one forward pass.

A LoRA adapter adds `scale * B @ A @ x` to a projection `W @ x`. Serving many
personas means every row of a batch may carry a different (A, B), or none.
Merging weights would serve one adapter at a time; looping over requests
would run thousands of tiny matmuls per step. Instead (the Punica SGMV /
S-LoRA idea), once per step we group the rows by adapter:

    rows  [r0:elf, r1:none, r2:guard, r3:elf]
    sorted segments, padded to the longest:   elf:[r0, r3]  guard:[r2, pad]
    shrink  h = x[segments] @ A[adapters]     one bmm  [K, S, in] x [K, in, R]
    expand  d = h @ B[adapters]               one bmm per member projection
    y[rows with an adapter] += d[their segment positions]

The base projection runs once for the whole batch; the delta costs two
batched matmuls per projection group whatever the mix. Projections that share
an input (q/k/v, gate/up) share one shrink: their A matrices sit side by side.

Adapters live in weight *stacks*, one slot per resident adapter, padded with
zeros to the largest resident rank; a module an adapter does not target is
zeros too, so different ranks and target sets share a batch. Scaling
(alpha / r or alpha / sqrt(r) for rsLoRA) is folded into B at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class LoraBatch:
    """Per-step routing of rows to adapter segments, shared by every layer of the step.

    `row_slots` gives each flattened token row its adapter slot, or -1 for none.
    The weights of the slots present are gathered once per batch composition
    (a view when every resident slot is present) and reused until it changes.
    """

    def __init__(self, row_slots: list[int], stacks: LoraStacks, gathered: "GatherCache"):
        device = stacks.device
        present = sorted({s for s in row_slots if s >= 0})
        by_slot: dict[int, list[int]] = {s: [] for s in present}
        for row, s in enumerate(row_slots):
            if s >= 0:
                by_slot[s].append(row)
        self.K = len(present)
        self.S = max(len(r) for r in by_slot.values())
        gather, rows, src = [], [], []
        for k, s in enumerate(present):
            seg = by_slot[s]
            gather.extend(seg + [seg[0]] * (self.S - len(seg)))  # pads repeat a real row; results unused
            rows.extend(seg)
            src.extend(range(k * self.S, k * self.S + len(seg)))
        self.gather_index = torch.tensor(gather, dtype=torch.long, device=device)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.src = torch.tensor(src, dtype=torch.long, device=device)
        self.rank = stacks.rank
        self.weights = gathered.get(stacks, tuple(present))

    def add_delta(self, x: torch.Tensor, out: torch.Tensor, layer: int, group: str) -> None:
        """out[rows] += scale * B @ A @ x[rows], each row with its own adapter."""
        stack = self.weights[(layer, group)]
        R = self.rank
        xs = x.index_select(0, self.gather_index).view(self.K, self.S, x.shape[-1])
        h = torch.bmm(xs, stack.A)                                   # [K, S, members*R]
        if len(stack.B) == 1:
            delta = torch.bmm(h, stack.B[0])
        else:
            delta = torch.cat([torch.bmm(h[:, :, m * R:(m + 1) * R], b) for m, b in enumerate(stack.B)], dim=-1)
        out.index_add_(0, self.rows, delta.view(self.K * self.S, -1).index_select(0, self.src))


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
