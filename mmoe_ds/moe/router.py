"""The one routing implementation: logits, top-k, capacity, combine weights, losses, statistics.

Every mode of `RouterConfig` is this code with different parameters:
  logits = W·x (+ E[modality] | with W chosen per modality) ; masked to the modality's pool
  top-k per token with the token's modality's k ; capacity drops within (expert, slot group)
Slot groups: with one shared capacity every modality competes for the same slots of an expert;
with per-modality capacity each modality owns a contiguous block of slots, so the dispatch
buffer stays one [experts, capacity, d] tensor that DeepSpeed's all-to-all can move.

Pure torch; expert parallelism only needs `ep_group` (a torch process group) to agree on
buffer sizes across ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import RouterConfig
from .experts import calls_modules
from .losses import _entropy, router_aux_losses


@dataclass
class RoutingStats:
    """Detached per-call statistics for logging; tensors stay on device until `to_dict`."""

    tokens: Tensor  # [M] tokens of each modality
    routed: Tensor  # [M, E] routes chosen by the router, before capacity
    kept: Tensor  # [M, E] routes that reached their expert
    entropy: Tensor  # [M] mean per-token routing entropy (nats)

    @property
    def dropped(self) -> Tensor:
        """[M] routes dropped by capacity, per modality."""
        return (self.routed - self.kept).sum(-1)

    def to_dict(self, modalities: tuple[str, ...]) -> dict[str, dict]:
        tokens, routed, kept = self.tokens.tolist(), self.routed.tolist(), self.kept.tolist()
        dropped, entropy = self.dropped.tolist(), self.entropy.tolist()
        return {m: {"tokens": int(tokens[i]), "routed_per_expert": [int(v) for v in routed[i]],
                    "kept_per_expert": [int(v) for v in kept[i]], "dropped": int(dropped[i]),
                    "entropy": float(entropy[i])} for i, m in enumerate(modalities)}

    @staticmethod
    def merge(stats: list["RoutingStats"]) -> "RoutingStats":
        """Sum counts over calls (layers or steps); entropy is averaged weighted by tokens."""
        tokens = sum(s.tokens for s in stats)
        entropy = sum(s.entropy * s.tokens for s in stats) / tokens.clamp(min=1)
        return RoutingStats(tokens, sum(s.routed for s in stats), sum(s.kept for s in stats), entropy)


@dataclass
class Selection:
    """Result of `ModalityRouter.select`, all [S, K]: each token's top-k experts before capacity."""

    chosen: Tensor  # int64 expert ids, best first
    probs: Tensor  # fp32 router probability of each chosen expert
    valid: Tensor  # bool: False for routes beyond the token's own k (modalities with a smaller top-k)


@dataclass
class SlotAssignment:
    """Result of `ModalityRouter.assign_slots`, all [S, K] except `capacity`."""

    keep: Tensor  # bool: the route has a slot (valid and within its group's capacity)
    slot: Tensor  # int64 position in the expert's dispatch buffer (0 where not kept)
    capacity: int  # slots per expert in the dispatch buffer (agreed across the ep group)


@dataclass
class Routing:
    """Where each (route, token) goes. Routes are the k dimension: [K, S] like DeepSpeed's gate."""

    expert_index: Tensor  # [K, S] int64, -1 = unused route (token's k smaller) or dropped
    slot: Tensor  # [K, S] int64 position in the expert's capacity buffer (0 where index is -1)
    combine_weight: Tensor  # [K, S] fp32, 0 where index is -1
    capacity: int  # slots per expert in the dispatch buffer
    logits: Tensor  # [S, E] fp32 router logits (-inf outside a modality's pool)
    aux_loss: Tensor  # weighted sum of the enabled aux losses
    aux_losses: dict[str, Tensor]  # unweighted, by name
    stats: RoutingStats


