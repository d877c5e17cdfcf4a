"""E4: the Gaussian toy — can a router that never sees the modality route by modality?

Tokens of two "modalities" are drawn from Gaussians in three regimes:
  separable   means 8σ apart along one direction (any gap in routing TV is optimisation);
  covariance  both zero mean, equal total variance, different covariance *shapes*: modality 0
              puts its variance on the first half of the dims, modality 1 on the second half.
              The modality is a quadratic function of x, invisible to a half-space through
              the origin;
  overlap     means 0.5σ apart: most of the modality information is not in x at all.
The task: each modality has its own target function, a random SwiGLU "teacher" of exactly an
expert's shape (y = T_m(x), scaled to unit variance). One `TorchMoE` layer (top-2, dropless)
learns it with MSE + the router's aux loss and Adam. Routers: agnostic (W·x + b), agnostic + the
matched-utilization loss (asks for modality 0 on the first half of the experts, modality 1 on
the rest; only the loss sees the modality), aware (W·x + E[m]), agnostic quadratic (W·φ(x) with
φ(x) = [x, 1, x_i·x_j for i <= j]: a quadratic function of x, so it can see the covariance shape)
and, on request, aware + the matched loss. Every blind router has a bias (its features start with
[x, 1]); E[m] is the aware router's. Every router gets the same layer, bit-identical initial
experts, data, loss, optimiser and steps; only the router differs. We report the routing total
variation TV(p(e|m=0), p(e|m=1)) of each token's first-choice expert on held-out tokens, and the MSE.

The separation sweep (`run_separation`; covariance regime, E = 2, d in `separation_dims`): the
aware router against blind families of growing size — affine, rank-r quadratic (w·x + b +
Σ_k a_k (u_k·x)²), MLP of width h, full quadratic — each trained on the task (as above) and, to
tell capacity from optimisation, trained as a modality classifier told the modality
(`capacity_tv`). The table gives, per d and family, the smallest router (by parameter count) that
reaches the aware router's TV and MSE, beside the two proven bounds of docs/theory.md.

Why the task is a per-modality teacher and routing is top-2 (changed after the first version):
the first version learnt a per-modality *linear* map y = A_m x with top-1 routing (lr 1e-2), and
the aware router reached TV 0.12 ± 0.30 over 3 seeds — it did not learn to route by modality.
What we found (covariance regime, d = 16, E = 2):
  * A SwiGLU expert without biases represents a linear map badly (its odd part is
    Σ w2·(w1x)·tanh(w1x/2)/2·(w3x), never linear), so splitting x into half-spaces and letting
    each expert fit one region was a competing, genuinely useful solution: the router's W·x grew
    (logit-gap std ≈ 2) while E[m] stayed at ±0.5. Modality-specific experts were not what the
    task rewarded most. Now each modality's target is a random SwiGLU of an expert's exact
    shape, so one expert per modality can fit its modality exactly, as image and text need
    different functions (top-1, lr 1e-2: MSE ≈ 0.09 with modality routing forced by the matched
    loss, ≈ 0.27 without).
  * With top-1 and Switch gates (output = p·f_e(x)) the router's only gradient is the *scale* of
    the one chosen expert's output; nothing compares two experts on the same token. With top-2
    and renormalised gates (the recipe's default top_k) the gradient of a token's logit gap is
    p_0·p_1·<∂L/∂y, f_0(x) − f_1(x)>: the router learns which expert fits the token better.
    On the teacher task (lr 3e-2) the aware router reached TV 0.73–0.96 with top-1 (4 seeds),
    0.997–1.000 with top-2 (8 seeds).
  * Learning rate 3e-2 instead of 1e-2 (the same for every router): 300 steps then suffice.
    Neither the load-balancing loss (balance does not fight a 50/50 modality split) nor the
    router's init was the cause: with top-1, zeroing W at init or dropping the balance loss
    left the aware router at TV <= 0.43.
Every router still gets the same layer, data, loss, optimiser and steps. Known weak cell:
d = 32, E = 2, where the aware router's modality bias settles at a small margin
(logit gap ≈ 0.6–0.8) and TV ranged 0.73–1.00 over 8 seeds (E = 4 and d = 16: >= 0.97 on
every seed we ran). With E = 2, top-2 means both experts compute every token and "routing" is
which one carries the larger gate; with E = 4 it is sparse. The ceilings below are about that
first choice (the argmax of the logits), so they hold whatever the training.

Linear ceiling (E = 2, covariance regime; docs/theory.md, Corollary 2): a 2-expert affine router
picks expert 1 iff w·x > b, and w·x is N(0, wᵀΣ_m w) for each modality, so TV <= max_b
|Φ(b/σ_0) − Φ(b/σ_1)| = `halfspace_tv(3)` = 0.242 < 1/2 (largest projected standard-deviation ratio 3,
on any axis). A router without a bias (b = 0) splits each centrally symmetric modality exactly in
half: TV 0 — the first version of this toy had no bias, so its agnostic arms were pinned at 0 by
symmetry and the 0.242 did not apply to them. `fitted_halfspace_tv` estimates the ceiling from
samples with the best axis-aligned half-space. No blind router of any size exceeds TV(P0, P1)
(`modality_tv`; 0.944 at d = 8). For E = 4 no ceiling <= 1/2 exists: the argmax of four
bias-free linear logits ±x_1, ±x_{d/2+1} picks by max(|x_1|, |x_{d/2+1}|), which already reaches
TV = (4/π)·atan(3) − 1 ≈ 0.59 (`linear_example_e4`); we report that lower bound, not a ceiling.

Run: python -m mmoe_ds.experiments.toy [--seeds 0,1,2] [--steps 300] [--dims 16,32] [--experts 2,4]
     [--routers agnostic,aware,...] [--separation-dims 8,16,32] [--ranks 1,2,4,8,16] [--widths 2,4,8,16,32]
     [--out runs/experiments/e4_toy]
Writes results.json, results.md, tv_vs_ceiling.png and params_vs_d.png in --out.
"""
from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmoe_ds.analysis.metrics import mean_ci95 as analysis_mean_ci95
from mmoe_ds.analysis.metrics import total_variation
from mmoe_ds.moe.config import RouterConfig
from mmoe_ds.moe.experts import ExpertFFN
from mmoe_ds.moe.layer import MoEOutput, TorchMoE, combine_routes
from mmoe_ds.moe.router import ModalityRouter

