"""`analyze`: the routing analysis of a run or an export on a fixed held-out probe set.

The probe set is drawn from the TEST split of a prepared dataset (`sample_test_set`: image+caption
pairs spread over every test shard, seeded), encoded with the model's own processor, so another
dataset is read with the model's tokenizer. Per MoE layer and modality it measures utilization,
TV, I(M;E) (Miller–Madow, permutation null), NMI, soft MI, effective experts, Gini, drop rate,
compute share, router confidence; the aware router's logit split; a linear probe of the modality
from the router input; E×E CKA of expert outputs and weights; alarms; and, with `compare`, the
Hungarian matching of experts to another run's.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AnalysisInputError
from .alarms import AlarmThresholds, routing_alarms
from .cka import cka_matrix, match_experts, weight_cka
from .collect import LayerCapture, ProbeCapture, capture_routing, expert_outputs
from .metrics import mutual_information_bits, nmi, permutation_null_mi, total_variation
from .probe import linear_probe
from .routing import (
    compute_share,
    expert_ffn_flops,
    modality_routing,
    route_arrays,
    router_logit_split,
    soft_mutual_information_bits,
)


# -- loading -------------------------------------------------------------------------------------
@dataclass
class Source:
    """What is to be analyzed, resolved without loading any weights (so bad input fails fast)."""
    path: Path
    kind: str                # "run" (a run, its checkpoints/ or a tag dir) or "export"
    config: object           # MmoeConfig
    processor_dir: Path
    data_dir: Path | None    # the run's prepared data (None for an export: it does not record it)


def _is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("model*.safetensors"))


def resolve_source(source: str | os.PathLike) -> Source:
    """A run's output dir, a checkpoint dir or an export dir -> its config, processor and data.

    Raises:
        AnalysisInputError naming what was expected, or that the model has no MoE layer.
    """
    from ..export.gather import resolve_tag_dir
    from ..model import MmoeConfig

    path = Path(source)
    if not path.is_dir():
        raise AnalysisInputError(f"{path}: no such folder; give a run's output dir, a checkpoint dir or an export dir.")
    try:
        if _is_export(path):
            config, processor_dir, data_dir, kind = MmoeConfig.from_pretrained(path), path, None, "export"
        else:
            tag_dir = resolve_tag_dir(path)
            meta = json.loads((tag_dir / "meta.json").read_text())
            config = MmoeConfig(**dict(meta["model_config"], moe_backend="torch", ep_size=1))
            processor_dir, kind = Path(meta.get("processor_dir") or ""), "run"
            data_dir = processor_dir.parent
    except FileNotFoundError:
        raise AnalysisInputError(f"{path}: neither a run (checkpoints/latest), a checkpoint (meta.json) nor an export "
                                 "(config.json + model.safetensors); point at one of those.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise AnalysisInputError(f"{path}: not a readable mmoe-ds run or export ({type(e).__name__}: {first}); "
                                 "train with mmoe_ds.train or export with `mmoe-ds export`.") from None
    if not (processor_dir / "processor_config.json").is_file():
        raise AnalysisInputError(f"{path}: its processor ({processor_dir}) is missing; export the run with its "
                                 "processor, or prepare the data again at that path.")
    if not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        raise AnalysisInputError(f"{path}: the model has no MoE layer (num_hidden_layers={config.num_hidden_layers}, "
                                 f"moe_layer_frequency={config.moe_layer_frequency}); there is no routing to analyze.")
    return Source(path, kind, config, processor_dir, data_dir)


def load_model(src: Source):
    """The model of a resolved source on the torch MoE backend, in eval mode."""
    if src.kind == "export":
        from ..model import MmoeForCausalLM

        return MmoeForCausalLM.from_pretrained(src.path).eval()
    from ..export.gather import load_checkpoint_model

    return load_checkpoint_model(src.path)[0]


def check_probe_data(data_dir: str | os.PathLike) -> int:
    """The number of image+caption samples in the data's test split; AnalysisInputError if there are none."""
    from ..data.manifest import has_manifest, read_manifest, sample_counts

    data_dir = Path(data_dir)
    if not has_manifest(data_dir):
        raise AnalysisInputError(f"{data_dir}: not a prepared dataset (no manifest.json); run `mmoe-ds prepare --out "
                                 f"{data_dir}` or pass --data with one.")
    try:
        n = sample_counts(read_manifest(data_dir))[("test", "image_text")]
    except (ValueError, KeyError, TypeError) as e:
        raise AnalysisInputError(f"{data_dir}/manifest.json is unreadable ({type(e).__name__}: {e}); prepare the "
                                 "dataset again.") from None
    if n == 0:
        raise AnalysisInputError(f"{data_dir}: no image+caption samples in split 'test', so there is no held-out probe "
                                 "set; prepare the data with a test split (mmoe-ds prepare puts ~10% there) or pass "
                                 "--data with one.")
    return n


