"""The one routing implementation: logits, top-k, capacity, combine weights, losses, statistics.

Every mode of `RouterConfig` is this code with different parameters:
  logits = W·x (+ E[modality] | with W chosen per modality) ; masked to the modality's pool
  top-k per token with the token's modality's k ; capacity drops within (expert, slot group)
Slot groups: with one shared capacity every modality competes for the same slots of an expert;
with per-modality capacity each modality owns a contiguous block of slots, so the dispatch
buffer stays one [experts, capacity, d] tensor that DeepSpeed's all-to-all can move.

Pure torch; expert parallelism only needs `ep_group` (a torch process group) to agree on
buffer sizes across ranks.

Shapes: local names end in their dimensions (as torchtitan's `x_TD`, `scores_TK`):
  S tokens (the flattened batch), K routes per token (the largest top-k), E experts,
  M modalities, D hidden size, C slots per expert in the dispatch buffer (`capacity`),
  G slot groups (M with per-modality capacity, else 1), X = E·G + 1 slot-group keys (one per
  (expert, group), plus a sentinel for routes that take no slot), R = S·K routes, token-major.
One layout per stage: `select`, `assign_slots` and `combine_weights` work on [S, K]; only the
returned `Routing` is [K, S] (DeepSpeed's gate layout, which its dispatch reads).
The dataclasses keep the field names other modules read; their shapes:
  Selection       chosen, probs, valid: [S, K]
  SlotAssignment  keep, slot: [S, K]; capacity: C (an int)
  Routing         expert_index, slot, combine_weight: [K, S]; logits: [S, E]; capacity: C
  RoutingStats    tokens: [M]; routed, kept: [M, E]; entropy: [M]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import RouterConfig
from .experts import calls_modules
from .losses import _entropy, router_aux_losses


@dataclass
class RoutingStats:
    """Detached per-call statistics for logging; tensors stay on device until `to_dict`.

    Padding is not counted: `route(..., token_mask=)` leaves it out (the model passes its
    attention mask; without a mask every position counts). A rank's statistics cover its own
    tokens only: sum them over the ranks (`sum_over_ranks`) before they are logged, alarmed on or
    reported, and over the calls of a window (`merge`: layers, micro-batches, steps).
    """

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

    @staticmethod
    def sum_over_ranks(stats: list["RoutingStats"],
                       all_reduce: Callable[[Tensor], object] | None = None) -> list["RoutingStats"]:
        """Collective: each entry (e.g. one per MoE layer) summed over the ranks, in one all-reduce.

        Counts add up; entropy becomes the token-weighted mean over the ranks. Every rank must call
        it with the same number of entries (of the same M, E), and gets the same result back. The
        counts travel and stay as float64: exact up to 2^53 (fp32 stops at 2^24 tokens).

        Args:
            stats: this rank's statistics, e.g. a log window's `merge`d per-layer list.
            all_reduce: sums a tensor over the ranks in place (e.g. `torch.distributed.all_reduce`,
                or `functools.partial(dist.all_reduce, group=g)`); None: torch.distributed's over
                the whole job when it is initialised, else no reduction (one process).
        Returns:
            new RoutingStats, in the order given; the inputs are left as they were.
        """
        if not stats:
            return []
        if all_reduce is None:
            all_reduce = dist.all_reduce if dist.is_available() and dist.is_initialized() else (lambda t: None)
        M, E = stats[0].routed.shape
        # One row per entry: tokens [M], routed [M·E], kept [M·E], entropy·tokens [M].
        packed = torch.stack([torch.cat([s.tokens.double(), s.routed.double().reshape(-1),
                                         s.kept.double().reshape(-1), s.entropy.double() * s.tokens.double()])
                              for s in stats])
        all_reduce(packed)
        out = []
        for row in packed:
            tokens_M, routed, kept, entropy_sum_M = row.split([M, M * E, M * E, M])
            out.append(RoutingStats(tokens_M, routed.view(M, E), kept.view(M, E),
                                    entropy_sum_M / tokens_M.clamp(min=1)))
        return out


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
        """fp32 router logits [S, E] of tokens x [S, D] with modality ids [S], masked to each token's pool."""
        cfg = self.cfg
        x_SD, modality_ids_S = x.float(), modality_ids
        if self.training and cfg.jitter_eps > 0:
            x_SD = x_SD * torch.empty_like(x_SD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        if calls_modules(self.wg):  # PEFT / offload / hooks: run `wg` as a module, in its own dtype
            logits_SE = self.wg(x_SD.to(getattr(self.wg, "weight", x_SD).dtype)).float()  # [S, E] or [S, M·E]
        else:
            logits_SE = nn.functional.linear(x_SD, self.wg.weight.float())
        if cfg.mode == "separate_routers":
            logits_SME = logits_SE.view(-1, cfg.num_modalities, cfg.num_experts)
            index_S1E = modality_ids_S.view(-1, 1, 1).expand(-1, 1, cfg.num_experts)
            logits_SE = logits_SME.gather(1, index_S1E).squeeze(1)
        elif cfg.mode == "modality_bias":
            logits_SE = logits_SE + self.modality_bias.float()[modality_ids_S]
        elif cfg.mode == "masked_pools":
            pool_mask_ME = self.routing_tables(x_SD.device)[0]
            logits_SE = logits_SE.masked_fill(~pool_mask_ME[modality_ids_S], float("-inf"))
        return logits_SE

    def check_modality_ids(self, modality_ids: Tensor, num_tokens: int) -> Tensor:
        """Modality ids of any shape with `num_tokens` entries, as int64 [S]; a ValueError (an async
        assert on CUDA) names ids outside [0, M)."""
        modality_ids_S = modality_ids.reshape(-1).long()
        if modality_ids_S.numel() != num_tokens:
            raise ValueError(f"modality_ids has {modality_ids_S.numel()} entries for {num_tokens} tokens; "
                             f"pass one modality id per token (same shape as hidden_states[..., 0]).")
        M = self.cfg.num_modalities
        in_range = ((modality_ids_S >= 0) & (modality_ids_S < M)).all()
        message = f"modality_ids must be in [0, {M}) for modalities {list(self.cfg.modalities)}"
        if modality_ids_S.is_cuda:
            torch._assert_async(in_range, message)  # no host sync on the hot path
        elif num_tokens and not bool(in_range):
            bad = modality_ids_S[(modality_ids_S < 0) | (modality_ids_S >= M)].unique().tolist()
            raise ValueError(f"{message}; got {bad}.")
        return modality_ids_S

    @staticmethod
    def check_token_mask(token_mask: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
        """bool [S]: which tokens are real (True for all when `token_mask` is None)."""
        if token_mask is None:
            return torch.ones(num_tokens, dtype=torch.bool, device=device)
        real_S = token_mask.reshape(-1) != 0
        if real_S.numel() != num_tokens:
            raise ValueError(f"token_mask has {real_S.numel()} entries for {num_tokens} tokens; pass one entry per "
                             f"token (the attention_mask columns of these positions), or None to count every token.")
        return real_S.to(device)

    # -- capacity -----------------------------------------------------------------------------
    def _slot_limits(self, modality_counts: list[int], num_tokens: int,
                     group_load: Tensor) -> tuple[list[int], list[int]]:
        """Per slot group: (local capacity limit, buffer slots agreed across the ep group), both G long.

        `group_load` [E·G]: valid routes per (expert, group) key, the sentinel key left out.
        """
        cfg = self.cfg
        cf = cfg.capacity_factor_per_modality if self.training else cfg.eval_capacity_factor_per_modality
        E = cfg.num_experts
        if not cfg.drop_tokens:
            limits_G = group_load.view(E, -1).max(0).values  # largest load of any expert, per group
        elif cfg.per_modality_capacity:
            limits_G = torch.tensor([
                _capacity(n, len(pool), f * k, cfg.min_capacity) if n else 0
                for n, pool, f, k in zip(modality_counts, cfg.pool_members, cf, cfg.top_k_per_modality)])
        else:
            routes = sum(n * k for n, k in zip(modality_counts, cfg.top_k_per_modality))
            k_eff = routes / num_tokens if num_tokens else 1
            limits_G = torch.tensor([_capacity(num_tokens, E, cf[0] * k_eff, cfg.min_capacity)])
        layout_G = limits_G.clone().to(group_load.device)
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(layout_G, op=dist.ReduceOp.MAX, group=self.ep_group)
        limits, layout = limits_G.tolist(), layout_G.tolist()
        if not cfg.drop_tokens:
            limits = layout  # dropless: every rank may fill the agreed size
        return limits, layout

    # -- routing ------------------------------------------------------------------------------
    def forward(self, x: Tensor, modality_ids: Tensor, token_mask: Tensor | None = None) -> Routing:
        """`route`, reached through a module call so hooks on the router (accelerate's offload
        brings `modality_bias` in only then) see it."""
        return self.route(x, modality_ids, token_mask=token_mask)

    def route(self, x: Tensor, modality_ids: Tensor, slots: bool = True, token_mask: Tensor | None = None) -> Routing:
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
            token_mask: [S] (any shape with S entries), nonzero for real tokens, 0 for padding (the batch's
                `attention_mask`); None: every token is real. Only the statistics read it: padding is
                routed like any token (same routes, gates, drops and losses) but never counted.
        Returns:
            `Routing` with [K, S] expert indices, slots and combine weights (K = largest top-k), [S, E] logits.
        """
        cfg = self.cfg
        x_SD = x
        S = x_SD.shape[0]
        modality_ids_S = self.check_modality_ids(modality_ids, S)
        logits_SE = self.compute_logits(x_SD, modality_ids_S)
        probs_SE = torch.softmax(logits_SE, dim=-1)
        token_k_S = self.routing_tables(x_SD.device)[1][modality_ids_S]
        picked = self.select(logits_SE, probs_SE, token_k_S)
        aux_loss, aux_losses = router_aux_losses(cfg, logits_SE, probs_SE, picked.chosen, token_k_S, modality_ids_S)
        if slots:
            modality_counts = torch.bincount(modality_ids_S, minlength=cfg.num_modalities).tolist()
            assigned = self.assign_slots(picked, modality_ids_S, modality_counts)
        elif cfg.drop_tokens:
            raise ValueError("ModalityRouter.route(slots=False) keeps every route: needs drop_tokens=False.")
        else:
            assigned = SlotAssignment(picked.valid, torch.zeros_like(picked.chosen), 0)
        gates_SK = self.combine_weights(picked.probs, assigned.keep, token_k_S)
        expert_index_SK = torch.where(assigned.keep, picked.chosen, -1)
        real_S = self.check_token_mask(token_mask, S, x_SD.device)
        stats = self._stats(probs_SE, picked.chosen, picked.valid, assigned.keep, modality_ids_S, real_S)
        # The one change of layout: [S, K] -> [K, S], DeepSpeed's gate output.
        return Routing(expert_index_SK.t().contiguous(), assigned.slot.t().contiguous(), gates_SK.t().contiguous(),
                       assigned.capacity, logits_SE, aux_loss, aux_losses, stats)

    def select(self, logits: Tensor, probs: Tensor, token_k: Tensor) -> Selection:
        """Each token's top-k experts (its own k from `token_k` [S]; K = the largest k).

        Ranked by logit, not by probability: a probability can underflow to exactly 0 for an
        expert of the pool, where it would tie with the experts masked out of the pool (also 0),
        whereas masked logits are -inf and every in-pool logit is finite. Softmax is monotonic, so
        this is DeepSpeed's choice wherever probabilities do not tie.
        """
        K = self.cfg.max_top_k
        logits_SE, probs_SE, token_k_S = logits, probs, token_k
        chosen_SK = logits_SE.topk(K, dim=-1).indices
        valid_SK = torch.arange(K, device=logits_SE.device)[None] < token_k_S[:, None]
        return Selection(chosen_SK, probs_SE.gather(1, chosen_SK), valid_SK)

    def assign_slots(self, picked: Selection, modality_ids: Tensor, modality_counts: list[int]) -> SlotAssignment:
        """Capacity: rank the routes of each (expert, slot group) by the drop policy, keep the
        first `limit` of them, and give each kept route its slot in the dispatch buffer.

        Slot groups: one per modality with per-modality capacity (each owns a contiguous block of
        every expert's slots), else one shared group. Invalid routes sort into a sentinel group
        and never take a slot.
        """
        cfg = self.cfg
        chosen_SK, top_probs_SK, valid_SK = picked.chosen, picked.probs, picked.valid
        S, K = chosen_SK.shape
        E, device = cfg.num_experts, chosen_SK.device
        G = cfg.num_modalities if cfg.per_modality_capacity else 1
        group_S = modality_ids if G > 1 else torch.zeros_like(modality_ids)
        key_SK = torch.where(valid_SK, chosen_SK * G + group_S[:, None], E * G)  # invalid -> sentinel key E·G
        if cfg.drop_policy == "position":  # first choices first, then token order (DeepSpeed top-2)
            priority_SK = (torch.arange(K, device=device)[None] * S + torch.arange(S, device=device)[:, None]).float()
        elif cfg.drop_policy == "random":  # random token selection (DeepSpeed top-1 use_rts)
            priority_SK = -torch.rand(S, E, device=device).gather(1, chosen_SK) if cfg.drop_tokens else top_probs_SK
        else:  # "probs": most confident routes first (DeepSpeed top-k)
            priority_SK = -top_probs_SK
        key_R = key_SK.reshape(-1)
        order_R = torch.argsort(priority_SK.reshape(-1), stable=True)
        order_R = order_R[torch.argsort(key_R[order_R], stable=True)]  # by key, then by priority
        group_load_X = torch.bincount(key_R, minlength=E * G + 1)
        starts_X = torch.cumsum(group_load_X, 0) - group_load_X
        position_R = torch.empty_like(key_R)  # rank of each route within its key
        position_R[order_R] = torch.arange(key_R.numel(), device=device) - starts_X[key_R[order_R]]
        position_SK = position_R.view(S, K)

        limits, layout = self._slot_limits(modality_counts, S, group_load_X[:-1])
        offsets_G = torch.tensor([0] + layout[:-1], device=device).cumsum(0)  # each group's first slot
        limit_S1 = torch.tensor(limits, device=device)[group_S][:, None]
        keep_SK = valid_SK & (position_SK < limit_S1)
        slot_SK = torch.where(keep_SK, position_SK + offsets_G[group_S][:, None], 0)
        # At least one slot: DeepSpeed reshapes the buffer with -1, which fails on 0 elements.
        return SlotAssignment(keep_SK, slot_SK, max(int(sum(layout)), 1))

    @staticmethod
    def combine_weights(top_probs: Tensor, keep: Tensor, token_k: Tensor) -> Tensor:
        """[S, K] gates: k = 1 keeps the raw probability (Switch); k > 1 renormalises the kept
        routes' probabilities to sum to 1 (DeepSpeed's top-2/top-k gates). Inputs [S, K], [S, K], [S]."""
        gates_SK = top_probs * keep
        normalise_S1 = (token_k > 1)[:, None]
        denominator_S1 = gates_SK.sum(-1, keepdim=True).clamp(min=torch.finfo(gates_SK.dtype).eps)
        return torch.where(normalise_S1, gates_SK / denominator_S1, gates_SK)

    @torch.no_grad()
    def _stats(self, probs_SE: Tensor, chosen_SK: Tensor, valid_SK: Tensor, keep_SK: Tensor,
               modality_ids_S: Tensor, real_S: Tensor) -> RoutingStats:
        """Counts of the real tokens (`real_S`; padding adds 0) by index_add_ (exact: sums of 0/1
        in fp32), not bincount, which reads back on CUDA."""
        M, E = self.cfg.num_modalities, self.cfg.num_experts
        cell_R = (modality_ids_S[:, None] * E + chosen_SK).reshape(-1)  # (modality, expert) of each route
        zeros_ME = probs_SE.new_zeros(M * E)
        routed_ME = zeros_ME.index_add(0, cell_R, (valid_SK & real_S[:, None]).reshape(-1).float()).view(M, E)
        kept_ME = zeros_ME.index_add(0, cell_R, (keep_SK & real_S[:, None]).reshape(-1).float()).view(M, E)
        tokens_M = probs_SE.new_zeros(M).index_add_(0, modality_ids_S, real_S.float())
        entropy_S = torch.where(real_S, _entropy(probs_SE), 0.0)
        entropy_sum_M = torch.zeros(M, device=probs_SE.device).index_add_(0, modality_ids_S, entropy_S)
        return RoutingStats(tokens_M, routed_ME, kept_ME, entropy_sum_M / tokens_M.clamp(min=1))


def _capacity(num_tokens: int, num_experts: int, factor: float, min_capacity: int) -> int:
    """ceil(tokens / experts · factor), computed exactly like DeepSpeed's `_capacity` (fp32)."""
    capacity = torch.ceil((num_tokens / num_experts) * torch.tensor(factor)).to(torch.int64)
    return max(int(capacity), min_capacity)
