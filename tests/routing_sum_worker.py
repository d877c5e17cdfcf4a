"""Started by tests/test_routing_stats_ranks.py through the `deepspeed` launcher on 2 CPU processes.

Trains with the real trainer (`build_trainer`, `Trainer.train`: DeepSpeed engine, gloo) on batches
whose modality mix differs by rank: rank 0 reads mostly image+text pairs, rank 1 mostly text
(each rank needs some image: a parameter without a gradient on one rank breaks ZeRO's gradient
buckets), both right-padded to the recipe's max_length. Meanwhile it counts by hand, from every MoE layer's
routing of every training micro-batch and that batch's own attention mask and modality ids: the
real tokens per modality, the routes chosen per (modality, expert) (top-k of the logits with the
token's k), the routes kept (expert index >= 0), and the summed routing entropy. Plain loops: no
code of the router's statistics. Each rank writes its counts to OUT/hand_rank{rank}.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from routing_by_hand import count_real_routes

from mmoe_ds.data.loader import BalancedLoader, LoaderConfig
from mmoe_ds.training.checks import load_and_validate
from mmoe_ds.training.teardown import exit_process
from mmoe_ds.training.trainer import build_trainer

# Same batch size on both ranks (DeepSpeed's micro batch), different modality mixes.
COMPOSITION = ({"image_text": 3, "text": 1}, {"text": 3, "image": 1})


class RecordingLoader:
    """A rank's loader that keeps each batch's attention mask and modality ids, in order."""

    def __init__(self, loader: BalancedLoader):
        self.loader, self.batches = loader, []

    def __iter__(self):
        for batch in self.loader:
            mask, ids = batch["attention_mask"].reshape(-1).tolist(), batch["modality_ids"].reshape(-1).tolist()
            self.batches.append((mask, ids))
            yield batch

    def skip_log(self):
        return self.loader.skip_log()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher passes it
    args = parser.parse_args()
    args.world_size, args.check = None, False
    recipe, ds_config, world_size, _ = load_and_validate(args)
    trainer = build_trainer(recipe, ds_config, world_size)
    rank = trainer.rank
    d = recipe.data
    loader = RecordingLoader(BalancedLoader(LoaderConfig(d.dir, "train", COMPOSITION[rank], seed=recipe.train.seed,
                                                         rank=rank, world_size=world_size, max_length=d.max_length)))
    trainer.loader = loader
    model = trainer.engine.module
    routings: dict[int, list] = {}
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            routings[i] = []
            layer.ffn.register_forward_hook(lambda module, inputs, output, i=i: routings[i].append(output.routing))
    trainer.train()
    micro_batches = recipe.train.steps * trainer.engine.gradient_accumulation_steps()
    assert len(loader.batches) == micro_batches, (len(loader.batches), micro_batches)
    cfg = trainer.model_config.router_config()
    layers = {}
    for i, calls in routings.items():  # call j of a layer routed micro-batch j
        for routing, (mask, ids) in zip(calls[:micro_batches], loader.batches):
            layers[i] = count_real_routes(routing, ids, mask, cfg.top_k_per_modality, cfg.num_experts, layers.get(i))
    hand = {"micro_batches": micro_batches, "positions": sum(len(mask) for mask, _ in loader.batches),
            "layers": layers}
    Path(args.out, f"hand_rank{rank}.json").write_text(json.dumps(hand))
    trainer.dist.barrier()


if __name__ == "__main__":
    main()
    exit_process(0)
