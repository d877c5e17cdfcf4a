"""Held-out evaluation during training, adapted to what the prepared data serves (`EvalPlan`):

- `caption_loss`: mean caption cross-entropy on validation image+text pairs;
- `text_ppl`: perplexity on validation text-only samples (only when the data has them);
- `retrieval_r1`, `retrieval_r5` (over `retrieval_candidates` captions, `retrieval_queries` images):
  zero-shot image->text retrieval among the test split's own captions, for any image-caption data.
  N test pairs with distinct captions; each image ranks all N captions by the caption's
  log-likelihood given the image (`caption_scores`); a hit at k when its own caption is among
  the k best (ties count against it);
- `caption_rank_acc` (+ `caption_rank_chance`): zero-shot class ranking of labelled test images
  among their classes' captions, only for the labelled embedded sources.

Evaluation runs in three phases so that a failure does not leave ranks out of step (the trainer
drives them, see `Trainer.evaluate`): `prepare` (local: reads data, encodes every batch), `forward`
(every rank the same number of forward passes, because expert parallelism's all-to-alls need
all ranks in step; returns this rank's sums as a fixed-length list), `finish` (sums over ranks
-> metrics; routing statistics of the passes feed the routing report). Everything that can fail
on one rank alone (data, decoding, encoding) happens in `prepare`; a rank failing inside a forward
pass (e.g. out of memory) leaves the others waiting in its all-to-all until the collective times
out, which is why the trainer writes a step's checkpoint before evaluating it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config.recipe import DataSection
from ..data.captions import class_captions
from ..moe.router import RoutingStats
from .data_plan import EvalPlan, make_eval_loader, sample_test_set
from .routing_report import write_routing_report

SUM_NAMES = ("caption_sum", "caption_tokens", "text_sum", "text_tokens", "retrieval_r1", "retrieval_r5",
             "retrieval_queries", "rank_correct", "rank_images")
ScoreFn = Callable[[Sequence, Sequence[str]], torch.Tensor]  # (images, captions) -> [images, captions] scores


def ranks_of_truth(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[Q] rank (1 = best) of each query's true candidate among scores [Q, N]; ties count against it."""
    true = scores.gather(1, targets.long()[:, None])
    return (scores >= true).sum(1)


def retrieval_hits(score_fn: ScoreFn, images: Sequence, targets: Sequence[int], candidates: Sequence[str],
                   ks: Sequence[int] = (1, 5), images_per_forward: int = 4) -> list[int]:
    """How many of `images` rank their true candidate (`targets[i]` indexes `candidates`) within
    the top k, for each k; `score_fn` is called on chunks of `images_per_forward` images."""
    hits = [0] * len(ks)
    for start in range(0, len(images), images_per_forward):
        chunk = list(images[start:start + images_per_forward])
        scores = score_fn(chunk, list(candidates)).float().cpu()
        ranks = ranks_of_truth(scores, torch.as_tensor(list(targets[start:start + len(chunk)])))
        for i, k in enumerate(ks):
            hits[i] += int((ranks <= k).sum())
    return hits


@dataclass
class ScoringSet:
    """Query images, the index of each one's true candidate, and the candidate captions."""
    images: list
    targets: list[int]
    candidates: list[str]

    def rank_slice(self, rank: int, world_size: int) -> "ScoringSet":
        """Rank's equal share of the queries (the remainder is left out: equal forwards on every rank)."""
        n = len(self.images) // world_size
        lo = rank * n
        return ScoringSet(self.images[lo:lo + n], self.targets[lo:lo + n], self.candidates)


def retrieval_set(data_dir: str, n: int, seed: int) -> ScoringSet:
    """n test image+caption pairs with distinct captions, spread over the test split: image i's
    true candidate is caption i."""
    samples = sample_test_set(data_dir, n, seed, distinct_captions=True)
    return ScoringSet([s.image for s in samples], list(range(len(samples))), [s.caption for s in samples])


def class_rank_set(data_dir: str, source: str, n: int, seed: int) -> ScoringSet:
    """n labelled test images of `source`; candidates are its classes' canonical captions."""
    samples = [s for s in sample_test_set(data_dir, n, seed, source=source) if isinstance(s.label, int)]
    return ScoringSet([s.image for s in samples], [s.label for s in samples], class_captions(source))


