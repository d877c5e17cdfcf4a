"""One validated dataclass describes every routing design mmoe-ds compares.

Values that may differ per modality (`top_k`, capacity factors) accept either one number for
all modalities or a mapping `{modality name: value}`. Everything is checked once, in
`__post_init__`, so a bad recipe fails when it is loaded, never deep inside a forward pass.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Union

# Modality ids index this tuple everywhere (per-token ids: 0 = image patch, 1 = text).
MODALITIES = ("image", "text")
ROUTING_MODES = ("agnostic", "modality_bias", "masked_pools", "separate_routers")
DROP_POLICIES = ("probs", "position", "random")
# The expert-parallel layer a DeepSpeed-trained model uses: DeepSpeed's MOELayer (capacity buffers) or
# `mmoe_ds.moe.dropless.DroplessMoE` (index dispatch with variable all-to-all splits, no capacity).
MOE_BACKENDS = ("deepspeed", "dropless")

PerModality = Union[int, float, Mapping[str, Union[int, float]]]


def _per_modality(name: str, value: PerModality, modalities: tuple[str, ...], cast) -> tuple:
    """Expand a scalar or a {modality: value} mapping into one value per modality."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(modalities))
        missing = [m for m in modalities if m not in value]
        if unknown or missing:
            raise ValueError(
                f"RouterConfig.{name}: keys must be exactly the modalities {list(modalities)}; "
                f"unknown {unknown}, missing {missing}. Give one value per modality or a single number.")
        return tuple(cast(value[m]) for m in modalities)
    return tuple(cast(value) for _ in modalities)


