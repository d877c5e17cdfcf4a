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
learns it with MSE + the router's aux loss and Adam. Routers: agnostic (W·x), agnostic + the
matched-utilization loss (asks for modality 0 on the first half of the experts, modality 1 on
the rest; only the loss sees the modality), aware (W·x + E[m]), agnostic quadratic (W·φ(x) with
φ(x) = [x, x_i·x_j for i <= j]: a quadratic function of x, so it can see the covariance shape)
and, on request, aware + the matched loss. Every router gets the same layer, data, loss,
optimiser and steps; only the router differs. We report the routing total variation
TV(p(e|m=0), p(e|m=1)) of each token's first-choice expert on held-out tokens, and the MSE.

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

Linear ceiling (E = 2, covariance regime): a 2-expert linear router picks expert 1 iff
w·x > b. The codebase's router has no bias (b = 0), and each modality is centrally symmetric, so
such a router splits each modality exactly in half: its expected TV is 0. With a bias, w·x is
N(0, wᵀΣ_m w) for each modality, so TV = max_b |Φ(b/σ_0) − Φ(b/σ_1)| ≤ 1/2, largest for w on the
axis with the largest variance ratio; `linear_ceiling_e2` computes it exactly for our shapes, and
`fitted_halfspace_tv` estimates it from samples with the best axis-aligned half-space (a check
that the analytic number is right). For E = 4 no ceiling <= 1/2 exists: the argmax of four
bias-free linear logits ±x_1, ±x_{d/2+1} picks by max(|x_1|, |x_{d/2+1}|), which already reaches
TV = (4/π)·atan(3) − 1 ≈ 0.59 (`linear_example_e4`); we report that lower bound, not a ceiling.

Run: python -m mmoe_ds.experiments.toy [--seeds 0,1,2] [--steps 300] [--dims 16,32] [--experts 2,4]
     [--routers agnostic,aware,...] [--out runs/experiments/e4_toy]
Writes results.json, results.md and tv_vs_ceiling.png in --out.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmoe_ds.analysis.metrics import mean_ci95 as analysis_mean_ci95
from mmoe_ds.analysis.metrics import total_variation
from mmoe_ds.atomic import atomic_write_bytes, atomic_write_text
from mmoe_ds.moe.config import RouterConfig
from mmoe_ds.moe.experts import ExpertFFN
from mmoe_ds.moe.layer import MoEOutput, TorchMoE, combine_routes
from mmoe_ds.moe.router import ModalityRouter

REGIMES = ("separable", "covariance", "overlap")
ROUTERS = ("agnostic", "agnostic_matched", "aware", "agnostic_quadratic", "aware_matched")
DEFAULT_ROUTERS = ROUTERS[:4]  # the four; aware_matched on request (--routers)
# Covariance regime: per-dim variance on the "own" half and on the other half (equal trace).
HIGH_VAR, LOW_VAR = 1.8, 0.2
SEPARABLE_GAP, OVERLAP_GAP = 8.0, 0.5  # distance between the two means, in σ
FIGURE = "tv_vs_ceiling.png"


