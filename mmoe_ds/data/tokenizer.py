"""The text tokenizer: a byte-level BPE trained offline on the training split's text."""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from .schema import IMAGE_TOKEN, SPECIAL_TOKENS


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level, so any text (other languages, typos) still encodes; trained on sorted distinct
    texts, so the same data gives the same vocabulary byte for byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [SPECIAL_TOKENS["pad_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"], IMAGE_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols plus {len(specials)} special tokens.")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=[IMAGE_TOKEN], **SPECIAL_TOKENS)
