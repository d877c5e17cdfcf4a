"""Linear probe: can a linear function of the router's input tell the modality?

The cheapest test of whether an agnostic linear router *could* route by modality: multinomial
logistic regression (torch, full-batch L-BFGS, a small L2 penalty) on standardised features,
fitted on a training part and scored on held-out samples. Tokens of one sequence are correlated
(shared attention context, fixed positions), so the split is by `groups` (e.g. the probe sample
each token came from) when given: no sample has tokens on both sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ProbeResult:
    """Result of `linear_probe`."""
    accuracy: float           # held-out accuracy
    balanced_accuracy: float  # held-out mean of per-class recalls (chance: 1 / classes)
    chance: float             # held-out accuracy of always predicting the training majority class
    train_accuracy: float
    n_train: int
    n_test: int


def _split(n: int, groups: np.ndarray | None, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean test mask: a random `test_fraction` of the groups (or of the rows without groups)."""
    if groups is None:
        test = np.zeros(n, dtype=bool)
        test[rng.permutation(n)[:max(1, int(round(n * test_fraction)))]] = True
        return test
    unique = np.unique(groups)
    if unique.size < 2:
        raise ValueError("groups: at least 2 groups are needed to hold some out.")
    held = rng.permutation(unique)[:max(1, int(round(unique.size * test_fraction)))]
    return np.isin(groups, held)


def linear_probe(features, labels, groups=None, test_fraction: float = 0.3, seed: int = 0, l2: float = 1e-3,
                 max_iter: int = 200) -> ProbeResult:
    """Fit a linear classifier of `labels` from `features` and report its held-out accuracy.

    Args:
        features: [N, d] (numpy or torch).
        labels: [N] integer classes (e.g. modality ids); at least 2 classes.
        groups: [N] optional group of each row (e.g. sample index); whole groups go to one side.
        test_fraction: share of the rows (or groups) held out.
        seed: the split (the fit itself is deterministic).
        l2: weight decay on the (standardised) weights.
        max_iter: L-BFGS iterations.
    Returns:
        ProbeResult with held-out accuracy, balanced accuracy and the majority-class chance level.
    """
    x = torch.as_tensor(np.asarray(features.detach().cpu() if hasattr(features, "detach") else features),
                        dtype=torch.float64)
    y_np = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels).ravel()
    if x.ndim != 2 or x.shape[0] != y_np.size or y_np.size < 4:
        raise ValueError(f"features [N, d] and labels [N] with N >= 4 needed, got {tuple(x.shape)} and {y_np.shape}.")
    if not torch.isfinite(x).all():
        raise ValueError("features: contains NaN or inf.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: between 0 and 1, got {test_fraction}.")
    classes, y_idx = np.unique(y_np, return_inverse=True)
    if classes.size < 2:
        raise ValueError(f"labels: at least 2 classes are needed, got only {classes.tolist()}.")
    g = None if groups is None else np.asarray(groups).ravel()
    if g is not None and g.size != y_np.size:
        raise ValueError(f"groups: one per row needed, got {g.size} for {y_np.size} rows.")
    test = torch.from_numpy(_split(y_np.size, g, test_fraction, np.random.default_rng(seed)))
    if bool(test.all()) or not bool(test.any()):
        raise ValueError("the split left one side empty; give more rows or groups.")
    y = torch.from_numpy(y_idx.astype(np.int64))
    mean, std = x[~test].mean(0), x[~test].std(0).clamp(min=1e-8)
    z = (x - mean) / std
    C = classes.size
    w = torch.zeros(z.shape[1], C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    z_train, y_train = z[~test], y[~test]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z_train @ w + b, y_train) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (z @ w + b).argmax(1)
    correct = (pred == y)
    y_test = y[test]
    recalls = [float(correct[test][y_test == c].double().mean()) for c in range(C) if bool((y_test == c).any())]
    majority = int(torch.bincount(y_train, minlength=C).argmax())
    return ProbeResult(accuracy=float(correct[test].double().mean()), balanced_accuracy=float(np.mean(recalls)),
                       chance=float((y_test == majority).double().mean()),
                       train_accuracy=float(correct[~test].double().mean()),
                       n_train=int((~test).sum()), n_test=int(test.sum()))