def _own_generator() -> torch.Generator:
    """A CPU generator seeded from the global generator's current state without advancing it:
    deterministic for a given seed, different for every layer (the state moves between layers),
    and drawing from it leaves the global stream untouched."""
    import hashlib

    digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class ModalityRouter(nn.Module):
    """Gate parameters plus `route()`. Named like DeepSpeed's TopKGate (`wg`) so weights interchange.

    Parameter names avoid the word "expert": DeepSpeed's checkpointing treats every state-dict
    key containing it as an expert weight.
    """

    def __init__(self, cfg: RouterConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        M, E = cfg.num_modalities, cfg.num_experts
        router_rows = E * M if cfg.mode == "separate_routers" else E
        self.wg = nn.Linear(hidden_size, router_rows, bias=False)
        if cfg.mode == "modality_bias":
            # Drawn from its own generator, so the global stream (and with it every shared tensor
            # drawn after this one) is the same with or without E[m]: same seed => same init across arms.
            self.modality_bias = nn.Parameter(
                torch.randn(M, E, generator=_own_generator()) * cfg.modality_bias_init_std)
        self.ep_group = None
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def routing_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(pool mask [M, E], top-k per modality [M]) on `device`, built from the config once.

        Plain cached tensors rather than buffers: they are configuration, not state, and HF's
        meta-device loading leaves non-persistent buffers uninitialised.
        """
        if device not in self._tables:
            cfg = self.cfg
            pool_mask = torch.zeros(cfg.num_modalities, cfg.num_experts, dtype=torch.bool)
            for m, pool in enumerate(cfg.pool_members):
                pool_mask[m, list(pool)] = True
            self._tables[device] = (pool_mask.to(device), torch.tensor(cfg.top_k_per_modality, device=device))
        return self._tables[device]

    def _set_ep_group(self, ep_group) -> None:
        """Called by DeepSpeed's MOELayer; routing uses it to agree on buffer sizes."""
        self.ep_group = ep_group

    # -- logits -------------------------------------------------------------------------------
    def compute_logits(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        """fp32 router logits [S, E], masked to each token's pool."""
        cfg = self.cfg
        x = x.float()
        if self.training and cfg.jitter_eps > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        if calls_modules(self.wg):  # PEFT / offload / hooks: run `wg` as a module, in its own dtype
            logits = self.wg(x.to(getattr(self.wg, "weight", x).dtype)).float()
        else:
            logits = nn.functional.linear(x, self.wg.weight.float())
        if cfg.mode == "separate_routers":
            logits = logits.view(-1, cfg.num_modalities, cfg.num_experts)
            logits = logits.gather(1, modality_ids.view(-1, 1, 1).expand(-1, 1, cfg.num_experts)).squeeze(1)
        elif cfg.mode == "modality_bias":
            logits = logits + self.modality_bias.float()[modality_ids]
        elif cfg.mode == "masked_pools":
            logits = logits.masked_fill(~self.routing_tables(x.device)[0][modality_ids], float("-inf"))
        return logits

    def check_modality_ids(self, modality_ids: Tensor, num_tokens: int) -> Tensor:
        modality_ids = modality_ids.reshape(-1).long()
        if modality_ids.numel() != num_tokens:
            raise ValueError(f"modality_ids has {modality_ids.numel()} entries for {num_tokens} tokens; "
                             f"pass one modality id per token (same shape as hidden_states[..., 0]).")
        M = self.cfg.num_modalities
        in_range = ((modality_ids >= 0) & (modality_ids < M)).all()
        message = f"modality_ids must be in [0, {M}) for modalities {list(self.cfg.modalities)}"
        if modality_ids.is_cuda:
            torch._assert_async(in_range, message)  # no host sync on the hot path
        elif num_tokens and not bool(in_range):
            bad = modality_ids[(modality_ids < 0) | (modality_ids >= M)].unique().tolist()
            raise ValueError(f"{message}; got {bad}.")
        return modality_ids

    # -- capacity -----------------------------------------------------------------------------
    def _slot_limits(self, modality_counts: list[int], num_tokens: int, group_load: Tensor) -> tuple[list[int], list[int]]:
        """Per slot group: (local capacity limit, buffer slots agreed across the ep group)."""
        cfg = self.cfg
        cf = cfg.capacity_factor_per_modality if self.training else cfg.eval_capacity_factor_per_modality
        E = cfg.num_experts
        if not cfg.drop_tokens:
            limits = group_load.view(E, -1).max(0).values  # largest load of any expert, per group
        elif cfg.per_modality_capacity:
            limits = torch.tensor([
                _capacity(n, len(pool), f * k, cfg.min_capacity) if n else 0
                for n, pool, f, k in zip(modality_counts, cfg.pool_members, cf, cfg.top_k_per_modality)])
        else:
            routes = sum(n * k for n, k in zip(modality_counts, cfg.top_k_per_modality))
            k_eff = routes / num_tokens if num_tokens else 1
            limits = torch.tensor([_capacity(num_tokens, E, cf[0] * k_eff, cfg.min_capacity)])
        layout = limits.clone().to(group_load.device)
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(layout, op=dist.ReduceOp.MAX, group=self.ep_group)
        limits, layout = limits.tolist(), layout.tolist()
        if not cfg.drop_tokens:
            limits = layout  # dropless: every rank may fill the agreed size
        return limits, layout

    # -- routing ------------------------------------------------------------------------------
    def forward(self, x: Tensor, modality_ids: Tensor) -> Routing:
        """`route`, reached through a module call so hooks on the router (accelerate's offload
        brings `modality_bias` in only then) see it."""
        return self.route(x, modality_ids)

    def route(self, x: Tensor, modality_ids: Tensor, slots: bool = True) -> Routing:
        """Route tokens x [S, d] with modality ids [S].

        Three named steps: `select` (each token's top-k experts inside its pool), `assign_slots`
        (capacity: which routes keep a slot of their expert's buffer, and where), and
        `combine_weights` (the gates of the kept routes). The aux losses and the statistics
        look at the selection before capacity, as DeepSpeed's gates do.

        Args:
            x: [S, d] token representations (any float dtype; routing runs in fp32). S may be 0.
            modality_ids: [S] integer modality ids (index into `cfg.modalities`).
            slots: False for index dispatch (`DroplessMoE`, drop_tokens=False only): every valid route is
                kept, no capacity buffer is laid out (slot 0, capacity 0) and nothing is read back to the host.
        Returns:
            `Routing` with [K, S] expert indices, slots and combine weights (K = largest top-k).
        """
        cfg = self.cfg
        S = x.shape[0]
        modality_ids = self.check_modality_ids(modality_ids, S)
        logits = self.compute_logits(x, modality_ids)
        probs = torch.softmax(logits, dim=-1)
        token_k = self.routing_tables(x.device)[1][modality_ids]  # [S]
        picked = self.select(logits, probs, token_k)
        aux_loss, aux_losses = router_aux_losses(cfg, logits, probs, picked.chosen, token_k, modality_ids)
        if slots:
            modality_counts = torch.bincount(modality_ids, minlength=cfg.num_modalities).tolist()
            assigned = self.assign_slots(picked, modality_ids, modality_counts)
        elif cfg.drop_tokens:
            raise ValueError("ModalityRouter.route(slots=False) keeps every route: needs drop_tokens=False.")
        else:
            assigned = SlotAssignment(picked.valid, torch.zeros_like(picked.chosen), 0)
        gates = self.combine_weights(picked.probs, assigned.keep, token_k)
        expert_index = torch.where(assigned.keep, picked.chosen, -1)
        stats = self._stats(probs, picked.chosen, picked.valid, assigned.keep, modality_ids)
        return Routing(expert_index.t().contiguous(), assigned.slot.t().contiguous(), gates.t().contiguous(),
                       assigned.capacity, logits, aux_loss, aux_losses, stats)

    def select(self, logits: Tensor, probs: Tensor, token_k: Tensor) -> Selection:
        """Each token's top-k experts (its own k from `token_k` [S]; K = the largest k).

        Ranked by logit, not by probability: a probability can underflow to exactly 0 for an
        expert of the pool, where it would tie with the experts masked out of the pool (also 0),
        whereas masked logits are -inf and every in-pool logit is finite. Softmax is monotonic, so
        this is DeepSpeed's choice wherever probabilities do not tie.
        """
        K = self.cfg.max_top_k
        chosen = logits.topk(K, dim=-1).indices  # [S, K]
        valid = torch.arange(K, device=logits.device)[None] < token_k[:, None]
        return Selection(chosen, probs.gather(1, chosen), valid)

    def assign_slots(self, picked: Selection, modality_ids: Tensor, modality_counts: list[int]) -> SlotAssignment:
        """Capacity: rank the routes of each (expert, slot group) by the drop policy, keep the
        first `limit` of them, and give each kept route its slot in the dispatch buffer.

        Slot groups: one per modality with per-modality capacity (each owns a contiguous block of
        every expert's slots), else one shared group. Invalid routes sort into a sentinel group
        and never take a slot.
        """
        cfg = self.cfg
        chosen, top_probs, valid = picked.chosen, picked.probs, picked.valid
        S, K = chosen.shape
        E, device = cfg.num_experts, chosen.device
        groups = cfg.num_modalities if cfg.per_modality_capacity else 1
        group = modality_ids if groups > 1 else torch.zeros_like(modality_ids)
        key = torch.where(valid, chosen * groups + group[:, None], E * groups)  # invalid -> sentinel
        if cfg.drop_policy == "position":  # first choices first, then token order (DeepSpeed top-2)
            priority = (torch.arange(K, device=device)[None] * S + torch.arange(S, device=device)[:, None]).float()
        elif cfg.drop_policy == "random":  # random token selection (DeepSpeed top-1 use_rts)
            priority = -torch.rand(S, E, device=device).gather(1, chosen) if cfg.drop_tokens else top_probs
        else:  # "probs": most confident routes first (DeepSpeed top-k)
            priority = -top_probs
        flat_key = key.reshape(-1)
        order = torch.argsort(priority.reshape(-1), stable=True)
        order = order[torch.argsort(flat_key[order], stable=True)]
        group_load = torch.bincount(flat_key, minlength=E * groups + 1)
        starts = torch.cumsum(group_load, 0) - group_load
        position = torch.empty_like(flat_key)
        position[order] = torch.arange(flat_key.numel(), device=device) - starts[flat_key[order]]
        position = position.view(S, K)

        limits, layout = self._slot_limits(modality_counts, S, group_load[:-1])
        offsets = torch.tensor([0] + layout[:-1], device=device).cumsum(0)
        limit_of_route = torch.tensor(limits, device=device)[group][:, None]
        keep = valid & (position < limit_of_route)
        slot = torch.where(keep, position + offsets[group][:, None], 0)
        # At least one slot: DeepSpeed reshapes the buffer with -1, which fails on 0 elements.
        return SlotAssignment(keep, slot, max(int(sum(layout)), 1))

    @staticmethod
    def combine_weights(top_probs: Tensor, keep: Tensor, token_k: Tensor) -> Tensor:
        """[S, K] gates: k = 1 keeps the raw probability (Switch); k > 1 renormalises the kept
        routes' probabilities to sum to 1 (DeepSpeed's top-2/top-k gates)."""
        gates = top_probs * keep
        normalise = (token_k > 1)[:, None]
        denominator = gates.sum(-1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
        return torch.where(normalise, gates / denominator, gates)

    @torch.no_grad()
    def _stats(self, probs, chosen, valid, keep, modality_ids) -> RoutingStats:
        """Counts by index_add_ (exact: sums of 0/1 in fp32), not bincount, which reads back on CUDA."""
        M, E = self.cfg.num_modalities, self.cfg.num_experts
        flat = (modality_ids[:, None] * E + chosen).reshape(-1)
        counts = probs.new_zeros(M * E)
        routed = counts.index_add(0, flat, valid.reshape(-1).float()).view(M, E)
        kept = counts.index_add(0, flat, keep.reshape(-1).float()).view(M, E)
        tokens = probs.new_zeros(M).index_add_(0, modality_ids, probs.new_ones(modality_ids.shape))
        entropy = torch.zeros(M, device=probs.device).index_add_(0, modality_ids, _entropy(probs)) / tokens.clamp(min=1)
        return RoutingStats(tokens, routed, kept, entropy)


def _capacity(num_tokens: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """ceil(tokens / experts · factor), computed exactly like DeepSpeed's `_capacity` (fp32)."""
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(factor)).to(torch.int64)
    return max(int(capacity), min_capacity)
