"""Text for int8: calibration sequences and the held-out sequences they must never include.

One split rule, used by the int8 stage (calibrates on one part) and by verify (measures
perplexity on the other): the text is tokenized with the bundle's tokenizer into one
stream, cut into chunks of `chunk_tokens`, and every `HELDOUT_EVERY`-th chunk is held out.
Interleaving keeps both parts on the same topics; a held-out chunk never feeds calibration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from exportline.exporters.core.errors import ConfigError, NotAvailable
from exportline.exporters.sources.tokenizer import default_corpus

HELDOUT_EVERY = 10  # chunk k is held out when k % 10 == 9
CHUNK_TOKENS = 128
MIN_CHUNKS = 2 * HELDOUT_EVERY


@dataclass(frozen=True)
class TextSplit:
    path: Path
    sha256: str
    chunk_tokens: int
    calibration: list[list[int]]  # token ids, each chunk `chunk_tokens` long
    heldout: list[list[int]]

    def describe(self) -> dict:
        return {
            "file": self.path.name, "sha256": self.sha256, "chunk_tokens": self.chunk_tokens,
            "calibration_chunks": len(self.calibration), "heldout_chunks": len(self.heldout),
            "heldout_rule": f"chunk k held out when k % {HELDOUT_EVERY} == {HELDOUT_EVERY - 1}",
        }


class UnencodableText(ConfigError):
    """The calibration text has symbols the model's tokenizer has no id for."""


def calibration_path(option: str | None) -> Path:
    """The user's --calibration-data file, or the shipped corpus."""
    if not option:
        return default_corpus()
    path = Path(option).expanduser()
    if not path.is_file():
        raise ConfigError(f"--calibration-data {option}: no such file; give a UTF-8 text file of the model's domain")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(bundle_root: Path):
    """The bundle's own tokenizer (tokenizer.json at the root); no code is executed."""
    from transformers import AutoTokenizer

    if not (Path(bundle_root) / "tokenizer.json").is_file():
        raise NotAvailable("the bundle has no tokenizer.json, and int8 calibration needs the model's tokenizer; "
                           "export with --tokenizer tokenizer.json")
    return AutoTokenizer.from_pretrained(str(bundle_root), trust_remote_code=False)


def split_text(path: Path, tokenizer, *, max_positions: int, chunk_tokens: int = CHUNK_TOKENS) -> TextSplit:
    """Tokenize `path` and split it into calibration and held-out chunks (rule above)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calibration text {path}: {exc}; give a UTF-8 text file") from None
    chunk = min(chunk_tokens, max_positions)
    # Line by line: one call on the whole file makes transformers warn that the text is
    # longer than the model; concatenated, the lines are the same token stream.
    lines = text.splitlines(keepends=True)
    try:
        ids = [t for row in tokenizer(lines, add_special_tokens=False, verbose=False)["input_ids"] for t in row] if lines else []
    except Exception as exc:  # tokenizers raises a bare Exception, e.g. a char vocabulary without <unk>
        raise UnencodableText(
            f"the bundle's tokenizer cannot encode {path} ({str(exc).splitlines()[0]}); pass --calibration-data "
            "with text in the model's vocabulary (a nanoGPT char model: its data/<dataset>/input.txt)"
        ) from None
    chunks = [ids[i : i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]
    if len(chunks) < MIN_CHUNKS:
        raise ConfigError(
            f"calibration text {path} has {len(ids)} tokens; need at least {MIN_CHUNKS * chunk} "
            f"({MIN_CHUNKS} chunks of {chunk}) to calibrate and hold some out"
        )
    held = [c for k, c in enumerate(chunks) if k % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    calib = [c for k, c in enumerate(chunks) if k % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    return TextSplit(Path(path), file_sha256(path), chunk, calib, held)


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when there are fewer)."""
    if count >= len(items):
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]