@dataclass
class ToyConfig:
    """Sizes of the toy grid and of one run. Defaults: 3 seeds × every cell in about 3 min on CPU."""

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

    def __post_init__(self) -> None:
        self.dims, self.experts = tuple(self.dims), tuple(self.experts)
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

    agnostic and agnostic_quadratic: W·x (resp. W·φ(x)). agnostic_matched: W·x plus the
    matched-utilization loss (the loss sees the modality, the router does not). aware:
    W·x + E[m]. aware_matched: aware plus the same loss.
    """
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose one of {list(ROUTERS)}.")
    common = dict(num_experts=num_experts, top_k=top_k, drop_tokens=False, load_balance_coef=0.01,
                  mode="modality_bias" if router.startswith("aware") else "agnostic")
    if router.endswith("_matched"):
        common.update(matched_utilization_coef=matched_coef, matched_utilization_target=matched_target(num_experts))
    return RouterConfig(**common)


def quadratic_features(x: Tensor) -> Tensor:
    """φ(x) = [x, x_i·x_j for i <= j]: [n, d + d(d+1)/2]."""
    i, j = torch.triu_indices(x.shape[1], x.shape[1])
    return torch.cat([x, x[:, i] * x[:, j]], dim=1)


class QuadraticRouterMoE(TorchMoE):
    """`TorchMoE` whose router sees φ(x) (`quadratic_features`) while the experts see x."""

    def __init__(self, cfg: RouterConfig, hidden_size: int, intermediate_size: int):
        super().__init__(cfg, hidden_size, intermediate_size)
        self.deepspeed_moe.gate = ModalityRouter(cfg, hidden_size + hidden_size * (hidden_size + 1) // 2)

    def forward(self, hidden_states: Tensor, modality_ids: Tensor) -> MoEOutput:
        routing = self.deepspeed_moe.gate.route(quadratic_features(hidden_states), modality_ids)
        out = combine_routes(hidden_states, routing, self.deepspeed_moe.experts, self.use_grouped,
                             num_kept=hidden_states.shape[0] * self.cfg.max_top_k)
        return MoEOutput(out, routing.aux_loss, routing)


def build_layer(router: str, dim: int, num_experts: int, cfg: ToyConfig) -> TorchMoE:
    """The MoE layer of one router design."""
    rc = router_config(router, num_experts, cfg.top_k, cfg.matched_coef)
    cls = QuadraticRouterMoE if router == "agnostic_quadratic" else TorchMoE
    return cls(rc, dim, cfg.intermediate)


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


def linear_ceiling_e2() -> float:
    """Best TV of any half-space w·x > b between the covariance regime's two modalities.

    Along the best axis the two projections are N(0, HIGH_VAR) and N(0, LOW_VAR); the best
    threshold b maximises Φ(b/σ_low) − Φ(b/σ_high) (stationary where the densities cross).
    """
    s_hi, s_lo = math.sqrt(HIGH_VAR), math.sqrt(LOW_VAR)
    b = s_hi * s_lo * math.sqrt(2 * math.log(s_hi / s_lo) / (HIGH_VAR - LOW_VAR))
    return _phi(b / s_lo) - _phi(b / s_hi)


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
    layer = build_layer(router, dim, num_experts, cfg)
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
        if name not in ROUTERS:
            raise ValueError(f"unknown router {name!r}; choose from {list(ROUTERS)}.")
    start = time.perf_counter()
    cells = {}
    for regime in regimes:
        for dim in cfg.dims:
            for e in cfg.experts:
                for router in routers:
                    runs = [run_cell(regime, dim, e, router, s, cfg) for s in seeds]
                    cells[cell_key(regime, dim, e, router)] = {
                        "regime": regime, "dim": dim, "num_experts": e, "router": router,
                        "tv": mean_ci95([r.tv for r in runs]), "mse": mean_ci95([r.mse for r in runs]),
                        "runs": [asdict(r) for r in runs]}
    measured = {}
    for dim in cfg.dims:
        x, m = sample_tokens("covariance", cfg.test_tokens, dim, torch.Generator().manual_seed(10_000))
        measured[str(dim)] = fitted_halfspace_tv(x, m)
    ceiling = {"e2_analytic_affine_halfspace": linear_ceiling_e2(), "e2_measured_axis_halfspace_by_dim": measured,
               "e2_bias_free_router": 0.0, "e2_upper_bound": 0.5, "e4_linear_lower_bound": linear_example_e4()}
    results = {"experiment": "E4 gaussian toy", "command": command(seeds, cfg, regimes, routers),
               "config": asdict(cfg), "seeds": list(seeds), "ceiling": ceiling, "cells": cells,
               "seconds": time.perf_counter() - start}
    results.update(findings=findings(results), caveats=caveats(results), headline=headline(results))
    return results


def command(seeds: list[int], cfg: ToyConfig, regimes: tuple[str, ...], routers: tuple[str, ...]) -> str:
    """The command line that reproduces a run (non-default options only)."""
    default = ToyConfig()
    parts = ["python -m mmoe_ds.experiments.toy", "--seeds " + ",".join(map(str, seeds))]
    for flag, value, base in (("--steps", cfg.steps, default.steps), ("--dims", cfg.dims, default.dims),
                              ("--experts", cfg.experts, default.experts), ("--regimes", tuple(regimes), REGIMES),
                              ("--routers", tuple(routers), DEFAULT_ROUTERS)):
        if value != base:
            parts.append(f"{flag} " + (",".join(map(str, value)) if isinstance(value, tuple) else str(value)))
    return " ".join(parts)


def results_table(results: dict) -> str:
    """Markdown: the setup, the ceilings, and one row per cell with TV and MSE as mean ± 95% CI."""
    c, cfg = results["ceiling"], results["config"]
    measured = ", ".join(f"{v:.3f} at d={d}" for d, v in c["e2_measured_axis_halfspace_by_dim"].items())
    lines = [
        f"E4 Gaussian toy: per-modality SwiGLU teacher, one MoE layer, top-{cfg['top_k']} dropless, "
        f"{cfg['steps']} Adam steps (lr {cfg['lr']}), seeds {results['seeds']}, {results['seconds']:.1f} s on CPU. "
        "TV = routing total variation of the first-choice expert between the modalities (held out).",
        "",
        f"Linear ceiling (covariance regime, E=2): router without bias 0 (symmetry); best affine half-space "
        f"{c['e2_analytic_affine_halfspace']:.3f} analytic ({measured} measured on {cfg['test_tokens']} samples); "
        f"always <= 1/2. E=4: no ceiling <= 1/2; a bias-free linear router already reaches "
        f"{c['e4_linear_lower_bound']:.3f} (lower bound).",
        "",
        "| regime | d | E | router | TV (mean ± 95% CI) | MSE (mean ± 95% CI) |",
        "|---|---|---|---|---|---|"]
    for cell in results["cells"].values():
        lines.append(f"| {cell['regime']} | {cell['dim']} | {cell['num_experts']} | {cell['router']} | "
                     f"{_fmt(cell['tv'])} | {_fmt(cell['mse'])} |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    """results.md: the command, the table, the figure, and the generated findings and caveats."""
    lines = ["# E4: Gaussian toy — can a router that never sees the modality route by modality?", "",
             "```bash", results.get("command", "python -m mmoe_ds.experiments.toy"), "```", "",
             results_table(results), f"![routing TV against the ceiling]({FIGURE})", "", "**What this says**", ""]
    lines += [f"- {x}" for x in results.get("findings", [])] + ["", "**What it does not say**", ""]
    lines += [f"- {x}" for x in results.get("caveats", [])]
    return "\n".join(lines) + "\n"


def _fmt(summary: dict) -> str:
    if summary["ci95"] is None:
        return f"{summary['mean']:.3f} (1 seed, no interval)"
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"


def _tv(results: dict, regime: str, dim: int, e: int, router: str) -> str | None:
    cell = results["cells"].get(cell_key(regime, dim, e, router))
    return None if cell is None else f"{router} {_fmt(cell['tv'])}"


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
                        line += (f" Above the linear ceiling {ceiling:.3f}: {', '.join(above)}." if above else
                                 f" Linear agnostic routers at or below the linear ceiling {ceiling:.3f}.")
                elif regime == "covariance":
                    line += (f" No ceiling <= 1/2 here: a bias-free linear router can reach "
                             f"{c['e4_linear_lower_bound']:.3f} with E=4.")
                out.append(line)
    return out


def caveats(results: dict) -> list[str]:
    """What the numbers do not say, including the cells whose seeds disagree (CI half-width > 0.1)."""
    notes = ["One MoE layer on Gaussian tokens with a random per-modality SwiGLU teacher: it shows what a linear "
             "router can and cannot see and what the task gradient teaches the aware router, not what happens "
             "inside a trained multimodal model.",
             f"Top-{results['config']['top_k']} routing: with E=2 both experts compute every token and TV is about "
             "the first choice (the larger gate). With top-1 Switch gates the aware router did not learn modality "
             "routing reliably (see the module docstring of mmoe_ds/experiments/toy.py)."]
    unstable = [f"{k} ({_fmt(cell['tv'])})" for k, cell in results["cells"].items()
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
    text = (f"covariance-shape regime, d={dim}, E=2: agnostic linear router TV {_fmt(agn['tv'])} against a linear "
            f"ceiling of {results['ceiling']['e2_analytic_affine_halfspace']:.3f}; aware router TV {_fmt(aware['tv'])}")
    return text + (f"; agnostic quadratic router TV {_fmt(quad['tv'])}." if quad else ".")


def tv_figure_png(results: dict) -> bytes:
    """PNG bytes: measured TV per router (mean, 95% CI bars) for every (d, E), one panel per regime,
    with the covariance regime's linear bounds drawn over the E = 2 and E = 4 groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results["cells"].values())
    regimes = list(dict.fromkeys(c["regime"] for c in cells))
    routers = list(dict.fromkeys(c["router"] for c in cells))
    groups = list(dict.fromkeys((c["dim"], c["num_experts"]) for c in cells))
    by_key = {(c["regime"], c["dim"], c["num_experts"], c["router"]): c for c in cells}
    width = 0.8 / len(routers)
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.2 * len(regimes), 4.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for r, router in enumerate(routers):
            xs, means, errs = [], [], []
            for g, (dim, e) in enumerate(groups):
                cell = by_key.get((regime, dim, e, router))
                if cell:
                    xs.append(g + (r - (len(routers) - 1) / 2) * width)
                    means.append(cell["tv"]["mean"])
                    errs.append(cell["tv"]["ci95"] or 0.0)
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=router)
        if regime == "covariance":
            _draw_bounds(ax, groups, results["ceiling"])
        ax.set_title(f"{regime} regime")
        ax.set_xticks(range(len(groups)), [f"d={d}, E={e}" for d, e in groups])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("routing TV between modalities")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(f"E4 Gaussian toy: held-out routing TV, mean and 95% CI over seeds {results['seeds']}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _draw_bounds(ax, groups: list[tuple[int, int]], ceiling: dict) -> None:
    """The covariance regime's linear bounds as segments over each (d, E) group, labelled once."""
    bounds = {2: [(ceiling["e2_analytic_affine_halfspace"], "k", "--", "linear ceiling (E=2)"),
                  (ceiling["e2_upper_bound"], "grey", ":", "any half-space <= 1/2 (E=2)")],
              4: [(ceiling["e4_linear_lower_bound"], "tab:red", "-.", "a bias-free linear router reaches (E=4)")]}
    labelled = set()
    for g, (_, e) in enumerate(groups):
        for value, color, style, label in bounds.get(e, []):
            ax.hlines(value, g - 0.45, g + 0.45, colors=color, linestyles=style,
                      label=None if label in labelled else label)
            labelled.add(label)


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md and tv_vs_ceiling.png in `out` (created if missing), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    atomic_write_bytes(out / FIGURE, tv_figure_png(results))


def _int_list(text: str) -> list[int]:
    """argparse type: "0,1,2" -> [0, 1, 2] (argparse prefixes errors with the flag's name)."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("give at least one value, e.g. 0,1,2")
    return values


def _names(known: tuple[str, ...]):
    """argparse type: comma-separated names, each one of `known`."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [n for n in names if n not in known]
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
    ap.add_argument("--routers", type=_names(ROUTERS), default=DEFAULT_ROUTERS)
    ap.add_argument("--out", type=Path, default=Path("runs/experiments/e4_toy"))
    args = ap.parse_args(argv)
    try:
        cfg = ToyConfig(dims=args.dims, experts=args.experts, steps=args.steps)
    except ValueError as exc:
        ap.error(str(exc))
    results = run_toy(args.seeds, cfg, regimes=args.regimes, routers=args.routers)
    write_results(results, args.out)
    print(results_table(results), end="")
    print(f"wrote results.json, results.md and {FIGURE} to {args.out} in {results['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
