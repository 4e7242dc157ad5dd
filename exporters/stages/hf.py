"""hf stage: source → HF folder at the bundle root (config, safetensors, tokenizer).

The source object writes the folder (`write_hf`), so a new source kind is one class in
exporters/ and nothing here changes. `--with-training-state` (nanoGPT only) also stores
the optimizer and training counters in training/, for `exportline to-checkpoint`.
"""

from __future__ import annotations

from typing import Any

from exportline.exporters.core.errors import ConfigError
from exportline.exporters.core.pipeline import ExportOptions, Stage, StageContext


def _run(ctx: StageContext) -> dict[str, Any]:
    if not ctx.options.with_training_state:
        return ctx.source.write_hf(ctx.tmp, ctx.progress)
    if not getattr(ctx.source, "carries_training_state", False):
        kind = ctx.source.describe().get("kind")
        raise ConfigError(f"--with-training-state: a {kind} source carries no optimizer state; "
                          "it is for nanoGPT checkpoints (ckpt.pt written by train.py), drop the option")
    return ctx.source.write_hf(ctx.tmp, ctx.progress, training_state=True)


def _options(options: ExportOptions) -> dict[str, Any]:
    # Only when asked, so bundles exported before the option existed keep their fingerprint.
    return {"with_training_state": True} if options.with_training_state else {}


STAGE = Stage(
    name="hf",
    run=_run,
    inputs=lambda ctx: [],  # the source's own fingerprint covers the checkpoint bytes
    versions=("torch", "transformers", "safetensors", "tokenizers"),
    options=_options,
)
