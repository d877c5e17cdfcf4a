"""Held-out evaluation during training: caption loss, text perplexity, zero-shot caption ranking.

Every rank runs the same number of forward passes (expert parallelism all-to-alls inside each
MoE layer need all ranks in step); results are summed over ranks. Routing statistics of the
evaluation passes feed the routing report.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .data_glue import make_eval_loader, ranking_set
from .moe.router import RoutingStats
from .report import write_routing_report


class Evaluator:
    def __init__(self, trainer, images_per_forward: int = 4):
        self.trainer = trainer
        self.images_per_forward = images_per_forward
        self.stats: list[RoutingStats] | None = None
        data = trainer.recipe.data
        n_per_rank = data.ranking_images // trainer.world_size
        self.ranking = ranking_set(data, trainer.processor, n_per_rank * trainer.world_size)
        lo = trainer.rank * n_per_rank
        self.rank_slice = slice(lo, lo + n_per_rank)

    def _mean_loss(self, kind: str) -> tuple[float, float]:
        """(sum of text CE over labelled tokens, number of labelled tokens) on this rank."""
        t = self.trainer
        loader = make_eval_loader(t.recipe.data, t.processor, kind, t.rank, t.world_size, t.recipe.train.seed)
        total, count = 0.0, 0.0
        for _, batch in zip(range(t.recipe.data.eval_batches), loader):
            batch = t.to_device(batch)
            out = t.engine(**batch)
            n = float((batch["labels"][:, 1:] != -100).sum())
            total += out.text_loss.item() * n
            count += n
            self._add_stats(out.routing_stats)
        return total, count

    def _add_stats(self, stats: list[RoutingStats]) -> None:
        self.stats = stats if self.stats is None else [RoutingStats.merge([a, b]) for a, b in zip(self.stats, stats)]

    def _ranking_correct(self) -> tuple[float, float]:
        """Score every class caption for each image; correct if the true class scores highest."""
        t = self.trainer
        images, labels, captions = self.ranking
        images, labels = images[self.rank_slice], labels[self.rank_slice]
        correct = 0
        model = t.engine.module
        for start in range(0, len(labels), self.images_per_forward):
            chunk = images[start:start + self.images_per_forward]
            batch = t.processor(images=[im for im in chunk for _ in captions], texts=list(captions) * len(chunk))
            batch = t.to_device(batch)
            scores = model.caption_scores(batch["input_ids"], batch["pixel_patches"], batch["attention_mask"],
                                          batch["labels"]).view(len(chunk), len(captions))
            correct += int((scores.argmax(-1).cpu() == torch.as_tensor(labels[start:start + len(chunk)])).sum())
        return float(correct), float(len(labels))

    @torch.no_grad()
    def run(self, step: int) -> dict:
        t = self.trainer
        t.engine.eval()
        self.stats = None
        sums = [*self._mean_loss("image_text"), *self._mean_loss("text"), *self._ranking_correct()]
        totals = torch.tensor(sums, dtype=torch.float64, device=t.device)
        t.dist.all_reduce(totals)
        for s in self.stats:  # sum counts over ranks; entropy as a token-weighted mean
            entropy_sum = s.entropy * s.tokens
            for tensor in (s.tokens, s.routed, s.kept, entropy_sum):
                t.dist.all_reduce(tensor)
            s.entropy = entropy_sum / s.tokens.clamp(min=1)
        t.engine.train()
        cap_sum, cap_n, txt_sum, txt_n, correct, n = totals.tolist()
        return {"caption_loss": cap_sum / max(cap_n, 1), "text_ppl": math.exp(min(txt_sum / max(txt_n, 1), 50)),
                "caption_rank_acc": correct / max(n, 1), "caption_rank_chance": 1.0 / len(self.ranking[2])}

    def write_report(self, out_dir: Path):
        t = self.trainer
        if t.rank != 0 or self.stats is None:
            return []
        moe_layers = [i for i in range(t.model_config.num_hidden_layers) if t.model_config.is_moe_layer(i)]
        mode = t.model_config.router_config().mode
        return list(write_routing_report(self.stats, moe_layers, t.model_config.router_config().modalities, out_dir,
                                         title=f"{mode}, {Path(t.recipe.path).name}"))
