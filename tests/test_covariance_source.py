"""`--source covariance` (issue 17, item 5): counts, determinism, the designed pixel moments, and what a
model at init sees: equal means and equal total variance of the two modalities' embedded tokens, a
linear probe near chance and a quadratic probe (Gaussian QDA) far above it."""
import json
import math

import numpy as np
import pytest
import torch

from mmoe_ds.data import prepare as prepare_mod
from mmoe_ds.data.captions import class_captions
from mmoe_ds.data.processor import MmoeProcessor
from mmoe_ds.data.sources import PrepareReport, SourceError
from mmoe_ds.data.sources.covariance import (
    CLASSES,
    ORIENTATIONS,
    SCALES,
    SMALL,
    CovarianceSource,
    amplitude,
    lexicon,
    texture,
)
from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
from mmoe_ds.training.data_plan import class_rank_source


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("cov") / "data"
    argv = ["--source", "covariance", "--small", "--channels", "3", "--patch-size", "7", "--max-length", "48",
            "--out", str(out)]
    assert prepare_mod.main(argv) == 0
    return out


def test_prepare_small_counts_classes_and_build_facts(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    for kind, key in (("image_text", "pairs"), ("text", "texts"), ("image", "images")):
        n = SMALL[key]  # split_by_index: 80/10/10 by index
        assert [m["counts"][s][kind] for s in ("train", "validation", "test")] == [n * 8 // 10, n // 10, n // 10]
    assert m["build"]["covariance"]["pixel_std"] == pytest.approx(255 / (2 * math.sqrt(147)))
    assert m["report"] == {"skipped": {}, "changed": {}}
    assert class_rank_source(m) == "covariance"  # labelled: zero-shot class ranking scores it
    assert class_captions("covariance")[0] == "a coarse horizontal"
    assert CLASSES == [f"{s} {o}" for s in SCALES for o in ORIENTATIONS]  # label -> (scale, orientation) of band_filter


def _image_bytes(record) -> bytes:
    return record.image.tobytes() if record.image is not None else b""


def test_deterministic_by_seed_and_prefix_stable():
    def build(seed, pairs):
        return list(CovarianceSource(pairs=pairs, texts=4, images=3, seed=seed).records(PrepareReport()))
    a, b, c, short = build(0, 20), build(0, 20), build(1, 20), build(0, 10)
    def facts(records):
        return [(r.key, r.text, r.label, _image_bytes(r)) for r in records]
    assert facts(a) == facts(b)
    assert [_image_bytes(r) for r in a if r.image] != [_image_bytes(r) for r in c if r.image]
    assert [r.text for r in a if r.kind == "image_text"][:10] == [r.text for r in short if r.kind == "image_text"]
    assert [r.kind for r in a].count("text") == 4 and all(r.label is None for r in a if r.kind == "text")
    words = set(lexicon())
    assert len(words) == 1024 and all(w in words for r in a if r.kind == "text" for w in r.text.split())
    caption = next(r for r in a if r.kind == "image_text")
    assert caption.text.startswith(class_captions("covariance")[caption.label] + " ")


def test_bad_options_are_one_line_source_errors():
    for kwargs, field in (({"pairs": 5}, "pairs=5"), ({"noise_share": 1.5}, "noise_share"),
                          ({"image_size": 28, "patch_size": 5}, "--patch-size 5"), ({"texts": -1}, "texts")):
        with pytest.raises(SourceError, match=field):
            CovarianceSource(**kwargs)


def _lag_corr(x: np.ndarray, dy: int, dx: int) -> float:
    """Correlation of pixel pairs (y, x) and (y + dy, x + dx) over a stack [n, H, W] of centred images."""
    h, w = x.shape[1:]
    ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
    a, b = x[:, ys, xs], x[:, ys.start + dy:ys.stop + dy, xs.start + dx:xs.stop + dx]
    return float((a * b).mean() / x.var())


def test_pixels_are_symmetric_about_the_middle_with_the_designed_covariance_shape():
    rng = np.random.default_rng(0)
    std = amplitude(3, 7)
    stats = {}
    for label in range(8):
        stack = np.stack([np.asarray(texture(rng, 28, 3, label, std, 0.5), dtype=np.float64) for _ in range(60)])
        v = stack - 127.5
        assert abs(v.mean()) < 0.05 * std and v.std() == pytest.approx(std, rel=0.05)
        assert abs((v ** 3).mean()) / std ** 3 < 0.05  # no skew: symmetric about 127.5
        gray = v.mean(-1)  # the class field is shared by the channels, the white floor is not
        stats[CLASSES[label]] = {"along_x": _lag_corr(gray, 0, 1), "along_y": _lag_corr(gray, 1, 0),
                                 "diag": _lag_corr(gray, 1, 1), "anti": _lag_corr(gray, 1, -1)}
    for scale in ("coarse", "fine"):
        h, v_, d, a = (stats[f"{scale} {o}"] for o in ORIENTATIONS)
        assert h["along_x"] > h["along_y"] + 0.2 and v_["along_y"] > v_["along_x"] + 0.2  # stripes: flat along them
        assert a["diag"] > a["anti"] + 0.2 and d["anti"] > d["diag"] + 0.2
    assert stats["fine horizontal"]["along_y"] < stats["coarse horizontal"]["along_y"] - 0.2  # shorter period


def _balanced(x: torch.Tensor, m: torch.Tensor, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    parts = [x[m == k][torch.randperm(int((m == k).sum()), generator=g)[:n]] for k in (0, 1)]
    return parts


def _probe_accuracies(x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, float]:
    """Held-out accuracy (half train, half test, balanced) of a logistic-regression probe with a bias and
    of Gaussian QDA, on standardised features."""
    n = len(x0) // 2
    xtr, xte = torch.cat([x0[:n], x1[:n]]), torch.cat([x0[n:], x1[n:]])
    ytr, yte = torch.arange(2 * n) >= n, torch.arange(len(xte)) >= len(x0) - n
    mu, sd = xtr.mean(0), xtr.std(0)
    ztr, zte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(ztr.shape[1] + 1, dtype=ztr.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ztr @ w[:-1] + w[-1], ytr.to(ztr.dtype))
        loss.backward()
        return loss
    opt.step(closure)
    linear = float(((zte @ w[:-1] + w[-1] > 0) == yte).double().mean())
    dists = []
    for k in (0, 1):
        z = ztr[ytr == bool(k)]
        cov = torch.cov(z.T)
        ridge = 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
        dists.append(torch.distributions.MultivariateNormal(z.mean(0), cov + ridge))
    qda = float(((dists[1].log_prob(zte) > dists[0].log_prob(zte)) == yte).double().mean())
    return linear, qda


def test_a_model_at_init_sees_equal_means_equal_variance_and_no_linear_modality_signal(prepared):
    """Modality embedding off, rotary positions: the embedded tokens (what layer 0 starts from)."""
    processor = MmoeProcessor.from_pretrained(prepared / "processor")
    records = [r for r in CovarianceSource(pairs=160, texts=0, images=0).records(PrepareReport())]
    batch = processor.collate([processor.encode(r.image, r.text) for r in records])
    torch.manual_seed(0)
    cfg = MmoeConfig(vocab_size=len(processor.tokenizer), hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, moe_intermediate_size=64, num_local_experts=2, moe_layers=[0],
                     image_size=28, patch_size=7, num_channels=3, modality_embedding=False,
                     position_embedding_type="rope", image_token_id=processor.image_token_id)
    model = MmoeForCausalLM(cfg).eval()
    with torch.no_grad():
        h = model.model.embed(batch["input_ids"], batch["pixel_patches"], batch["modality_ids"]).double()
    keep = batch["attention_mask"].bool()
    x, m, ids = h[keep], batch["modality_ids"][keep], batch["input_ids"][keep]
    img, txt = _balanced(x, m, 2400)
    # first moments: images exactly centred (symmetric patches, zero patch bias); text mean ~ sqrt(1/K_eff)
    freq = torch.bincount(ids[m == 1]).double()
    k_eff = float(freq.sum() ** 2 / (freq ** 2).sum())
    scale = 0.02 * math.sqrt(128)  # E|E_t| = initializer_range·sqrt(d)
    assert k_eff > 150 and float(img.mean(0).norm()) < 0.15 * scale and float(txt.mean(0).norm()) < 0.25 * scale
    # second moments: equal total variance, different shape (image variance on few directions)
    assert float(img.var(0).sum()) == pytest.approx(float(txt.var(0).sum()), rel=0.1)
    rank = [float(torch.cov(z.T).trace() ** 2 / (torch.cov(z.T) ** 2).sum()) for z in (img, txt)]  # effective rank
    assert rank[0] < 0.6 * rank[1]  # measured 34 vs 83 of 128
    linear, qda = _probe_accuracies(img, txt)
    assert linear < 0.65 and qda > 0.95, (linear, qda)  # measured 0.61 and 1.00
