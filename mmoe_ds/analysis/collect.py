"""Run a model over the probe set and capture, per MoE layer, what the analysis needs.

Forward hooks on the model's MoE blocks (`TorchMoE`) read each block's input (the router input
x, after the FFN norm), its modality ids and its `Routing` (logits, kept routes); the router's own
`select` gives the choices before capacity. Padding positions are left out. Nothing in the model
is replaced or patched; the hooks are removed when the pass ends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ..moe.layer import TorchMoE

MODEL_INPUTS = ("input_ids", "attention_mask", "modality_ids", "pixel_patches", "pixel_values")


@dataclass
class LayerCapture:
    """One MoE layer over the probe tokens (all arrays have one row per non-padding token)."""
    layer: int                       # decoder layer index
    module: TorchMoE                 # the block (its router and experts)
    probs: np.ndarray                # [S, E] float32 router probabilities
    chosen: np.ndarray               # [S, K] int64 experts chosen before capacity, best first
    valid: np.ndarray                # [S, K] bool: within the token's own k
    kept: np.ndarray                 # [S, K] bool: reached its expert
    features: np.ndarray             # [F, d] float32 router inputs of the first F tokens (see ProbeCapture)


@dataclass
class ProbeCapture:
    """Result of `capture_routing`."""
    modality_ids: np.ndarray         # [S] int64
    sample_ids: np.ndarray           # [S] int64: the probe sample each token came from
    feature_tokens: int              # F: tokens 0..F-1 (whole samples) have router inputs in `features`
    layers: list[LayerCapture] = field(default_factory=list)


def moe_blocks(model) -> list[tuple[int, TorchMoE]]:
    """(decoder layer index, MoE block) of every MoE layer of an `MmoeForCausalLM` on the torch backend."""
    blocks = []
    for i, layer in enumerate(model.model.layers):
        if getattr(layer, "is_moe", False):
            if not isinstance(layer.ffn, TorchMoE):
                raise ValueError(f"layer {i}: MoE block {type(layer.ffn).__name__} is not the torch backend; load "
                                 "the model with moe_backend='torch' (export or gather it first).")
            blocks.append((i, layer.ffn))
    return blocks


class _Recorder:
    """Forward hook of one MoE block: keeps the last call's tensors until the collector takes them."""

    def __init__(self, block: TorchMoE):
        self.block, self.last = block, None

    def __call__(self, module, args, output) -> None:
        hidden, modality_ids = args[0], args[1]
        routing = output.routing
        gate = module.deepspeed_moe.gate
        ids = modality_ids.reshape(-1).long()
        probs = torch.softmax(routing.logits, dim=-1)
        picked = gate.select(routing.logits, probs, gate.routing_tables(probs.device)[1][ids])
        kept = routing.expert_index.t() >= 0  # [S, K]; -1 marks dropped and unused routes
        self.last = (hidden.reshape(-1, hidden.shape[-1]).detach().float().cpu(), probs.detach().float().cpu(),
                     picked.chosen.cpu(), picked.valid.cpu(), kept.cpu())


@torch.no_grad()
def capture_routing(model, batches: Iterable[dict], max_feature_tokens: int = 16384) -> ProbeCapture:
    """Forward every batch through `model` (eval mode, no cache) and record each MoE layer.

    Args:
        model: an `MmoeForCausalLM` with torch MoE blocks.
        batches: processor batches (dicts of tensors; the model inputs among them are used).
        max_feature_tokens: router inputs are kept for whole samples until this many tokens (the
            probe and CKA work on them); counts and probabilities cover every token.
    Returns:
        ProbeCapture (numpy arrays on the CPU).
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("the model has no MoE layer (moe_layer_frequency leaves none); nothing to analyze.")
    device = next(model.parameters()).device
    recorders = [_Recorder(block) for _, block in blocks]
    handles = [block.register_forward_hook(r) for (_, block), r in zip(blocks, recorders)]
    was_training = model.training
    model.eval()
    parts: list[list[tuple]] = [[] for _ in blocks]
    modality, samples, feature_tokens, sample_base, taking = [], [], 0, 0, True
    try:
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
            model(**inputs, use_cache=False)
            mask = batch["attention_mask"].reshape(-1).bool()
            B, L = batch["attention_mask"].shape
            ids = batch["modality_ids"].reshape(-1)[mask]
            sid = (torch.arange(B)[:, None].expand(B, L).reshape(-1) + sample_base)[mask]
            lengths = batch["attention_mask"].sum(1).tolist()
            keep_samples = 0  # whole samples of this batch whose router inputs are kept
            if taking:
                for n in lengths:
                    if feature_tokens + n > max_feature_tokens:
                        taking = False
                        break
                    feature_tokens += n
                    keep_samples += 1
            keep_rows = int(sum(lengths[:keep_samples]))
            for part, rec in zip(parts, recorders):
                hidden, probs, chosen, valid, kept = rec.last
                part.append((hidden[mask][:keep_rows], probs[mask], chosen[mask], valid[mask], kept[mask]))
                rec.last = None
            modality.append(ids)
            samples.append(sid)
            sample_base += B
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not modality:
        raise ValueError("the probe set is empty: no batches to analyze.")
    capture = ProbeCapture(torch.cat(modality).numpy().astype(np.int64), torch.cat(samples).numpy().astype(np.int64),
                           feature_tokens)
    for (layer, block), part in zip(blocks, parts):
        hidden, probs, chosen, valid, kept = (torch.cat(list(x)) for x in zip(*part))
        capture.layers.append(LayerCapture(layer, block, probs.numpy(), chosen.numpy().astype(np.int64),
                                           valid.numpy(), kept.numpy(), hidden.numpy()))
    return capture


@torch.no_grad()
def expert_outputs(block: TorchMoE, features: np.ndarray, chunk: int = 4096) -> list[torch.Tensor]:
    """Every expert of `block` run on the same router inputs: E tensors [F, d] (float32, on the block's device).

    Each call gives the experts module (w13 / w2 of all experts) the chunk's tokens once per expert,
    sorted by expert, through its sorted contract: a module call, so hooks, offload and PEFT
    parametrizations of the 3-D weights act as in the model's forward.

    Args:
        block: a torch MoE block.
        features: [F, d] router inputs (e.g. `LayerCapture.features`).
        chunk: rows per experts call (memory): chunk // E tokens, each run by all E experts.
    """
    experts = block.deepspeed_moe.experts
    E = block.num_experts
    param = next(block.parameters())
    x = torch.from_numpy(np.ascontiguousarray(features))
    step = max(1, chunk // E)
    parts: list[list[torch.Tensor]] = [[] for _ in range(E)]
    for i in range(0, x.shape[0], step):
        rows = x[i:i + step].to(param.device, param.dtype)
        counts = torch.full((E,), rows.shape[0], dtype=torch.long, device=param.device)
        y = experts(rows.repeat(E, 1), counts).float()  # expert-major: rows of expert e are y[e*n:(e+1)*n]
        for e, ys in enumerate(y.split(rows.shape[0])):
            parts[e].append(ys)
    return [torch.cat(p) if p else torch.zeros(0, features.shape[1], device=param.device) for p in parts]