def probe_batches(processor, data_dir: str | os.PathLike, n_probe: int, seed: int, batch_size: int) -> list[dict]:
    """The probe set: up to `n_probe` test image+caption pairs, encoded and collated in batches."""
    from ..training.data_plan import sample_test_set

    samples = sample_test_set(str(data_dir), n_probe, seed)
    if not samples:
        raise AnalysisInputError(f"{data_dir}: the test split's image+caption samples could not be read.")
    return [processor(images=[s.image for s in samples[i:i + batch_size]],
                      texts=[s.caption for s in samples[i:i + batch_size]])
            for i in range(0, len(samples), batch_size)]


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Dependence:
    """How much the expert choice depends on the modality, for one layer (NaN without both modalities)."""
    tv: float
    mi_bits: float
    mi_bits_plugin: float
    mi_null_p: float
    nmi: float
    soft_mi_bits: float


@dataclass
class LayerAnalysis(Dependence):
    """Everything measured on one MoE layer (see `Analysis.to_dict` for the JSON form)."""
    layer: int
    probe_acc: float
    probe_balanced_acc: float
    probe_chance: float
    logit_var_share_modality: float | None
    per_modality: dict[str, dict]
    cka: dict[str, list[list[float]]]

    def to_dict(self) -> dict:
        fields = dict(self.__dict__)
        return {"layer": fields.pop("layer"), **fields}


