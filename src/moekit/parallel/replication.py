"""Hot-expert replication under expert parallelism (FasterMoE's shadowing, EPLB).

Skewed routing makes the rank holding the popular experts the slowest of its
EP group. Each rank gets ``slots`` replica slots besides its L own experts;
``plan_placement`` fills them greedily from measured per-expert loads (the
most loaded rank's hottest expert gets a replica on the least loaded rank
with a free slot, while that lowers the maximum), and each source rank then
deals its rows for a replicated expert round-robin over the expert's holders.

The layer computes exactly what it did without replicas: a replica is the
primary's weights, fetched every forward (one ``broadcast`` per replicated
expert and weight tensor, autograd-aware), so every row meets the same
weights; in backward the replicas' gradients are summed into the primary
(``reduce``), which alone is a parameter the optimizer sees. Nothing is added
to the model's state: checkpoints stay canonical.

Inside the dispatcher the holders are "virtual experts": rank q's slots are
ids q·L' … (q + 1)·L' − 1, L' = L + slots, its own experts first; the
unchanged exchange (counts, rows, regrouping) then runs over P·L' of them.

Shapes: E experts, P ranks, L own experts per rank, S slots per rank, L' = L + S.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .collectives import collective_failed


@dataclass
class Placement:
    """Which ranks hold which experts: rank q owns experts [q·L, (q + 1)·L) and holds the
    experts ``replicas[q]`` (at most ``slots``) as replicas. ``replicas`` is fixed once a
    dispatcher uses the placement (its lookup tables are made once)."""

    num_experts: int
    ep_size: int
    slots: int
    replicas: list[list[int]] = field(default_factory=list)
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.replicas:
            self.replicas = [[] for _ in range(self.ep_size)]
        self.num_local = self.num_experts // self.ep_size
        for rank, held in enumerate(self.replicas):
            if len(held) > self.slots or len(set(held)) != len(held):
                raise ValueError(f"rank {rank} holds replicas {held}: at most {self.slots} distinct experts")
            if any(e // self.num_local == rank or not 0 <= e < self.num_experts for e in held):
                raise ValueError(f"rank {rank} holds replicas {held}: experts of other ranks only")

    @property
    def slots_per_rank(self) -> int:
        """L' = L + S: virtual experts per rank."""
        return self.num_local + self.slots

    def holders(self, expert: int) -> list[int]:
        return [expert // self.num_local] + [q for q, held in enumerate(self.replicas) if expert in held]

    def replicated(self) -> list[int]:
        """Every expert with at least one replica, ascending (the order of the weight fetch)."""
        return sorted({e for held in self.replicas for e in held})

    def rank_loads(self, load_E: Tensor) -> Tensor:
        """(P,) rows each rank computes when each expert's rows are shared evenly by its holders."""
        loads = torch.zeros(self.ep_size, dtype=torch.float64)
        for e, load in enumerate(load_E.tolist()):
            holders = self.holders(e)
            for q in holders:
                loads[q] += load / len(holders)
        return loads

    def expert_of_virtual(self, device) -> Tensor:
        """(P·L',) the expert each virtual expert computes (an empty slot: its rank's first expert,
        which it never receives rows for)."""
        ids = []
        for q in range(self.ep_size):
            held = self.replicas[q] + [q * self.num_local] * (self.slots - len(self.replicas[q]))
            ids += list(range(q * self.num_local, (q + 1) * self.num_local)) + held
        return torch.tensor(ids, dtype=torch.long, device=device)

    def virtual_table(self, device) -> tuple[Tensor, Tensor]:
        """(E, P) virtual expert id of each holder of each expert (holder order: owner, then replicas by
        rank), and (E,) the number of holders."""
        key = ("virtual_table", str(device))
        if key not in self._tables:
            self._tables[key] = self._virtual_table(device)
        return self._tables[key]

    def _virtual_table(self, device) -> tuple[Tensor, Tensor]:
        table = torch.zeros(self.num_experts, self.ep_size, dtype=torch.long)
        count = torch.zeros(self.num_experts, dtype=torch.long)
        for e in range(self.num_experts):
            for j, q in enumerate(self.holders(e)):
                own = q == e // self.num_local
                table[e, j] = q * self.slots_per_rank + (e - q * self.num_local if own
                                                         else self.num_local + self.replicas[q].index(e))
            count[e] = len(self.holders(e))
        return table.to(device), count.to(device)


def max_over_mean(loads_P: Tensor) -> float:
    mean = float(loads_P.mean())
    return float(loads_P.max()) / mean if mean > 0 else 1.0


def plan_placement(load_E: Tensor, ep_size: int, slots: int) -> Placement:
    """Greedy replica placement from per-expert loads (rows per expert, any scale)."""
    placement = Placement(len(load_E), ep_size, slots)
    load_E = load_E.double().cpu()
    while True:
        loads = placement.rank_loads(load_E)
        busiest = int(loads.argmax())
        # The busiest rank's experts by the share of their rows it computes, hottest first.
        held = [e for e in range(len(load_E)) if busiest in placement.holders(e)]
        held.sort(key=lambda e: -float(load_E[e]) / len(placement.holders(e)))
        improved = False
        for expert in held:
            free = [q for q in range(ep_size) if len(placement.replicas[q]) < slots and q not in placement.holders(expert)]
            if not free:
                continue
            target = min(free, key=lambda q: float(loads[q]))
            placement.replicas[target].append(expert)
            if float(placement.rank_loads(load_E).max()) < float(loads.max()) - 1e-9:
                improved = True
                break
            placement.replicas[target].pop()
        if not improved:
            return placement


def assign_holders(indices_TK: Tensor, placement: Placement, ep_rank: int) -> Tensor:
    """The virtual expert of each assignment: a replicated expert's rows from this rank dealt
    round-robin over its holders (starting at this rank's offset, so sources spread evenly)."""
    table_EH, count_E = placement.virtual_table(indices_TK.device)
    flat = indices_TK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first = torch.searchsorted(sorted_experts, sorted_experts, side="left")
    rank_in_expert = torch.empty_like(flat)
    rank_in_expert[order] = torch.arange(flat.numel(), device=flat.device) - first
    holder = (rank_in_expert + ep_rank) % count_E[flat]
    return table_EH[flat, holder].view(indices_TK.shape)


def replicated_plan(routing, capacity, placement: Placement, ep_rank: int):
    """The sorted token-choice plan over virtual experts (dropless token choice only)."""
    from ..dispatch.plans import sorted_plan
    from ..routing.records import Routing

    if not isinstance(routing, Routing):
        raise ValueError(f"hot-expert replication deals token-choice rows over holders; the router's "
                         f"{type(routing).__name__} is not token choice")
    if capacity.per_expert is not None:
        raise ValueError("hot-expert replication needs dropless routing (capacity_factor None): capacity is "
                         "counted per expert, which its holders share")
    virtual_TK = assign_holders(routing.indices_TK, placement, ep_rank)
    return sorted_plan(virtual_TK, placement.ep_size * placement.slots_per_rank, routing.weights_TK,
                       valid_T=routing.valid_T, active_TK=routing.active_TK)


def enable_replication(model: nn.Module, slots: int) -> None:
    """Give every expert-parallel layer of ``model`` ``slots`` replica slots per rank (empty until
    ``replan_replicas``) and start counting its rows per expert."""
    from torch.distributed.fsdp import FSDPModule

    from .setup import sharded_layers

    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"replica slots ({slots!r}) must be a positive integer")
    layers = sharded_layers(model)
    if not layers:
        raise ValueError("hot-expert replication needs expert parallelism: the model has no expert-parallel layer")
    for name, moe in layers:
        if isinstance(moe.experts, FSDPModule):
            raise ValueError(f"hot-expert replication copies whole experts; layer {name!r} shards them with FSDP "
                             "(use it with expert parallelism and DDP)")
        dispatcher = moe.dispatcher
        dispatcher.replicate(moe.experts, Placement(moe.config.num_experts, dispatcher.ep_size, slots))
        dispatcher.track_load, dispatcher.load_E = True, None


