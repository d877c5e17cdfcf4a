"""Evaluation pieces without DeepSpeed: the retrieval metric against hand-computed recalls (a
fixed scorer stands in for the model), equal per-rank shares, and what evaluation plans on a
dataset's manifest (hand-written counts)."""
from __future__ import annotations

import json

import pytest
import torch

from mmoe_ds.config.recipe import DataSection
from mmoe_ds.training.data_plan import check_data
from mmoe_ds.training.evaluate import ScoringSet, ranks_of_truth, retrieval_hits

# Query i's true candidate is caption i. Hand-computed ranks (1 = best, ties count against):
# q0: 0.9 is the highest -> 1; q1: 0.5 < 0.6, 0.7 -> 3; q2: 0.1 below all five others -> 6;
# q3: 0.4 tied with one other -> 2; q4: 0.3 below four others -> 5; q5: 0.8 the highest -> 1.
SCORES = [[0.9, 0.1, 0.2, 0.3, 0.4, 0.5],
          [0.6, 0.5, 0.7, 0.1, 0.2, 0.3],
          [0.2, 0.3, 0.1, 0.4, 0.5, 0.6],
          [0.1, 0.4, 0.2, 0.4, 0.3, 0.0],
          [0.5, 0.6, 0.7, 0.8, 0.3, 0.2],
          [0.1, 0.2, 0.3, 0.4, 0.5, 0.8]]
CAPTIONS = [f"caption {i}" for i in range(6)]


class FixedScorer:
    """Scores query ids against the candidates from SCORES; records the chunks it was given."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, queries, captions):
        assert list(captions) == CAPTIONS
        self.calls.append(list(queries))
        return torch.tensor([SCORES[q] for q in queries])


def test_ranks_ties_count_against_the_truth():
    ranks = ranks_of_truth(torch.tensor(SCORES), torch.arange(6))
    assert ranks.tolist() == [1, 3, 6, 2, 5, 1]


def test_retrieval_recall_at_1_and_5_hand_computed():
    scorer = FixedScorer()
    hits = retrieval_hits(scorer, list(range(6)), list(range(6)), CAPTIONS, ks=(1, 5), images_per_forward=4)
    assert hits == [2, 5]  # recall@1 = 2/6 (q0, q5); recall@5 = 5/6 (all but q2)
    assert scorer.calls == [[0, 1, 2, 3], [4, 5]]


def test_retrieval_with_other_targets_and_a_subset_of_queries():
    # q4 and q2 asking for other captions: q4's target 3 (0.8, the highest) -> rank 1;
    # q2's target 0 (0.2; above only 0.1) -> rank 5.
    hits = retrieval_hits(FixedScorer(), [4, 2], [3, 0], CAPTIONS, ks=(1, 4, 5), images_per_forward=1)
    assert hits == [1, 1, 2]


def test_rank_shares_are_equal_and_disjoint():
    full = ScoringSet(list("abcdefg"), list(range(7)), CAPTIONS)
    shares = [full.rank_slice(r, 2) for r in range(2)]
    assert [s.images for s in shares] == [["a", "b", "c"], ["d", "e", "f"]]  # "g" left out: equal forwards
    assert [s.targets for s in shares] == [[0, 1, 2], [3, 4, 5]]
    assert all(s.candidates == CAPTIONS for s in shares)


def _dataset(tmp_path, counts: dict, sources=("folder",)) -> str:
    """A manifest listing one shard per (split, kind) with the given sample counts (no shard files:
    the check reads the manifest only)."""
    shards = {}
    for (split, kind), n in counts.items():
        for source in sources:
            shards[f"{split}/{source}-{kind}-000000.tar"] = {"split": split, "source": source, "kind": kind,
                                                              "samples": n}
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": shards, "sources": list(sources)}))
    return str(tmp_path)


PAIRS_ONLY = {("train", "image_text"): 240, ("validation", "image_text"): 30, ("test", "image_text"): 30}


def test_check_names_missing_kinds_and_a_composition_that_fits(tmp_path):
    data = DataSection(dir=_dataset(tmp_path, PAIRS_ONLY), composition={"image_text": 6, "text": 1, "image": 1})
    result = check_data(data, world_size=2)
    assert not result.ok and len(result.problems) == 1
    problem = result.problems[0]
    for words in ("split 'train'", "'text' (1 per batch; no samples)", "'image' (1 per batch; no samples)",
                  'set data.composition to {"image_text": 8}'):
        assert words in problem, problem


def test_check_counts_loader_slots(tmp_path):
    counts = {**PAIRS_ONLY, ("train", "text"): 3}
    data = DataSection(dir=_dataset(tmp_path, counts), composition={"image_text": 7, "text": 1}, num_workers=2)
    (problem,) = check_data(data, world_size=2).problems
    assert "'text' (1 per batch; 3 samples, fewer than the 4 loader slots)" in problem, problem


def test_pairs_only_data_plans_caption_loss_and_retrieval(tmp_path):
    result = check_data(DataSection(dir=_dataset(tmp_path, PAIRS_ONLY), composition={"image_text": 8}), 2)
    assert result.ok, result.problems
    assert result.plan.metrics == ["caption_loss", "retrieval"]
    assert "no 'text' samples in split 'validation'" in result.plan.left_out["text_ppl"]
    assert "class_rank" in result.plan.left_out


def test_labelled_embedded_source_plans_class_ranking(tmp_path):
    counts = {**PAIRS_ONLY, ("validation", "text"): 10}
    data = DataSection(dir=_dataset(tmp_path, counts, sources=("digits",)), composition={"image_text": 8})
    plan = check_data(data, 2).plan
    assert plan.metrics == ["caption_loss", "text_ppl", "retrieval", "class_rank"]
    assert plan.class_rank_source == "digits"


@pytest.mark.parametrize("metrics,counts,words", [
    (["text_ppl"], PAIRS_ONLY, ["data.eval_metrics asks for text_ppl", "no 'text' samples in split 'validation'",
                                "remove 'text_ppl'"]),
    (["retrieval"], {("train", "image_text"): 240, ("test", "image_text"): 1},
     ["asks for retrieval", "1 'image_text' samples in split 'test'"]),
])
def test_check_rejects_evaluation_the_data_cannot_serve(tmp_path, metrics, counts, words):
    data = DataSection(dir=_dataset(tmp_path, counts), composition={"image_text": 8}, eval_metrics=metrics)
    (problem,) = check_data(data, 2).problems
    for w in words:
        assert w in problem, problem


def test_nothing_to_evaluate_is_a_problem(tmp_path):
    data = DataSection(dir=_dataset(tmp_path, {("train", "image_text"): 240}), composition={"image_text": 8})
    (problem,) = check_data(data, 2).problems
    assert "evaluation has nothing to measure" in problem and "validation" in problem


def test_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = check_data(DataSection(), 2)  # only the embedded default dataset is built by the run
    assert built.ok and "builds the embedded dataset" in built.summary
    misspelled = check_data(DataSection(dir=str(tmp_path / "none")), 2)  # never other data in its place
    assert f"data.dir={tmp_path / 'none'} does not exist" in misspelled.problems[0]
    missing = check_data(DataSection(dir=str(tmp_path / "none"), prepare_if_missing=False), 2)
    assert "mmoe-ds prepare --out" in missing.problems[0]


class OtherRankDist:
    """Stands in for torch.distributed on a 2-rank group: all_gather_object returns this rank's
    object and the other rank's."""

    def __init__(self, other_state: dict):
        self.other_state = other_state

    def all_gather_object(self, out: list, obj) -> None:
        out[0], out[1] = obj, self.other_state


