"""Tokenizers written into the HF folder; every one loads with AutoTokenizer, no custom code."""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.presets import config_dir

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


def default_corpus() -> Path:
    """configs/corpus.txt: English prose (CPython standard-library docstrings, PSF licence)."""
    return config_dir() / "corpus.txt"


def train_bpe(vocab_size: int, dest: Path, corpus: Path | None = None, *, model_max_length: int = 2048) -> dict:
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


def write_char_tokenizer(stoi: dict[str, int], dest: Path, model_max_length: int) -> dict:
    """nanoGPT's character-level vocabulary (shakespeare_char meta.pkl) as a `tokenizers`
    WordLevel model: every character is its own pre-token, decoding concatenates them.
    Loads with AutoTokenizer and no custom code; ids are exactly nanoGPT's stoi."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(stoi), unk_token=None))
    # [\s\S] rather than "." so that newlines are characters too, as in nanoGPT.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(dest)
    return {"kind": "char", "vocab_size": len(stoi)}


def write_tokenizer_file(path: Path, dest: Path, model_max_length: int) -> dict:
    """A user's tokenizer.json (`--tokenizer FILE`), wrapped so AutoTokenizer loads it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from exportline.exporters.core.errors import SourceError

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable JSON
        raise SourceError(f"--tokenizer {path}: not a tokenizers tokenizer.json ({str(exc).splitlines()[0]}); "
                          "pass the tokenizer.json of a Hugging Face fast tokenizer") from None
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length)
    fast.save_pretrained(dest)
    return {"kind": "file", "file": path.name, "vocab_size": tok.get_vocab_size()}