@dataclass
class Analysis:
    """Result of `analyze`."""
    source: str
    data_dir: str
    mode: str
    modalities: list[str]
    num_experts: int
    n_probe_samples: int
    n_probe_tokens: dict[str, int]
    feature_tokens: int
    layers: list[LayerAnalysis]
    alarms: list[dict]
    thresholds: dict
    compare: dict | None = None
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict (the layout of analysis.json, see the module's interface notes)."""
        out = {k: v for k, v in self.__dict__.items() if k != "layers"}
        out["layers"] = [layer.to_dict() for layer in self.layers]
        return _jsonable(out)


def _jsonable(x):
    """NaN/inf -> None, numpy scalars -> Python (analysis.json must be strict JSON)."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


# -- the analysis -------------------------------------------------------------------------------------
def _nan() -> float:
    return float("nan")


def _dependence(cap: ProbeCapture, lc: LayerCapture, per: list, routed: np.ndarray, n_perm: int,
                seed: int) -> Dependence:
    """TV, I(M;E) (Miller-Madow and plug-in), its permutation p, NMI, soft MI (NaN without both modalities)."""
    if any(p is None for p in per):
        return Dependence(*[_nan()] * 6)
    route_m, route_e = route_arrays(cap.modality_ids, lc.chosen, lc.valid)
    return Dependence(
        tv=total_variation(per[0].utilization, per[1].utilization) if len(per) == 2 else _nan(),
        mi_bits=mutual_information_bits(routed, miller_madow=True), mi_bits_plugin=mutual_information_bits(routed),
        mi_null_p=permutation_null_mi(route_m, route_e, n_perm=n_perm, seed=seed).p_value,
        nmi=nmi(routed, miller_madow=True), soft_mi_bits=soft_mutual_information_bits(lc.probs, cap.modality_ids,
                                                                                      len(per)))


def _probe(cap: ProbeCapture, lc: LayerCapture, seed: int) -> tuple[float, float, float]:
    """(held-out accuracy, balanced accuracy, chance) of the modality probe on the router inputs."""
    F = cap.feature_tokens
    labels, groups = cap.modality_ids[:F], cap.sample_ids[:F]
    if F < 8 or len(np.unique(labels)) < 2 or len(np.unique(groups)) < 2:
        return _nan(), _nan(), _nan()
    r = linear_probe(lc.features, labels, groups=groups, seed=seed)
    return r.accuracy, r.balanced_accuracy, r.chance


def _expert_cka(cap: ProbeCapture, lc: LayerCapture, modalities: tuple[str, ...]) -> dict[str, list[list[float]]]:
    """E×E CKA of the experts' outputs on the same tokens (all, each modality) and of their weights."""
    import torch

    experts = lc.module.deepspeed_moe.experts
    E, labels = lc.module.num_experts, cap.modality_ids[:cap.feature_tokens]
    cka: dict[str, list[list[float]]] = {}
    if cap.feature_tokens >= 4:
        outs = expert_outputs(lc.module, lc.features)
        cka["all"] = cka_matrix(outs).tolist()
        for i, name in enumerate(modalities):
            rows = labels == i
            on_device = torch.from_numpy(rows).to(outs[0].device)
            cka[name] = (cka_matrix([o[on_device] for o in outs]) if rows.sum() >= 4 else
                         np.full((E, E), np.nan)).tolist()
    cka["weights"] = weight_cka(experts).tolist()
    return cka


def _layer_analysis(cap: ProbeCapture, lc: LayerCapture, modalities: tuple[str, ...], n_perm: int,
                    seed: int) -> tuple[LayerAnalysis, dict]:
    """One layer's metrics, and its counts in `RoutingStats.to_dict` form (for the alarms)."""
    M, E = len(modalities), lc.probs.shape[1]
    per = modality_routing(cap.modality_ids, lc.probs, lc.chosen, lc.valid, lc.kept, M, E)
    routed = np.array([p.routed if p else [0] * E for p in per], dtype=np.float64)
    kept = np.array([p.kept if p else [0] * E for p in per], dtype=np.float64)
    tokens = [p.tokens if p else 0 for p in per]
    experts = lc.module.deepspeed_moe.experts
    share = compute_share(kept, tokens, expert_ffn_flops(experts.hidden_size, experts.intermediate_size))
    dep = _dependence(cap, lc, per, routed, n_perm, seed)
    probe_acc, probe_bal, probe_chance = _probe(cap, lc, seed)
    F = cap.feature_tokens
    split = router_logit_split(lc.module.deepspeed_moe.gate, lc.features, cap.modality_ids[:F]) if F > 0 else None
    per_modality = {name: {} if p is None else {
        "tokens": p.tokens, "utilization": p.utilization, "effective_experts": p.effective_experts, "gini": p.gini,
        "drop_rate": p.drop_rate, "compute_share": share.share[i], "token_share": share.token_share[i],
        "compute_flops": share.flops[i], "mean_top1_prob": p.mean_top1_prob} for i, (name, p) in
        enumerate(zip(modalities, per))}
    counts = {name: {"tokens": tokens[i], "routed_per_expert": [int(v) for v in routed[i]],
                     "kept_per_expert": [int(v) for v in kept[i]]} for i, name in enumerate(modalities)}
    return LayerAnalysis(**asdict(dep), layer=lc.layer, probe_acc=probe_acc, probe_balanced_acc=probe_bal,
                         probe_chance=probe_chance,
                         logit_var_share_modality=None if split is None else split.modality_share,
                         per_modality=per_modality, cka=_expert_cka(cap, lc, modalities)), counts


def _compare(cap_a: ProbeCapture, cap_b: ProbeCapture, other: str) -> dict:
    """Cross-run CKA of expert outputs on the same probe tokens, and the Hungarian matching per layer."""
    if cap_a.feature_tokens != cap_b.feature_tokens or \
            not np.array_equal(cap_a.modality_ids[:cap_a.feature_tokens], cap_b.modality_ids[:cap_b.feature_tokens]):
        raise AnalysisInputError(f"{other}: its processor encodes the probe set into different tokens; compare runs "
                                 "that share a tokenizer and image settings (the same prepared data).")
    if len(cap_a.layers) != len(cap_b.layers):
        raise AnalysisInputError(f"{other}: {len(cap_b.layers)} MoE layers against {len(cap_a.layers)}; compare "
                                 "models of the same architecture.")
    layers = []
    for la, lb in zip(cap_a.layers, cap_b.layers):
        outs_a, outs_b = expert_outputs(la.module, la.features), expert_outputs(lb.module, lb.features)
        cross = cka_matrix(outs_a, outs_b)
        m = match_experts(cross)
        layers.append({"layer": la.layer, "cka": cross.tolist(), "partner": m.partner,
                       "matched_cka": m.similarity, "mean_matched_cka": m.mean_similarity})
    return {"other": other, "layers": layers}


def _capture(src: Source, data: Path, n_probe: int, seed: int, batch_size: int, max_feature_tokens: int,
             device) -> ProbeCapture:
    """Load the source's model and processor and capture its routing on the probe set."""
    from ..data.processor import MmoeProcessor

    processor = MmoeProcessor.from_pretrained(src.processor_dir)
    processor.max_length = min(processor.max_length, src.config.max_position_embeddings)
    batches = probe_batches(processor, data, n_probe, seed, batch_size)
    try:
        return capture_routing(load_model(src).to(device), batches, max_feature_tokens)
    except ValueError as e:  # e.g. patches the model cannot take (another image size)
        raise AnalysisInputError(f"{src.path}: {str(e).splitlines()[0]}") from None


def analyze(source, data_dir=None, n_probe: int = 512, seed: int = 0, batch_size: int = 32,
            compare=None, thresholds: AlarmThresholds | None = None, n_perm: int = 1000,
            max_feature_tokens: int = 16384) -> Analysis:
    """The routing analysis of a run or an export on a held-out probe set.

    Args:
        source: a run's output_dir, a checkpoint dir, or an export dir.
        data_dir: the prepared data whose TEST split is the probe set (default: the run's data dir;
            required for an export).
        n_probe: image+caption test samples in the probe set.
        seed: which samples, the probe's split and the permutation null.
        batch_size: samples per forward pass.
        compare: another run or export of the same architecture and tokenizer: its experts are
            matched to these (cross-run CKA + Hungarian matching).
        thresholds: alarm thresholds (default `AlarmThresholds()`).
        n_perm: label shuffles of the permutation null.
        max_feature_tokens: router inputs kept for the probe and CKA (whole samples up to this many tokens).
    Returns:
        Analysis (`to_dict()` for analysis.json, `write_report` for the files).
    Raises:
        AnalysisInputError: not a run/export, data without a test split, a model without MoE layers.
    """
    import torch

    if n_probe < 2:
        raise AnalysisInputError(f"n_probe: at least 2 probe samples are needed, got {n_probe}.")
    tic = time.perf_counter()
    thresholds = thresholds or AlarmThresholds()
    src = resolve_source(source)
    data = Path(data_dir) if data_dir is not None else src.data_dir
    if data is None:
        raise AnalysisInputError(f"{source}: an export does not record its data; pass --data with a prepared dataset "
                                 "that has a test split.")
    check_probe_data(data)
    other = resolve_source(compare) if compare is not None else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cap = _capture(src, data, n_probe, seed, batch_size, max_feature_tokens, device)
    config = src.config
    rc = config.router_config()
    modalities = tuple(rc.modalities)
    layers, routing = [], []
    for lc in cap.layers:
        la, counts = _layer_analysis(cap, lc, modalities, n_perm, seed)
        layers.append(la)
        routing.append(counts)
    alarms = routing_alarms(routing, [lc.layer for lc in cap.layers], thresholds)
    compared = None
    if other is not None:
        compared = _compare(cap, _capture(other, data, n_probe, seed, batch_size, max_feature_tokens, device),
                            str(compare))
    n_tokens = {name: int((cap.modality_ids == i).sum()) for i, name in enumerate(modalities)}
    return Analysis(source=str(source), data_dir=str(data), mode=rc.mode, modalities=list(modalities),
                    num_experts=rc.num_experts, n_probe_samples=int(cap.sample_ids.max()) + 1,
                    n_probe_tokens=n_tokens, feature_tokens=cap.feature_tokens, layers=layers,
                    alarms=[a.to_dict() for a in alarms.alarms], thresholds=asdict(thresholds),
                    compare=compared, seconds=time.perf_counter() - tic,
                    settings={"n_probe": n_probe, "seed": seed, "batch_size": batch_size, "n_perm": n_perm,
                              "max_feature_tokens": max_feature_tokens,
                              "modality_embedding": config.modality_embedding})


def write_report(a: Analysis, out_dir) -> list:
    """analysis.json, analysis.md and the PNGs in `out_dir` (each written atomically).

    Returns:
        the paths written.
    """
    from .report import write_analysis_report

    return write_analysis_report(a, Path(out_dir))


def load_analysis_json(path) -> dict:
    """An analysis.json back as a dict."""
    return json.loads(Path(path).read_text())