from .toy_render import FIGURE, SEPARATION_FIGURE, fmt_tv, results_table, write_results

REGIMES = ("separable", "covariance", "overlap")
ROUTERS = ("agnostic", "agnostic_matched", "aware", "agnostic_quadratic", "aware_matched")
FAMILY = re.compile(r"agnostic_(rank|mlp)(\d+)")  # sized agnostic routers of the separation sweep
DEFAULT_ROUTERS = ROUTERS[:4]  # the four; aware_matched on request (--routers)
# Covariance regime: per-dim variance on the "own" half and on the other half (equal trace).
HIGH_VAR, LOW_VAR = 1.8, 0.2
SEPARABLE_GAP, OVERLAP_GAP = 8.0, 0.5  # distance between the two means, in σ
# When an agnostic router "reaches" the aware one in the separation sweep (`run_separation`).
TV_TOL, MSE_TOL = 0.05, 0.10


@dataclass
class ToyConfig:
    """Sizes of the toy grid, of the separation sweep and of one run. Defaults: 3 seeds × every cell and
    the sweep in about 15 min on 2 shared CPU cores."""

    dims: tuple[int, ...] = (16, 32)
    experts: tuple[int, ...] = (2, 4)
    top_k: int = 2
    train_tokens: int = 2048
    test_tokens: int = 2048
    batch: int = 256
    steps: int = 300
    lr: float = 3e-2
    intermediate: int = 32
    matched_coef: float = 0.1
    # The separation sweep (covariance regime, E = 2): dims, and the sizes of the agnostic families.
    separation_dims: tuple[int, ...] = (8, 16, 32)
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16)
    widths: tuple[int, ...] = (2, 4, 8, 16, 32)

    def __post_init__(self) -> None:
        self.dims, self.experts = tuple(self.dims), tuple(self.experts)
        self.separation_dims = tuple(self.separation_dims)
        self.ranks, self.widths = tuple(self.ranks), tuple(self.widths)
        if any(d < 2 or d % 2 for d in self.separation_dims):
            raise ValueError(f"ToyConfig.separation_dims: need even dimensions >= 2, got {list(self.separation_dims)}.")
        for name in ("ranks", "widths"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"ToyConfig.{name}: sizes must be >= 1, got {list(getattr(self, name))}.")
        if not self.dims or any(d < 2 or d % 2 for d in self.dims):
            raise ValueError(f"ToyConfig.dims: need even dimensions >= 2 (covariance halves), got {list(self.dims)}.")
        if not self.experts or any(e < 2 or e % 2 for e in self.experts):
            raise ValueError(f"ToyConfig.experts: need even expert counts >= 2 (the matched target gives each "
                             f"modality half of the experts), got {list(self.experts)}.")
        if not 1 <= self.top_k <= min(self.experts):
            raise ValueError(f"ToyConfig.top_k: must be between 1 and the smallest expert count "
                             f"{min(self.experts)}, got {self.top_k}.")
        for name in ("train_tokens", "test_tokens", "batch", "steps", "intermediate"):
            if getattr(self, name) < 1:
                raise ValueError(f"ToyConfig.{name}: must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"ToyConfig.lr: must be > 0, got {self.lr}.")


@dataclass
class CellResult:
    """One (regime, d, E, router, seed) run."""

    tv: float  # TV(p(e|m=0), p(e|m=1)) of held-out first-choice experts
    mse: float  # held-out MSE (targets have unit variance)
    p_expert: list[list[float]]  # [modality][expert] held-out first-choice frequencies


# -- data ----------------------------------------------------------------------------------------
def sample_tokens(regime: str, n: int, dim: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """n tokens (half per modality, shuffled): (x [n, dim], modality ids [n])."""
    m = torch.randperm(n, generator=gen) % 2
    z = torch.randn(n, dim, generator=gen)
    if regime == "covariance":
        half = torch.arange(dim) < dim // 2
        std_own, std_other = math.sqrt(HIGH_VAR), math.sqrt(LOW_VAR)
        scale0 = torch.where(half, std_own, std_other)  # modality 0: variance on the first half
        scale1 = torch.where(half, std_other, std_own)
        return z * torch.where(m[:, None] == 0, scale0, scale1), m
    if regime in ("separable", "overlap"):
        gap = SEPARABLE_GAP if regime == "separable" else OVERLAP_GAP
        u = torch.zeros(dim)
        u[0] = 1.0
        return z + (m.float()[:, None] - 0.5) * gap * u, m
    raise ValueError(f"unknown regime {regime!r}; choose one of {list(REGIMES)}.")


def teachers(dim: int, intermediate: int, gen: torch.Generator) -> list[ExpertFFN]:
    """One frozen random SwiGLU per modality, of an expert's exact shape (weights N(0, 1/fan_in))."""
    nets = []
    for _ in range(2):
        net = ExpertFFN(dim, intermediate).requires_grad_(False)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
        nets.append(net)
    return nets


def teacher_targets(nets: list[ExpertFFN], x: Tensor, modality: Tensor) -> Tensor:
    """y[i] = nets[modality[i]](x[i])."""
    y = torch.empty_like(x)
    with torch.no_grad():
        for m, net in enumerate(nets):
            y[modality == m] = net(x[modality == m])
    return y


# -- routers -------------------------------------------------------------------------------------
def matched_target(num_experts: int) -> dict[str, list[float]]:
    """Matched-utilization target: modality 0 on the first half of the experts, modality 1 on the rest."""
    half = num_experts // 2
    return {"image": [1 / half if e < half else 0.0 for e in range(num_experts)],
            "text": [0.0 if e < half else 1 / (num_experts - half) for e in range(num_experts)]}


def router_config(router: str, num_experts: int, top_k: int, matched_coef: float) -> RouterConfig:
    """RouterConfig of one router of the comparison (dropless).

    Every agnostic design is the codebase's router on features φ(x) that start with [x, 1] (so it
    has a bias: W·x + b); agnostic_matched adds the matched-utilization loss (the loss sees the
    modality, the router does not). aware: W·x + E[m] (E[m] already is a per-modality bias, so a
    shared one would add nothing). aware_matched: aware plus the same loss.
    """
    check_router(router)
    common = dict(num_experts=num_experts, top_k=top_k, drop_tokens=False, load_balance_coef=0.01,
                  mode="modality_bias" if router.startswith("aware") else "agnostic")
    if router.endswith("_matched"):
        common.update(matched_utilization_coef=matched_coef, matched_utilization_target=matched_target(num_experts))
    return RouterConfig(**common)


def sized_router(router: str) -> bool:
    """Whether `router` names a sized blind router: agnostic_rank<r> or agnostic_mlp<h>, r, h >= 1."""
    match = FAMILY.fullmatch(router)
    return bool(match) and int(match.group(2)) >= 1


def check_router(router: str) -> None:
    """Raise a one-line ValueError unless `router` is in ROUTERS or a sized family (`sized_router`)."""
    if router not in ROUTERS and not sized_router(router):
        raise ValueError(f"unknown router {router!r}; choose one of {list(ROUTERS)}, or agnostic_rank<r> / "
                         f"agnostic_mlp<h> with r, h >= 1.")


def quadratic_features(x: Tensor) -> Tensor:
    """φ(x) = [x, x_i·x_j for i <= j]: [n, d + d(d+1)/2]."""
    i, j = torch.triu_indices(x.shape[1], x.shape[1])
    return torch.cat([x, x[:, i] * x[:, j]], dim=1)


class RouterFeatures(torch.nn.Module):
    """φ(x) of an agnostic router: [x, 1] and, per design, quadratic or hidden features.

    linear: [x, 1] (W·φ = W·x + b). quadratic: [x, 1, x_i·x_j] (every quadratic form). rank r:
    [x, 1, (U·x)²] with U [r, d] learnt, so each logit is w·x + b + Σ_k a_k (u_k·x)², a quadratic
    form of rank <= r (for E = 2 the logit gap is any rank-r form). mlp h: [x, 1, relu(V·x + c)],
    a one-hidden-layer MLP of width h (with a linear skip).
    """

    def __init__(self, kind: str, dim: int, size: int = 0):
        super().__init__()
        self.kind = kind
        self.proj = None
        if kind == "rank":
            self.proj = torch.nn.Linear(dim, size, bias=False)
            torch.nn.init.normal_(self.proj.weight, std=1 / math.sqrt(dim))  # (u·x)² of order 1
        elif kind == "mlp":
            self.proj = torch.nn.Linear(dim, size)
        extra = {"linear": 0, "quadratic": dim * (dim + 1) // 2, "rank": size, "mlp": size}[kind]
        self.out_dim = dim + 1 + extra

    def forward(self, x: Tensor) -> Tensor:
        parts = [x, torch.ones_like(x[:, :1])]
        if self.kind == "quadratic":
            parts.append(quadratic_features(x)[:, x.shape[1]:])
        elif self.kind == "rank":
            parts.append(self.proj(x) ** 2)
        elif self.kind == "mlp":
            parts.append(torch.relu(self.proj(x)))
        return torch.cat(parts, dim=1)


def router_features(router: str, dim: int) -> RouterFeatures | None:
    """The feature map of an agnostic router (None for the aware ones, which see x)."""
    if router.startswith("aware"):
        return None
    if router == "agnostic_quadratic":
        return RouterFeatures("quadratic", dim)
    match = FAMILY.fullmatch(router)
    if match:
        return RouterFeatures(match.group(1), dim, int(match.group(2)))
    return RouterFeatures("linear", dim)


class FeatureRouterMoE(TorchMoE):
    """`TorchMoE` whose router sees φ(x) (`RouterFeatures`) while the experts see x."""

    def __init__(self, cfg: RouterConfig, hidden_size: int, intermediate_size: int, features: RouterFeatures):
        super().__init__(cfg, hidden_size, intermediate_size)
        self.features = features
        self.deepspeed_moe.gate = ModalityRouter(cfg, features.out_dim)

    def forward(self, hidden_states: Tensor, modality_ids: Tensor) -> MoEOutput:
        routing = self.deepspeed_moe.gate.route(self.features(hidden_states), modality_ids)
        out = combine_routes(hidden_states, routing, self.deepspeed_moe.experts, self.use_grouped,
                             num_kept=hidden_states.shape[0] * self.cfg.max_top_k)
        return MoEOutput(out, routing.aux_loss, routing)


def build_layer(router: str, dim: int, num_experts: int, cfg: ToyConfig, seed: int = 0) -> TorchMoE:
    """The MoE layer of one router design. Its experts are drawn from their own generator (seed), so
    every router design of a seed starts from bit-identical experts: only the router differs."""
    rc = router_config(router, num_experts, cfg.top_k, cfg.matched_coef)
    features = router_features(router, dim)
    layer = TorchMoE(rc, dim, cfg.intermediate) if features is None else FeatureRouterMoE(rc, dim, cfg.intermediate,
                                                                                           features)
    gen = torch.Generator().manual_seed(1_000_003 * seed + 17)
    with torch.no_grad():
        for p in layer.deepspeed_moe.experts.parameters():  # nn.Linear's default init, U(±1/sqrt(fan_in))
            bound = 1 / math.sqrt(p.shape[1])
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
    return layer


def router_parameters(layer: TorchMoE) -> int:
    """Trainable parameters of the router: the gate (W, and E[m] when aware) plus the feature map."""
    gate = sum(p.numel() for p in layer.deepspeed_moe.gate.parameters())
    features = getattr(layer, "features", None)
    return gate + (sum(p.numel() for p in features.parameters()) if features is not None else 0)


# -- metrics -------------------------------------------------------------------------------------
def routing_tv(experts: Tensor, modality: Tensor, num_experts: int) -> tuple[float, list[list[float]]]:
    """TV between the two modalities' expert distributions, and the distributions [2][E]."""
    p = torch.stack([torch.bincount(experts[modality == m], minlength=num_experts).double()
                     for m in (0, 1)])
    p = p / p.sum(-1, keepdim=True).clamp(min=1)
    return total_variation(p[0].numpy(), p[1].numpy()), p.tolist()


def mean_ci95(values: list[float]) -> dict[str, float | None]:
    """{"mean", "ci95" (half-width of the 95% t-interval; None for a single seed: no interval), "n"}."""
    if len(values) < 2:
        return {"mean": float(values[0]), "ci95": None, "n": len(values)}
    summary = analysis_mean_ci95(values)
    return {"mean": summary.mean, "ci95": summary.half_width, "n": summary.n}


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def halfspace_tv(ratio: float) -> float:
    """Best TV of a half-space {y > b} between N(0, s²) and N(0, (ratio·s)²) (docs/theory.md, Theorem 1).

    With ρ = max(ratio, 1/ratio) and c = sqrt(2 ln ρ / (ρ² − 1)) the best threshold sits where the
    densities cross, |b| = c·s_high = ρ·c·s_low, and the TV is Φ(ρ·c) − Φ(c): 0 at ρ = 1, rising to 1/2.
    """
    rho = max(ratio, 1.0 / ratio)
    if rho == 1.0:
        return 0.0
    c = math.sqrt(2.0 * math.log(rho) / (rho * rho - 1.0))
    return _phi(rho * c) - _phi(c)


def best_halfspace_tv(cov0: Tensor, cov1: Tensor) -> float:
    """Best TV of any half-space {w·x > b} between N(0, cov0) and N(0, cov1) (docs/theory.md, Corollary 2):
    `halfspace_tv` of the largest projected standard-deviation ratio, i.e. of sqrt(λ) for the generalized
    eigenvalue λ of (cov1, cov0) farthest from 1 in ratio (cov0 must be positive definite)."""
    chol = torch.linalg.cholesky(cov0.double())
    inv = torch.linalg.inv(chol)
    ev = torch.linalg.eigvalsh(inv @ cov1.double() @ inv.T)
    return halfspace_tv(math.sqrt(max(float(ev.max()), 1.0 / float(ev.min()))))


def modality_tv(regime: str, dim: int, n: int = 200_000, seed: int = 10_001) -> float:
    """TV(P0, P1) of the regime's two modalities at `dim`: the most any router that does not see the
    modality can reach (data processing; docs/theory.md, Proposition 3). Exact for the mean-shift
    regimes (2Φ(gap/2) − 1); for the covariance regime a Monte-Carlo estimate (n draws per modality,
    standard error < 0.002) of P0(A) − P1(A) on the likelihood-ratio set A = {p0 > p1}."""
    if regime != "covariance":
        return 2 * _phi((SEPARABLE_GAP if regime == "separable" else OVERLAP_GAP) / 2) - 1
    gen = torch.Generator().manual_seed(seed)
    half = torch.arange(dim) < dim // 2
    var0 = torch.where(half, HIGH_VAR, LOW_VAR).double()
    var1 = torch.where(half, LOW_VAR, HIGH_VAR).double()

    def log_ratio(x: Tensor) -> Tensor:  # log p0(x) − log p1(x); the log-determinants are equal (swapped halves)
        return 0.5 * (x ** 2 * (1 / var1 - 1 / var0)).sum(1)
    x0 = torch.randn(n, dim, generator=gen, dtype=torch.float64) * var0.sqrt()
    x1 = torch.randn(n, dim, generator=gen, dtype=torch.float64) * var1.sqrt()
    return float((log_ratio(x0) > 0).double().mean() - (log_ratio(x1) > 0).double().mean())


def linear_ceiling_e2() -> float:
    """Best TV of any half-space w·x > b between the covariance regime's two modalities: the largest
    projected standard-deviation ratio is sqrt(HIGH_VAR / LOW_VAR) = 3 (on any axis), so `halfspace_tv(3)`."""
    return halfspace_tv(math.sqrt(HIGH_VAR / LOW_VAR))


def linear_example_e4() -> float:
    """TV of the 4-expert bias-free linear router with logits (x_1, −x_1, x_k, −x_k), k = d/2 + 1.

    It picks by max(|x_1|, |x_k|); P(|x_1| > |x_k|) = (2/π)·atan(σ_1/σ_k), so
    TV = (2/π)(atan(r) − atan(1/r)) with r = sqrt(HIGH_VAR/LOW_VAR): a lower bound on the E = 4 ceiling.
    """
    r = math.sqrt(HIGH_VAR / LOW_VAR)
    return 2 / math.pi * (math.atan(r) - math.atan(1 / r))


def fitted_halfspace_tv(x: Tensor, m: Tensor) -> float:
    """Empirical best TV of an axis-aligned half-space x_i > b (either sign) on samples.

    For the covariance regime's diagonal shapes the best half-space lies on an axis (that is
    where the variance ratio is largest), so this is a sample estimate of `linear_ceiling_e2`,
    searched exhaustively over every axis and every threshold. It is biased upwards by sampling
    noise (it is a maximum of Kolmogorov–Smirnov-type statistics), by about 1.4·sqrt(2/n).
    """
    n0, n1 = int((m == 0).sum()), int((m == 1).sum())
    best = 0.0
    for i in range(x.shape[1]):
        mo = m[torch.argsort(x[:, i])]
        gap = torch.cumsum((mo == 0).double(), 0) / n0 - torch.cumsum((mo == 1).double(), 0) / n1
        best = max(best, float(gap.abs().max()))  # |gap| covers both signs of the half-space
    return best


# -- one run -------------------------------------------------------------------------------------
def run_cell(regime: str, dim: int, num_experts: int, router: str, seed: int, cfg: ToyConfig) -> CellResult:
    """Train one MoE layer on the toy task and measure held-out routing TV and MSE.

    Data, teachers and the order of training batches depend only on (regime, dim, seed), so every
    router of a cell sees the same task. Args: the cell's regime, token dimension, expert count,
    router design (`ROUTERS`), seed, and the run sizes. Returns: the held-out `CellResult`.
    """
    gen = torch.Generator().manual_seed(seed)
    nets = teachers(dim, cfg.intermediate, gen)
    x_train, m_train = sample_tokens(regime, cfg.train_tokens, dim, gen)
    x_test, m_test = sample_tokens(regime, cfg.test_tokens, dim, gen)
    y_train, y_test = teacher_targets(nets, x_train, m_train), teacher_targets(nets, x_test, m_test)
    scale = y_train.std()
    y_train, y_test = y_train / scale, y_test / scale
    torch.manual_seed(seed)
    layer = build_layer(router, dim, num_experts, cfg, seed)
    opt = torch.optim.Adam(layer.parameters(), lr=cfg.lr)
    layer.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, cfg.train_tokens, (cfg.batch,), generator=gen)
        out = layer(x_train[idx], m_train[idx])
        loss = torch.nn.functional.mse_loss(out.hidden_states, y_train[idx]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        out = layer(x_test, m_test)
        mse = float(torch.nn.functional.mse_loss(out.hidden_states, y_test))
        first = out.routing.logits.argmax(-1)
    tv, p = routing_tv(first, m_test, num_experts)
    return CellResult(tv, mse, p)


# -- the experiment ------------------------------------------------------------------------------
def cell_key(regime: str, dim: int, num_experts: int, router: str) -> str:
    return f"{regime}/d={dim}/E={num_experts}/{router}"


def run_toy(seeds: list[int], cfg: ToyConfig, regimes: tuple[str, ...] = REGIMES,
            routers: tuple[str, ...] = DEFAULT_ROUTERS) -> dict:
    """Every (regime, d, E, router) cell of `cfg`'s grid over `seeds`.

    Returns:
        {"experiment", "command", "config", "seeds", "ceiling", "cells": {cell_key: {"regime", "dim",
        "num_experts", "router", "tv", "mse", "runs"}}, "seconds", "findings", "caveats", "headline"}
        where tv and mse are `mean_ci95` summaries, "ceiling" holds the covariance regime's linear
        bounds (E = 2 ceiling, analytic and measured per d on held-out samples; the E = 4 lower
        bound), and findings / caveats / headline are sentences generated from the numbers.
    """
    for name in regimes:
        if name not in REGIMES:
            raise ValueError(f"unknown regime {name!r}; choose from {list(REGIMES)}.")
    for name in routers:
        check_router(name)
    start = time.perf_counter()
    cache: dict = {}
    cells = {}
    for regime in regimes:
        for dim in cfg.dims:
            for e in cfg.experts:
                for router in routers:
                    cells[cell_key(regime, dim, e, router)] = {"regime": regime, "dim": dim, "num_experts": e,
                                                               "router": router,
                                                               **summarize(regime, dim, e, router, seeds, cfg, cache)}
    measured = {}
    for dim in cfg.dims:
        x, m = sample_tokens("covariance", cfg.test_tokens, dim, torch.Generator().manual_seed(10_000))
        measured[str(dim)] = fitted_halfspace_tv(x, m)
    ceiling = {"e2_analytic_affine_halfspace": linear_ceiling_e2(), "e2_measured_axis_halfspace_by_dim": measured,
               "e2_bias_free_router": 0.0, "e2_upper_bound": 0.5, "e4_linear_lower_bound": linear_example_e4()}
    results = {"experiment": "E4 gaussian toy", "command": command(seeds, cfg, regimes, routers),
               "config": asdict(cfg), "seeds": list(seeds), "ceiling": ceiling, "cells": cells,
               "separation": run_separation(seeds, cfg, cache), "seconds": time.perf_counter() - start}
    results.update(findings=findings(results), caveats=caveats(results), headline=headline(results))
    return results


def summarize(regime: str, dim: int, e: int, router: str, seeds: list[int], cfg: ToyConfig, cache: dict) -> dict:
    """{"tv", "mse" (`mean_ci95` over seeds), "runs"} of one cell; runs already trained (same key) come
    from `cache` (the separation sweep shares cells with the grid)."""
    runs = []
    for s in seeds:
        key = (regime, dim, e, router, s)
        if key not in cache:
            cache[key] = run_cell(regime, dim, e, router, s, cfg)
        runs.append(cache[key])
    return {"tv": mean_ci95([r.tv for r in runs]), "mse": mean_ci95([r.mse for r in runs]),
            "runs": [asdict(r) for r in runs]}


def capacity_tv(router: str, dim: int, seed: int, cfg: ToyConfig) -> float:
    """What the router's function class can do when told the modality: its feature map plus one logit,
    trained as a modality classifier (logistic loss, Adam, `cfg.steps` steps, the cell's data) and
    read as a 2-expert router (expert 0 where the logit is > 0); the held-out routing TV.

    This separates capacity from optimisation: `run_cell` trains the same router from the task's
    gradient only. A surrogate loss finds a lower bound on the class's best TV (logistic loss cannot
    find the affine ceiling at all: for two centred, symmetric classes its optimum is w = 0).
    """
    gen = torch.Generator().manual_seed(seed)
    teachers(dim, cfg.intermediate, gen)  # the same draws as run_cell, so the same tokens
    x_train, m_train = sample_tokens("covariance", cfg.train_tokens, dim, gen)
    x_test, m_test = sample_tokens("covariance", cfg.test_tokens, dim, gen)
    torch.manual_seed(seed)
    features = router_features(router, dim)
    head = torch.nn.Linear(features.out_dim, 1, bias=False)  # φ(x) already holds the constant 1
    opt = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=cfg.lr)
    for _ in range(cfg.steps):
        idx = torch.randint(0, cfg.train_tokens, (cfg.batch,), generator=gen)
        logit = head(features(x_train[idx]))[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, m_train[idx].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pick = (head(features(x_test))[:, 0] > 0).long()
    return routing_tv(pick, m_test, 2)[0]


def sweep_routers(dim: int, cfg: ToyConfig) -> list[str]:
    """The separation sweep's routers at dimension `dim`, each family smallest first (ranks up to d)."""
    return (["aware", "agnostic"] + [f"agnostic_rank{r}" for r in cfg.ranks if r <= dim]
            + [f"agnostic_mlp{h}" for h in cfg.widths] + ["agnostic_quadratic"])


def family(router: str) -> str:
    """linear, rank, mlp, quadratic or aware."""
    match = FAMILY.fullmatch(router)
    if match:
        return match.group(1)
    return {"agnostic": "linear", "agnostic_quadratic": "quadratic"}.get(router, "aware")


def run_separation(seeds: list[int], cfg: ToyConfig, cache: dict | None = None) -> dict:
    """The parameter-count table: covariance regime, E = 2, every d of `cfg.separation_dims`.

    At each d: the aware router, and the agnostic families (affine; rank-r quadratic; MLP of width
    h; full quadratic), each with its router parameter count (counted on the built module). A
    router "reaches" the aware router when its mean held-out TV is at least the aware mean − TV_TOL
    and its mean MSE at most the aware mean × (1 + MSE_TOL); per family the smallest one that does
    is reported (None: no size of the sweep did). Beside them, the two proven bounds of
    docs/theory.md: the best half-space TV (any affine router, E = 2) and TV(P0, P1) (any router
    that does not see the modality, of any size).

    Returns:
        {"criterion", "dims": {str(d): {"routers": {name: {"family", "params", "tv", "mse", "runs",
        "reaches"}}, "smallest": {family: name | None}, "bound_affine", "bound_any_agnostic"}}}
    """
    cache = {} if cache is None else cache
    out = {"criterion": f"mean TV >= aware mean TV - {TV_TOL} and mean MSE <= aware mean MSE x {1 + MSE_TOL:g}",
           "tv_tol": TV_TOL, "mse_tol": MSE_TOL, "dims": {}}
    for dim in cfg.separation_dims:
        routers = {}
        for router in sweep_routers(dim, cfg):
            routers[router] = {"family": family(router), "params": router_parameters(build_layer(router, dim, 2, cfg)),
                               **summarize("covariance", dim, 2, router, seeds, cfg, cache)}
            if router != "aware":
                routers[router]["capacity_tv"] = mean_ci95([capacity_tv(router, dim, s, cfg) for s in seeds])
        aware = routers["aware"]
        for r in routers.values():
            r["reaches"] = bool(r["tv"]["mean"] >= aware["tv"]["mean"] - TV_TOL
                                and r["mse"]["mean"] <= aware["mse"]["mean"] * (1 + MSE_TOL))
            r["capacity_reaches"] = bool(r.get("capacity_tv", r["tv"])["mean"] >= aware["tv"]["mean"] - TV_TOL)
        smallest, smallest_capacity = {}, {}
        for fam in ("linear", "rank", "mlp", "quadratic"):
            for flag, table in (("reaches", smallest), ("capacity_reaches", smallest_capacity)):
                ok = [name for name, r in routers.items() if r["family"] == fam and r[flag]]
                table[fam] = min(ok, key=lambda name: routers[name]["params"]) if ok else None
        out["dims"][str(dim)] = {"routers": routers, "smallest": smallest, "smallest_capacity": smallest_capacity,
                                 "bound_affine": linear_ceiling_e2(),
                                 "bound_any_agnostic": modality_tv("covariance", dim)}
    return out


def command(seeds: list[int], cfg: ToyConfig, regimes: tuple[str, ...], routers: tuple[str, ...]) -> str:
    """The command line that reproduces a run (non-default options only)."""
    default = ToyConfig()
    parts = ["python -m mmoe_ds.experiments.toy", "--seeds " + ",".join(map(str, seeds))]
    for flag, value, base in (("--steps", cfg.steps, default.steps), ("--dims", cfg.dims, default.dims),
                              ("--experts", cfg.experts, default.experts), ("--regimes", tuple(regimes), REGIMES),
                              ("--routers", tuple(routers), DEFAULT_ROUTERS),
                              ("--separation-dims", cfg.separation_dims, default.separation_dims),
                              ("--ranks", cfg.ranks, default.ranks), ("--widths", cfg.widths, default.widths)):
        if value != base:
            parts.append(f"{flag} " + (",".join(map(str, value)) if isinstance(value, tuple) else str(value)))
    return " ".join(parts)


def separation_findings(sep: dict) -> list[str]:
    """One sentence per d of the separation sweep."""
    out = []
    for d, row in (sep.get("dims") or {}).items():
        r = row["routers"]
        aware = r["aware"]

        def named(key: str) -> str:
            found = [f"{row[key][f].removeprefix('agnostic_')} ({r[row[key][f]]['params']} parameters)"
                     for f in ("rank", "mlp", "quadratic") if row[key][f]]
            return ", ".join(found) if found else "none of the sweep"
        out.append(f"Separation, d={d}: the aware router ({aware['params']} parameters) reaches TV "
                   f"{fmt_tv(aware['tv'])}, "
                   f"MSE {fmt_tv(aware['mse'])}; no blind router of any size can exceed TV(P0, P1) = "
                   f"{row['bound_any_agnostic']:.3f}, and an affine one ({r['agnostic']['params']} parameters) not "
                   f"{row['bound_affine']:.3f} (measured {fmt_tv(r['agnostic']['tv'])}). Smallest blind routers that "
                   f"reach it when trained on the task: {named('smallest')}; whose class reaches it when told the "
                   f"modality: {named('smallest_capacity')}.")
    return out


def _tv(results: dict, regime: str, dim: int, e: int, router: str) -> str | None:
    cell = results["cells"].get(cell_key(regime, dim, e, router))
    return None if cell is None else f"{router} {fmt_tv(cell['tv'])}"


def findings(results: dict) -> list[str]:
    """Sentences generated from the numbers ("what this says"), one per regime and (d, E)."""
    c, cfg, out = results["ceiling"], results["config"], []
    ceiling = c["e2_analytic_affine_halfspace"]
    for regime in REGIMES:
        for dim in cfg["dims"]:
            for e in cfg["experts"]:
                phrases = [p for r in ROUTERS if (p := _tv(results, regime, dim, e, r))]
                if not phrases:
                    continue
                line = f"{regime.capitalize()} regime, d={dim}, E={e}: TV " + "; ".join(phrases) + "."
                if regime == "covariance" and e == 2:
                    linear = {r: results["cells"].get(cell_key(regime, dim, e, r))
                              for r in ("agnostic", "agnostic_matched")}
                    above = [r for r, cell in linear.items() if cell and cell["tv"]["mean"] > ceiling]
                    if any(linear.values()):
                        line += (f" Above the half-space ceiling {ceiling:.3f}: {', '.join(above)}." if above else
                                 f" Affine agnostic routers at or below the half-space ceiling {ceiling:.3f}.")
                elif regime == "covariance":
                    line += (f" No ceiling <= 1/2 here: a bias-free linear router can reach "
                             f"{c['e4_linear_lower_bound']:.3f} with E=4.")
                out.append(line)
    return out + separation_findings(results.get("separation") or {})


def caveats(results: dict) -> list[str]:
    """What the numbers do not say, including the cells whose seeds disagree (CI half-width > 0.1)."""
    notes = ["One MoE layer on Gaussian tokens with a random per-modality SwiGLU teacher: it shows what a linear "
             "router can and cannot see and what the task gradient teaches the aware router, not what happens "
             "inside a trained multimodal model.",
             f"Top-{results['config']['top_k']} routing: with E=2 both experts compute every token and TV is about "
             "the first choice (the larger gate). With top-1 Switch gates the aware router did not learn modality "
             "routing reliably (see the module docstring of mmoe_ds/experiments/toy.py)."]
    if (results.get("separation") or {}).get("dims"):
        notes.append("Separation sweep: the parameter counts are of dense routers (a rank-r form reads r·d projection "
                     "weights); the theorems bound what a router of a class can reach (docs/theory.md), the sweep "
                     "measures what training finds in " + str(results["config"]["steps"]) + " steps, so 'none of "
                     "the sweep' for a task-trained family is an optimisation outcome unless its class also fails. "
                     "The class TV comes from a logistic surrogate: a lower bound on what the class can do.")
    unstable = [f"{k} ({fmt_tv(cell['tv'])})" for k, cell in results["cells"].items()
                if cell["tv"]["ci95"] is not None and cell["tv"]["ci95"] > 0.1]
    if unstable:
        notes.append("Seeds disagree (95% CI half-width of TV > 0.1), an optimisation outcome rather than a "
                     "property of the router: " + "; ".join(unstable) + ".")
    return notes


def headline(results: dict) -> str:
    """One sentence for the document's summary: the covariance regime at the first d, E = 2."""
    dim = results["config"]["dims"][0]
    agn, aware, quad = (results["cells"].get(cell_key("covariance", dim, 2, r))
                        for r in ("agnostic", "aware", "agnostic_quadratic"))
    if not (agn and aware):
        return "see the table"
    text = (f"covariance-shape regime, d={dim}, E=2: agnostic affine router TV {fmt_tv(agn['tv'])} against a "
            f"half-space ceiling of {results['ceiling']['e2_analytic_affine_halfspace']:.3f}; aware router TV "
            f"{fmt_tv(aware['tv'])}")
    text += f"; agnostic quadratic router TV {fmt_tv(quad['tv'])}." if quad else "."
    row = ((results.get("separation") or {}).get("dims") or {}).get(str(dim))
    if row:
        cap = [f"{row['smallest_capacity'][f].removeprefix('agnostic_')} "
               f"({row['routers'][row['smallest_capacity'][f]]['params']} parameters)"
               for f in ("rank", "mlp") if row["smallest_capacity"][f]]
        text += (f" Smallest blind router whose class reaches the aware router ({row['routers']['aware']['params']} "
                 f"parameters): {' or '.join(cap) if cap else 'none of the sweep'}.")
    return text


def _int_list(text: str) -> list[int]:
    """argparse type: "0,1,2" -> [0, 1, 2] (argparse prefixes errors with the flag's name)."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("give at least one value, e.g. 0,1,2")
    return values


def _int_list_or_none(text: str) -> list[int]:
    """argparse type: like `_int_list`, or "none" for an empty list."""
    return [] if text.strip().lower() == "none" else _int_list(text)


def _names(known: tuple[str, ...], sized: bool = False):
    """argparse type: comma-separated names, each one of `known` (or, with `sized`, agnostic_rank<r> /
    agnostic_mlp<h>)."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [n for n in names if n not in known and not (sized and sized_router(n))]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown {bad or 'empty list'}; choose from {','.join(known)}")
        return names
    return parse


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: run the toy and write results.json / results.md / the figure to --out."""
    ap = argparse.ArgumentParser(prog="python -m mmoe_ds.experiments.toy", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=_int_list, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=ToyConfig.steps)
    ap.add_argument("--dims", type=_int_list, default=list(ToyConfig.dims))
    ap.add_argument("--experts", type=_int_list, default=list(ToyConfig.experts))
    ap.add_argument("--regimes", type=_names(REGIMES), default=REGIMES)
    ap.add_argument("--routers", type=_names(ROUTERS, sized=True), default=DEFAULT_ROUTERS)
    ap.add_argument("--separation-dims", type=_int_list_or_none, default=list(ToyConfig.separation_dims),
                    help="d of the separation sweep (covariance regime, E=2); 'none' skips it")
    ap.add_argument("--ranks", type=_int_list, default=list(ToyConfig.ranks), help="rank-r quadratic routers")
    ap.add_argument("--widths", type=_int_list, default=list(ToyConfig.widths), help="MLP routers of width h")
    ap.add_argument("--out", type=Path, default=Path("runs/experiments/e4_toy"))
    args = ap.parse_args(argv)
    try:
        cfg = ToyConfig(dims=args.dims, experts=args.experts, steps=args.steps, separation_dims=args.separation_dims,
                        ranks=args.ranks, widths=args.widths)
    except ValueError as exc:
        ap.error(str(exc))
    results = run_toy(args.seeds, cfg, regimes=args.regimes, routers=args.routers)
    write_results(results, args.out)
    print(results_table(results), end="")
    figures = FIGURE + (f" and {SEPARATION_FIGURE}" if results["separation"]["dims"] else "")
    print(f"wrote results.json, results.md, {figures} to {args.out} in {results['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
