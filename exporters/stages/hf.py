"""hf stage: source → HF folder at the bundle root (config, safetensors, tokenizer).

The source object writes the folder (`write_hf`), so a new source kind is one class in
exporters/ and nothing here changes.
"""

from __future__ import annotations

from typing import Any

from exportline.exporters.core.pipeline import Stage, StageContext


def _run(ctx: StageContext) -> dict[str, Any]:
    return ctx.source.write_hf(ctx.tmp, ctx.progress)


STAGE = Stage(
    name="hf",
    run=_run,
    inputs=lambda ctx: [],  # the source's own fingerprint covers the checkpoint bytes
    versions=("torch", "transformers", "safetensors", "tokenizers"),
)