class FixedSkipsLoader:
    def __init__(self, state: dict[str, list[str]]):
        self.state = state

    def skip_log(self):
        from mmoe_ds.data.skips import SkipLog

        return SkipLog(self.state)


def test_skip_counts_merge_the_ranks_records_in_a_fixed_order():
    from mmoe_ds.data.schema import SKIP_REASONS
    from mmoe_ds.training.trainer import skip_counts

    # The other rank met 3 bad images and the damaged shard b.tar; this rank met 2 empty captions,
    # 4 bad images and the same damaged shard (sample-level slots: both ranks read every shard).
    dist = OtherRankDist({"bad_image": ["a.tar#k1", "a.tar#k2", "a.tar#k3"], "corrupt_tar": ["b.tar"]})
    loader = FixedSkipsLoader({"empty_caption": ["a.tar#e1", "a.tar#e2"], "corrupt_tar": ["b.tar"],
                               "bad_image": ["a.tar#k4", "a.tar#k5", "a.tar#k6", "a.tar#k7"]})
    totals = skip_counts(loader, dist, world_size=2)
    assert list(totals) == list(SKIP_REASONS)
    assert {k: v for k, v in totals.items() if v} == {"bad_image": 7, "corrupt_tar": 1, "empty_caption": 2}


# -- token counts of the loss metrics, with and without <bos> ----------------------------------------------
# Three text samples of 3, 1 and 2 words; one token per word (a word-level vocabulary). A label at
# position t is predicted from positions < t, so label position 0 is never a prediction: with <bos>
# (labels -100, w.., <eos>) each sample has words + 1 predicted tokens, 4 + 2 + 3 = 9; without <bos>
# (Qwen2's kind: labels w.., <eos>) the first word is position 0, so words + 1 - 1: 3 + 1 + 2 = 6.
EVAL_TEXTS = ["w1 w2 w3", "w4", "w5 w6"]


def word_processor(bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mmoe_ds.data import MmoeProcessor

    specials = ["<pad>", "<unk>", "</s>", "<image>"] + (["<s>"] if bos else [])
    vocab = {w: i for i, w in enumerate(specials + [f"w{i}" for i in range(10)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   additional_special_tokens=["<image>"], **({"bos_token": "<s>"} if bos else {}))
    return MmoeProcessor(fast, max_length=24)


@pytest.mark.parametrize("bos,expected", [(True, 9), (False, 6)])
def test_text_token_count_excludes_label_position_0(bos, expected):
    """`Evaluator._loss_sums` on a real model: the count is the hand count above, and the sum is the
    float64 cross-entropy over exactly those positions."""
    import torch.nn.functional as F

    from mmoe_ds.model import MmoeConfig, MmoeForCausalLM
    from mmoe_ds.training.evaluate import Evaluator, model_inputs

    processor = word_processor(bos)
    batch = processor.collate([processor.encode(None, text) for text in EVAL_TEXTS])
    assert (batch["labels"][:, 0] != -100).sum().item() == (0 if bos else 3)  # what tells the two apart
    torch.manual_seed(0)
    model = MmoeForCausalLM(MmoeConfig(vocab_size=len(processor.tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32, moe_intermediate_size=16,
                                       num_local_experts=4, max_position_embeddings=24,
                                       image_token_id=processor.image_token_id, moe_backend="torch")).eval()
    evaluator = Evaluator(model, processor, DataSection(), plan=None, seed=0)
    evaluator.batches = {"text": [batch]}
    with torch.no_grad():
        total, count = evaluator._loss_sums("text")
        logits = model(**model_inputs(batch, "cpu")).logits.double()
    assert count == expected
    oracle = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                             ignore_index=-100, reduction="sum")
    assert total == pytest.approx(oracle.item(), rel=1e-5)