def replan_replicas(model: nn.Module) -> list[dict]:
    """Re-place every layer's replicas from the rows per expert routed since its last placement
    (the same on every rank of an EP group: they are summed over it). Returns, per layer, the
    max/mean rank load under the old and the new placement for those rows, and the replicas."""
    from .setup import sharded_layers

    reports = []
    for name, moe in sharded_layers(model):
        dispatcher = moe.dispatcher
        old, load_E = dispatcher.placement, dispatcher.load_E
        if old is None or load_E is None:
            continue
        new = plan_placement(load_E.cpu(), dispatcher.ep_size, old.slots)
        dispatcher.replicate(moe.experts, new)
        dispatcher.load_E = None
        reports.append({"layer": name, "old_max_over_mean": round(max_over_mean(old.rank_loads(load_E.cpu())), 4),
                        "new_max_over_mean": round(max_over_mean(new.rank_loads(load_E.cpu())), 4),
                        "replicas": new.replicas})
    return reports


class _FetchReplicas(torch.autograd.Function):
    """This rank's replica slots of each weight tensor, broadcast from each expert's owner;
    backward sums every holder's gradient into the owner's (``reduce``). One node for all the
    tensors, so that every rank runs the reduces at the same point of its backward."""

    @staticmethod
    def forward(ctx, placement: Placement, group, ep_rank: int, *own: Tensor) -> tuple[Tensor, ...]:
        ctx.placement, ctx.group, ctx.ep_rank = placement, group, ep_rank
        L, mine = placement.num_local, placement.replicas[ep_rank]
        out = [w.new_zeros(placement.slots, *w.shape[1:]) for w in own]
        for expert in placement.replicated():
            owner = expert // L
            for w_L, w_S in zip(own, out, strict=True):
                buffer = w_L[expert - owner * L].clone() if owner == ep_rank else w_L.new_empty(w_L.shape[1:])
                try:
                    dist.broadcast(buffer, src=dist.get_global_rank(group, owner), group=group)
                except RuntimeError as err:
                    raise collective_failed("broadcast of replicated expert weights", group, err) from err
                if expert in mine:
                    w_S[mine.index(expert)] = buffer
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        placement, group, ep_rank = ctx.placement, ctx.group, ctx.ep_rank
        L, mine = placement.num_local, placement.replicas[ep_rank]
        grads_L = [g.new_zeros(L, *g.shape[1:]) for g in grads]
        for expert in placement.replicated():
            owner = expert // L
            for g_S, g_L in zip(grads, grads_L, strict=True):
                buffer = g_S[mine.index(expert)].clone() if expert in mine else g_S.new_zeros(g_S.shape[1:])
                try:
                    dist.reduce(buffer, dst=dist.get_global_rank(group, owner), group=group)
                except RuntimeError as err:
                    raise collective_failed("backward reduce of replica gradients", group, err) from err
                if owner == ep_rank:
                    g_L[expert - owner * L] = buffer
        return (None, None, None, *grads_L)


def replica_experts(experts: nn.Module, placement: Placement, group, ep_rank: int) -> tuple[nn.Module, Tensor]:
    """An experts module of this rank's S replica slots whose weights are fetched from the owners
    (on the autograd graph), and a zero scalar tied to every fetched weight: added to the output,
    it makes every rank run the backward reduces, rows or not. Collective: every rank calls it."""
    view = experts.shard(0, 0)  # the same kind, no experts: its weights are replaced below
    view.num_experts = placement.slots
    names, params = zip(*experts.named_parameters(), strict=True)
    fetched = _FetchReplicas.apply(placement, group, ep_rank, *params)
    for name, tensor in zip(names, fetched, strict=True):
        delattr(view, name)
        setattr(view, name, tensor)
    return view, sum(t.sum() for t in fetched if t.requires_grad) * 0
