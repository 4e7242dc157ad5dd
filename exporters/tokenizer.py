"""Tokenizers written into the HF folder; every one loads with AutoTokenizer, no custom code."""

from __future__ import annotations

from pathlib import Path

from .presets import config_dir

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


def default_corpus() -> Path:
    """configs/corpus.txt: English prose (CPython standard-library docstrings, PSF licence)."""
    return config_dir() / "corpus.txt"


def train_bpe(vocab_size: int, dest: Path, corpus: Path | None = None, model_max_length: int = 2048) -> dict:
    """Byte-level BPE trained with `tokenizers` on the shipped corpus; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus or default_corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=model_max_length, padding_side="left",
    )
    fast.save_pretrained(dest)
    return {"kind": "bpe", "vocab_size": tok.get_vocab_size(), "trained_on": corpus.name}
