"""CLI commands of exportline.verify; `register(app)` adds them to the `exportline` command.

`verify` and `generate` parse options, call the library and print: results on stdout,
progress and timings on stderr (so `exportline generate … > out.txt` keeps only the text).
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from exportline.exporters.cli.options import BundleArg, BundleOrRepoArg, err
from exportline.verify.runtime.backends import backend_help

StageOpt = Annotated[Optional[list[str]], typer.Option("--stage", help="Check only this stage (repeatable); default: every stage the manifest records.")]
LongOpt = Annotated[int, typer.Option("--long", min=4, help="Long prefill / past length of the verification cases (DESIGN.md §6 asks ≥ 64).")]
BackendOpt = Annotated[str, typer.Option("--backend", help=backend_help())]
PromptOpt = Annotated[Optional[list[str]], typer.Option("--prompt", help="Prompt text (repeatable: one batch, left-padded).")]
TokenIdsOpt = Annotated[Optional[list[str]], typer.Option("--token-ids", help="Comma-separated token ids instead of text (repeatable); for bundles without a tokenizer.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="New tokens per prompt (stops earlier at EOS).")]
GreedyOpt = Annotated[bool, typer.Option("--greedy", help="Argmax decoding (the default unless --temperature is given).")]
TemperatureOpt = Annotated[Optional[float], typer.Option("--temperature", help="Sample from softmax(logits / T).")]
TopKOpt = Annotated[int, typer.Option("--top-k", min=0, help="Sample among the K most likely tokens (0 = all).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sampler.")]


def verify(bundle: BundleArg, stage: StageOpt = None, long: LongOpt = 64) -> None:
    """Re-run every check the bundle's manifest records; write reports/verify.json + verify.md."""
    import os

    from exportline.verify.suite import verify_bundle

    # no tqdm bars from transformers (progress goes to stderr through err.print); the
    # variable, not transformers' own switch, so the torch child processes of an isolated
    # verify inherit it and this process need not import transformers (verify never downloads)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    report = verify_bundle(bundle, stages=stage, options={"long": long}, progress=err.print)
    typer.echo(report.summary())
    typer.echo(f"report: {bundle / 'reports' / 'verify.md'}")
    report.raise_for_failure()


def generate(
    bundle: BundleOrRepoArg,
    prompt: PromptOpt = None,
    token_ids: TokenIdsOpt = None,
    backend: BackendOpt = "onnx",
    max_new_tokens: MaxNewOpt = 32,
    greedy: GreedyOpt = False,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = 0,
    seed: SeedOpt = 0,
) -> None:
    """Generate from the bundle with the KV cache; text on stdout (one line per prompt), timings on stderr."""
    from exportline.deploy.pull import bundle_or_pull
    from exportline.exporters.core.errors import ConfigError
    from exportline.verify.generate import Sampling, generate_from_bundle

    if greedy and temperature is not None:
        raise ConfigError("--greedy and --temperature exclude each other; drop one")
    sampling = Sampling(greedy=temperature is None, temperature=temperature or 1.0, top_k=top_k, seed=seed)
    _quiet_transformers()
    root = bundle_or_pull(bundle, progress=err.print)
    result = generate_from_bundle(
        root, backend=backend, prompts=prompt, token_ids=[_parse_ids(t) for t in token_ids or []] or None,
        max_new_tokens=max_new_tokens, sampling=sampling, progress=err.print,
    )
    if not result.used_tokenizer:
        err.print("generate: token ids in, token ids out (no tokenizer used)")
    for line in result.lines:
        typer.echo(line)
    g = result.generation
    err.print(
        f"generate: prefill {g.prefill_s * 1e3:.1f} ms, decode {g.decode_tokens_per_s:.1f} tokens/s "
        f"({g.decode_steps} steps × batch {g.batch}); finish: {', '.join(g.finish)}"
        + (f"; {g.window_prefills} steps re-prefilled a cropped context" if g.window_prefills else "")
    )


def _parse_ids(text: str) -> list[int]:
    from exportline.exporters.core.errors import ConfigError

    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--token-ids {text!r}: expected comma-separated integers, e.g. --token-ids 1,2,3") from None


def _quiet_transformers() -> None:
    """transformers draws a weight-loading progress bar on stderr; the CLI has its own progress."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def register(app: typer.Typer) -> None:
    app.command()(verify)
    app.command()(generate)