@dataclass
class RouterConfig:
    """Routing and auxiliary-loss settings of one MoE layer.

    mode:
      agnostic          plain top-k over W·x (DeepSpeed's TopKGate).
      modality_bias     logits = W·x + E[modality]; E is zero-initialised, so training starts agnostic.
      masked_pools      one router, but each modality may only pick experts of its pool (`pools`);
                        pools may overlap (shared experts).
      separate_routers  one W per modality.
    Capacity: a single `capacity_factor` gives one per-expert budget shared by all modalities
    (DeepSpeed's semantics); a mapping gives every modality its own slots in each expert.
    """

    num_experts: int = 8
    mode: str = "modality_bias"
    modalities: tuple[str, ...] = MODALITIES
    top_k: PerModality = 2
    capacity_factor: PerModality = 1.25
    eval_capacity_factor: PerModality = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    # Which routes an over-full expert keeps: highest router probability ("probs", DeepSpeed's
    # top-k gate), earliest token with first choices first ("position", DeepSpeed's top-2 gate),
    # or random token selection ("random", DeepSpeed's top-1 gate with use_rts).
    drop_policy: str = "probs"
    pools: dict[str, list[int]] | None = None
    jitter_eps: float = 0.0
    modality_bias_init_std: float = 0.0
    ep_size: int = 1
    # Which expert-parallel layer trains this router (see MOE_BACKENDS); inference and exports ignore it.
    moe_backend: str = "deepspeed"
    # Auxiliary losses: each is added with its own coefficient (0 disables it).
    load_balance_coef: float = 0.01
    modality_load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    local_entropy_coef: float = 0.0
    global_entropy_coef: float = 0.0
    global_entropy_threshold: float | None = None  # nats; default: log(pool size)
    entropy_floor_coef: float = 0.0
    entropy_floor: float | None = None  # nats; default: 0.9 * log(num_experts)
    min_utilization_coef: float = 0.0
    min_utilization: float = 0.5  # fraction of the uniform share 1/num_experts
    matched_utilization_coef: float = 0.0
    # {modality: [p(e) per expert]} for every MoE layer, or {modality: [[p(e) per expert] per MoE layer]}
    # (one target per layer, in layer order; `for_moe_layer` picks a layer's).
    matched_utilization_target: dict[str, list] | None = None

    # Derived, filled by __post_init__ (not constructor arguments).
    top_k_per_modality: tuple[int, ...] = field(init=False, repr=False)
    capacity_factor_per_modality: tuple[float, ...] = field(init=False, repr=False)
    eval_capacity_factor_per_modality: tuple[float, ...] = field(init=False, repr=False)
    pool_members: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"RouterConfig.mode: unknown mode {self.mode!r}; choose one of {list(ROUTING_MODES)}.")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"RouterConfig.drop_policy: {self.drop_policy!r} is not one of {list(DROP_POLICIES)}.")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"RouterConfig.moe_backend: {self.moe_backend!r} is not one of {list(MOE_BACKENDS)}.")
        if self.moe_backend == "dropless" and self.drop_tokens:
            raise ValueError("RouterConfig.moe_backend='dropless' keeps every route; set drop_tokens=false (capacity "
                             "factors are then unused) or use moe_backend='deepspeed' for capacity limits.")
        if len(self.modalities) < 1 or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"RouterConfig.modalities: need distinct names, got {list(self.modalities)}.")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"RouterConfig.num_experts: must be a positive integer, got {self.num_experts!r}.")
        if not isinstance(self.ep_size, int) or self.ep_size < 1 or self.num_experts % self.ep_size:
            raise ValueError(
                f"RouterConfig.ep_size: num_experts={self.num_experts} is not divisible by ep_size={self.ep_size}; "
                f"choose an ep_size that divides the number of experts.")
        self._resolve_pools()
        self.top_k_per_modality = _per_modality("top_k", self.top_k, self.modalities, int)
        for m, k, pool in zip(self.modalities, self.top_k_per_modality, self.pool_members):
            if not 1 <= k <= len(pool):
                raise ValueError(
                    f"RouterConfig.top_k: k={k} for modality {m!r} must be between 1 and the {len(pool)} experts "
                    f"it may use; lower top_k or enlarge the pool.")
        for name in ("capacity_factor", "eval_capacity_factor"):
            values = _per_modality(name, getattr(self, name), self.modalities, float)
            if any(not v > 0 for v in values):
                raise ValueError(f"RouterConfig.{name}: must be > 0 (got {getattr(self, name)!r}); "
                                 f"use drop_tokens=false for no capacity limit.")
            setattr(self, f"{name}_per_modality", values)
        if self.min_capacity < 0:
            raise ValueError(f"RouterConfig.min_capacity: must be >= 0, got {self.min_capacity}.")
        if not 0 <= self.jitter_eps < 1:
            raise ValueError(f"RouterConfig.jitter_eps: must be in [0, 1), got {self.jitter_eps}.")
        for f in fields(self):
            if f.name.endswith("_coef") and getattr(self, f.name) < 0:
                raise ValueError(f"RouterConfig.{f.name}: coefficients must be >= 0, got {getattr(self, f.name)}.")
        if not 0 < self.min_utilization <= 1:
            raise ValueError(f"RouterConfig.min_utilization: a fraction of the uniform share in (0, 1], "
                             f"got {self.min_utilization}.")
        self._check_matched_target()

    def _resolve_pools(self) -> None:
        all_experts = tuple(range(self.num_experts))
        if self.mode != "masked_pools":
            if self.pools is not None:
                raise ValueError("RouterConfig.pools: only used with mode='masked_pools'; remove it or change mode.")
            self.pool_members = tuple(all_experts for _ in self.modalities)
            return
        if not self.pools:
            raise ValueError("RouterConfig.pools: mode='masked_pools' needs {modality: [expert ids]} for every "
                             "modality, e.g. {'image': [0, 1, 2, 3], 'text': [4, 5, 6, 7]}.")
        members = []
        for m in self.modalities:
            if m not in self.pools:
                raise ValueError(f"RouterConfig.pools: no pool for modality {m!r}; add pools[{m!r}] = [expert ids].")
            pool = tuple(sorted(set(int(e) for e in self.pools[m])))
            bad = [e for e in pool if not 0 <= e < self.num_experts]
            if bad or not pool:
                raise ValueError(f"RouterConfig.pools[{m!r}]: expert ids {bad or '[]'} are outside "
                                 f"0..{self.num_experts - 1}; name existing experts only.")
            members.append(pool)
        unknown = sorted(set(self.pools) - set(self.modalities))
        if unknown:
            raise ValueError(f"RouterConfig.pools: unknown modalities {unknown}; known: {list(self.modalities)}.")
        self.pool_members = tuple(members)

    def _check_matched_target(self) -> None:
        if self.matched_utilization_coef == 0:
            return
        target = self.matched_utilization_target
        if not target or set(target) != set(self.modalities):
            raise ValueError("RouterConfig.matched_utilization_target: with matched_utilization_coef > 0 give a "
                             f"distribution over the {self.num_experts} experts for each of {list(self.modalities)}.")
        layers = {len(v) if v and isinstance(v[0], (list, tuple)) else None for v in target.values()}
        if len(layers) != 1:
            raise ValueError("RouterConfig.matched_utilization_target: give every modality one distribution, or "
                             "every modality the same number of per-layer distributions.")
        for m, value in target.items():
            for dist in (value if self.matched_targets_per_layer else [value]):
                if (len(dist) != self.num_experts or min(dist) < 0
                        or not math.isclose(sum(dist), 1.0, abs_tol=1e-4)):
                    raise ValueError(f"RouterConfig.matched_utilization_target[{m!r}]: needs {self.num_experts} "
                                     f"non-negative numbers summing to 1 (per MoE layer when given per layer).")

    @property
    def matched_targets_per_layer(self) -> int:
        """How many per-layer matched targets the config holds (0: one target for every layer)."""
        target = self.matched_utilization_target
        if not self.matched_utilization_coef or not target:
            return 0
        first = next(iter(target.values()))
        return len(first) if first and isinstance(first[0], (list, tuple)) else 0

    def for_moe_layer(self, index: int, num_moe_layers: int) -> "RouterConfig":
        """This config for the `index`-th of `num_moe_layers` MoE layers: its own matched target when
        targets are given per layer (the same config otherwise)."""
        n = self.matched_targets_per_layer
        if not n:
            return self
        if n != num_moe_layers:
            raise ValueError(f"RouterConfig.matched_utilization_target: {n} per-layer targets for a model with "
                             f"{num_moe_layers} MoE layers; give one per MoE layer.")
        return replace(self, matched_utilization_target={m: list(v[index]) for m, v in
                                                         self.matched_utilization_target.items()})

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    @property
    def max_top_k(self) -> int:
        return max(self.top_k_per_modality)

    @property
    def per_modality_capacity(self) -> bool:
        """A mapping of capacity factors reserves separate slots per modality in every expert."""
        return isinstance(self.capacity_factor, Mapping) or isinstance(self.eval_capacity_factor, Mapping)

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments only (JSON-serialisable), for configs and checkpoints."""
        d = asdict(self)
        for f in fields(self):
            if not f.init:
                d.pop(f.name)
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RouterConfig":
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RouterConfig: unknown fields {unknown}; valid fields are {sorted(known)}.")
        return cls(**dict(d))