def model_inputs(batch: dict, device) -> dict:
    """The model's inputs of a loader batch on `device` (image patches, or pixel values for a vision tower)."""
    keep = ("input_ids", "attention_mask", "labels", "modality_ids", "pixel_patches", "pixel_values")
    return {k: batch[k].to(device) for k in keep if k in batch}


class Evaluator:
    """This rank's share of the held-out evaluation of a model under an `EvalPlan`.

    Args:
        model: what runs the forward passes: the DeepSpeed engine (its `.module` scores captions) or
            an `MmoeForCausalLM`.
        processor: the run's `MmoeProcessor` (encodes the scoring pairs, collates them).
        data: the recipe's data section (where the held-out splits are, how much to evaluate).
        plan: what the data serves (`check_data(...).plan`).
        seed: the run's seed (`train.seed`): the same held-out samples at every evaluation.
        rank, world_size: this process's share of the queries and batches.
        dist: sums the routing statistics over ranks in `finish` (`torch.distributed`); None in a
            single process.
        device: where batches go (the engine's device).
        run_name: the routing report's title after the router mode (the recipe's file name).
        log: where notes go (rank 0's log); by default nowhere.
        images_per_forward: query images scored per forward pass.
    """

    num_sums = len(SUM_NAMES)  # length of what `forward` returns

    def __init__(self, model, processor, data: DataSection, plan: EvalPlan, *, seed: int, rank: int = 0,
                 world_size: int = 1, dist=None, device: torch.device | str = "cpu", run_name: str = "",
                 log: Callable[[str], None] | None = None, images_per_forward: int = 4):
        self.model, self.processor, self.data, self.plan, self.seed = model, processor, data, plan, seed
        self.rank, self.world_size, self.dist, self.device = rank, world_size, dist, torch.device(device)
        self.run_name, self.log, self.images_per_forward = run_name, log or (lambda message: None), images_per_forward
        self.stats: list[RoutingStats] | None = None  # of the evaluation in progress
        self.report_stats: list[RoutingStats] | None = None  # of the last completed one
        self.retrieval: ScoringSet | None = None  # this rank's share
        self.ranking: ScoringSet | None = None
        self.encoded: dict[str, list[list[dict]]] = {}  # "retrieval"/"ranking": per query, each candidate encoded
        self.batches: dict[str, list[dict]] = {}
        self._built = False
        self._verified: set[str] = set()  # kinds whose validation shards passed the sha256 check

    @property
    def module(self):
        """The model itself (the engine's `.module`)."""
        return getattr(self.model, "module", self.model)

    # -- phase 1: local --------------------------------------------------------------------------
    def _build_sets(self) -> None:
        data = self.data
        if self.plan.retrieval:
            full = retrieval_set(data.dir, data.retrieval_candidates, self.seed)
            self.retrieval = full.rank_slice(self.rank, self.world_size)
            if not self.retrieval.images:
                self.log(f"retrieval left out: only {len(full.candidates)} distinct test captions for "
                         f"{self.world_size} processes")
                self.retrieval = None
        if self.plan.class_rank_source is not None:
            per_rank = data.ranking_images // self.world_size
            full = class_rank_set(data.dir, self.plan.class_rank_source, per_rank * self.world_size, self.seed)
            self.ranking = full.rank_slice(self.rank, self.world_size)
        for name, scoring in (("retrieval", self.retrieval), ("ranking", self.ranking)):
            if scoring is not None:  # encoded here, so that the forward phase has nothing left to fail on
                self.encoded[name] = [self._encode_pairs(image, scoring.candidates) for image in scoring.images]
        self._built = True

    def _encode_pairs(self, image, captions: Sequence[str]) -> list[dict]:
        """The image paired with every caption; the pairs share one patch array (memory: one per image)."""
        pairs = [self.processor.encode(image, caption) for caption in captions]
        for pair in pairs[1:]:
            pair["patches"] = pairs[0]["patches"]
        return pairs

    def prepare(self, step: int) -> None:
        """Read this evaluation's data (no collectives): scoring sets once, loss batches each time."""
        if not self._built:
            self._build_sets()
        self.batches = {}
        for on, kind in ((self.plan.caption_loss, "image_text"), (self.plan.text_ppl, "text")):
            if on:
                loader = make_eval_loader(self.data, self.processor, kind, self.rank, self.world_size, self.seed,
                                          verify=kind not in self._verified)
                self._verified.add(kind)
                self.batches[kind] = [batch for _, batch in zip(range(self.data.eval_batches), loader)]

    # -- phase 2: forward passes (the same number on every rank) --------------------------------------
    def _add_stats(self, stats: list[RoutingStats]) -> None:
        self.stats = stats if self.stats is None else [RoutingStats.merge([a, b]) for a, b in zip(self.stats, stats)]

    def _loss_sums(self, kind: str) -> tuple[float, float]:
        """(sum of text CE over labelled tokens, number of labelled tokens) on this rank."""
        total, count = 0.0, 0.0
        for batch in self.batches.get(kind, []):
            batch = model_inputs(batch, self.device)
            out = self.model(**batch)
            n = float((batch["labels"][:, 1:] != -100).sum())
            total += out.text_loss.item() * n
            count += n
            self._add_stats(out.routing_stats)
        return total, count

    def score(self, queries: Sequence[list[dict]], captions: Sequence[str]) -> torch.Tensor:
        """[queries, captions] log-likelihood of each caption given each query image (queries:
        per image, its pairing with every caption, encoded by the processor in `prepare`)."""
        batch = model_inputs(self.processor.collate([pair for pairs in queries for pair in pairs]), self.device)
        scores = self.module.caption_scores(batch["input_ids"], batch.get("pixel_patches"), batch["attention_mask"],
                                            batch["labels"], pixel_values=batch.get("pixel_values"))
        return scores.view(len(queries), len(captions))

    @torch.no_grad()
    def forward(self, step: int) -> list[float]:
        """This rank's sums, in SUM_NAMES order."""
        self.model.eval()
        self.stats = None
        try:
            sums = [*self._loss_sums("image_text"), *self._loss_sums("text")]
            r = self.retrieval
            sums += ([*retrieval_hits(self.score, self.encoded["retrieval"], r.targets, r.candidates, (1, 5),
                                      self.images_per_forward), float(len(r.images))]
                     if r is not None else [0.0, 0.0, 0.0])
            c = self.ranking
            sums += ([*retrieval_hits(self.score, self.encoded["ranking"], c.targets, c.candidates, (1,),
                                      self.images_per_forward), float(len(c.images))]
                     if c is not None else [0.0, 0.0])
        finally:
            self.model.train()
        return [float(v) for v in sums]

    # -- phase 3: over ranks -----------------------------------------------------------------------
    def finish(self, totals: Sequence[float]) -> dict:
        """Metrics from the sums over ranks (collective: routing statistics are summed too)."""
        if self.stats is not None:  # counts summed over ranks; entropy as a token-weighted mean
            self.report_stats = self.stats if self.dist is None else \
                RoutingStats.sum_over_ranks(self.stats, self.dist.all_reduce)
        v = dict(zip(SUM_NAMES, totals))
        metrics = {}
        if self.plan.caption_loss:
            metrics["caption_loss"] = v["caption_sum"] / max(v["caption_tokens"], 1)
        if self.plan.text_ppl:
            metrics["text_ppl"] = math.exp(min(v["text_sum"] / max(v["text_tokens"], 1), 50))
        if self.retrieval is not None:
            metrics.update(retrieval_r1=v["retrieval_r1"] / v["retrieval_queries"],
                           retrieval_r5=v["retrieval_r5"] / v["retrieval_queries"],
                           retrieval_candidates=len(self.retrieval.candidates),
                           retrieval_queries=int(v["retrieval_queries"]))
        if self.ranking is not None and v["rank_images"] > 0:
            metrics.update(caption_rank_acc=v["rank_correct"] / v["rank_images"],
                           caption_rank_chance=1.0 / len(self.ranking.candidates))
        return metrics

    def write_report(self, out_dir: Path) -> list[Path]:
        """Rank 0: the routing report of the last completed evaluation (PNG + markdown); [] elsewhere."""
        if self.rank != 0 or self.report_stats is None:
            return []
        config = self.module.config
        moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
        router = config.router_config()
        return list(write_routing_report(self.report_stats, moe_layers, router.modalities, out_dir,
                                         title=f"{router.mode}, {self.run_name}"))
