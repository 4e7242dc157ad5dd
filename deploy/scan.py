"""Refuse to publish a bundle that carries something looking like a Hugging Face token."""

from __future__ import annotations

import re
from pathlib import Path

from exportline.exporters.core.errors import ArtifactError

TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_CHUNK = 8 << 20
_OVERLAP = 64  # longer than the shortest match, so a token split across two reads is still seen


def find_secret(path: Path, token: str | None = None) -> int | None:
    """Byte offset of the first token-looking string in the file, or of `token` itself."""
    also = token.encode() if token and len(token) >= 8 else None
    keep = max(_OVERLAP, len(also or b""))
    tail, offset = b"", 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            buf = tail + chunk
            hits = [m.start()] if (m := TOKEN_PATTERN.search(buf)) else []
            if also and (i := buf.find(also)) >= 0:
                hits.append(i)
            if hits:
                return offset - len(tail) + min(hits)
            tail = buf[-keep:]
            offset += len(chunk)
    return None


def find_secret_bytes(data: bytes, token: str | None = None) -> int | None:
    """find_secret for content not written yet (e.g. the card a dry run would write)."""
    hits = [m.start()] if (m := TOKEN_PATTERN.search(data)) else []
    if token and len(token) >= 8 and (i := data.find(token.encode())) >= 0:
        hits.append(i)
    return min(hits) if hits else None


def refuse_secrets(root: Path, rels: list[str], token: str | None = None) -> None:
    """Raise naming the first file (bundle-relative) that contains a token-looking string."""
    for rel in rels:
        at = find_secret(Path(root) / rel, token)
        if at is not None:
            raise ArtifactError(
                f"refused: {rel} contains a string that looks like a Hugging Face token (at byte {at}); "
                "remove it from the bundle (and revoke the token if it is real), then run again"
            )
