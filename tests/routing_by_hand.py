"""Routing statistics counted by hand, with plain loops and no code of the router's statistics:
the reference of tests/test_routing_stats.py and tests/routing_sum_worker.py."""
from __future__ import annotations

import math


def count_real_routes(routing, modality_ids: list[int], mask: list[int], top_k: tuple[int, ...],
                      num_experts: int, into: dict | None = None) -> dict:
    """Add one call's counts over the positions where `mask` is nonzero to `into` (new if None).

    Args:
        routing: the call's `Routing` (logits [S, E], expert_index [K, S], -1 where no expert).
        modality_ids, mask: per position, flattened like the call's tokens.
        top_k: routes per token of each modality.
        num_experts: E.
    Returns:
        {"tokens": [M], "routed": [M][E] (top-k of the logits, the token's own k), "kept": [M][E]
        (expert index >= 0), "entropy_sum": [M] (nats, summed over the tokens)}.
    """
    M = len(top_k)
    counts = into or {"tokens": [0] * M, "routed": [[0] * num_experts for _ in range(M)],
                      "kept": [[0] * num_experts for _ in range(M)], "entropy_sum": [0.0] * M}
    logits, index = routing.logits.tolist(), routing.expert_index.tolist()
    assert len(logits) == len(mask) == len(modality_ids)
    for s, (real, m) in enumerate(zip(mask, modality_ids)):
        if not real:
            continue
        counts["tokens"][m] += 1
        row = logits[s]
        for e in sorted(range(num_experts), key=lambda e: -row[e])[: top_k[m]]:
            counts["routed"][m][e] += 1
        for route in index:
            if route[s] >= 0:
                counts["kept"][m][route[s]] += 1
        top = max(row)
        weights = [math.exp(v - top) for v in row]
        total = sum(weights)
        counts["entropy_sum"][m] -= sum(w / total * math.log(w / total) for w in weights if w > 0)
    return counts
