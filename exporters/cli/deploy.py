"""CLI commands of exportline.deploy; `register(app)` adds them to the `exportline` command.

card write|check, push, pull, push-dataset, handoff. The commands parse and print; deploy/
does the work. The token is read from --token / HF_TOKEN / `hf auth login` and never printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from exportline.exporters.cli.options import BundleArg, BundleOrRepoArg, RepoIdOpt, TokenOpt, err

PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repo private; refuses an existing public one.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded (paths, sizes); upload nothing.")]
DatasetOpt = Annotated[Optional[list[str]], typer.Option("--dataset", help="Dataset repo id to link (repeatable); kept in the manifest.")]

card_app = typer.Typer(name="card", help="The bundle's model card (README.md).", no_args_is_help=True)


@card_app.command("write")
def card_write(
    bundle: BundleArg,
    dataset: DatasetOpt = None,
    license: Annotated[Optional[str], typer.Option(help="License id for the card, e.g. apache-2.0; kept in the manifest.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Hub id of the model this one derives from.")] = None,
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="Repo id to show in the usage examples.")] = None,
) -> None:
    """Generate README.md (and hubconf.py) from the manifest and reports; refresh manifest.json."""
    from exportline.deploy.card_check import check_card
    from exportline.deploy.prepare import prepare_bundle

    prepare_bundle(bundle, repo_id=repo_id, datasets=dataset or [], license=license, base_model=base_model)
    _fail_on(check_card(bundle))
    typer.echo(f"wrote {bundle / 'README.md'}")


@card_app.command("check")
def card_check(bundle: BundleArg) -> None:
    """Refuse a card with empty sections, TBD/TODO, or numbers that disagree with the reports."""
    from exportline.deploy.card_check import check_card

    _fail_on(check_card(bundle))
    typer.echo(f"{bundle / 'README.md'}: ok")


def _fail_on(problems: list[str]) -> None:
    from exportline.exporters.core.errors import ArtifactError

    for p in problems:
        err.print(f"card: {p}")
    if problems:
        more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
        raise ArtifactError(f"model card check failed: {problems[0]}{more}; fix it or regenerate: exportline card write DIR")


def push(
    bundle: BundleArg,
    repo_id: RepoIdOpt,
    private: PrivateOpt = False,
    tag: Annotated[Optional[str], typer.Option(help="Tag the pushed commit, e.g. v1.0.0 (idempotent).")] = None,
    include: Annotated[Optional[str], typer.Option(help="Groups to push: hf,onnx,trt,reports,training (default: all).")] = None,
    dry_run: DryRunOpt = False,
    token: TokenOpt = None,
) -> None:
    """Push a bundle to the Hub in one atomic commit (card and manifest regenerated first).

    Unchanged files are not sent; files of the pushed groups that the bundle no longer has are
    removed from the repo, so the repo mirrors the bundle.
    """
    from exportline.deploy.hub import parse_include, push_bundle

    result = push_bundle(bundle, repo_id=repo_id, private=private, tag=tag, include=parse_include(include),
                         dry_run=dry_run, token=token, progress=err.print)
    if result.dry_run:
        for f in result.files:
            typer.echo(f"{f.bytes:>14,}  {f.path}")
        typer.echo(f"dry run: {len(result.files)} files, {result.total_bytes:,} bytes would go to {repo_id}; nothing uploaded")
        return
    if result.uploaded or result.deleted:
        typer.echo(f"pushed {len(result.uploaded)} file(s)" + (f", removed {len(result.deleted)}" if result.deleted else "")
                   + f" to {result.url} at commit {result.commit}")
    else:
        typer.echo(f"{repo_id} already up to date at commit {result.commit}; nothing uploaded")
    if result.tag:
        typer.echo(f"tag {result.tag} {'created' if result.tag_created else 'already'} at {result.commit}")


def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, ORG/NAME.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the bundle (must not exist or be empty); with --to-checkpoint the checkpoint file.")],
    revision: Annotated[Optional[str], typer.Option(help="Tag, branch or commit (default: main).")] = None,
    token: TokenOpt = None,
    to_checkpoint: Annotated[Optional[str], typer.Option("--to-checkpoint", help="Write a training checkpoint of this format (nanogpt) to --out instead of the bundle; downloads only the weights and training/.")] = None,
) -> None:
    """Download a bundle; every file is checked against manifest.json before it is kept."""
    from exportline.deploy.pull import pull_bundle, pull_checkpoint

    if to_checkpoint:
        got = pull_checkpoint(repo_id, out=out, format=to_checkpoint, revision=revision, token=token, progress=err.print)
        typer.echo(f"pulled {repo_id}@{got.revision} (commit {got.commit}): {got.files} files, every sha256 matches "
                   f"manifest.json; wrote {got.checkpoint.path}: {got.checkpoint.note}")
        return

    result = pull_bundle(repo_id, out=out, revision=revision, token=token, progress=err.print)
    typer.echo(f"pulled {repo_id}@{result.revision} (commit {result.commit}): {result.files} files, "
               f"{result.bytes:,} bytes, every sha256 matches manifest.json -> {result.out}")
    for rel in result.missing:
        typer.echo(f"not in the repo (pushed with --include): {rel}")
    for e in result.engines:
        state = "usable" if e.usable else "unusable"
        typer.echo(f"{e.path}: {state}: {e.reason}" + ("" if e.usable else f"; rebuild with: {e.rebuild}"))


def push_dataset(
    path: Annotated[Path, typer.Argument(help="A file or folder to publish as a dataset.")],
    repo_id: RepoIdOpt,
    private: PrivateOpt = False,
    dry_run: DryRunOpt = False,
    token: TokenOpt = None,
    bundle: Annotated[Optional[Path], typer.Option(help="Bundle whose card should link the dataset.")] = None,
) -> None:
    """Push a dataset (repo_type=dataset) in one commit; --bundle records it for the model card."""
    from exportline.deploy.hub import push_dataset as run
    from exportline.deploy.prepare import prepare_bundle

    result = run(path, repo_id=repo_id, private=private, dry_run=dry_run, token=token, progress=err.print)
    if result.dry_run:
        for f in result.files:
            typer.echo(f"{f.bytes:>14,}  {f.path}")
        typer.echo(f"dry run: {len(result.files)} files, {result.total_bytes:,} bytes would go to dataset {repo_id}")
        return
    typer.echo(f"dataset {repo_id} at commit {result.commit} ({len(result.uploaded)} file(s) uploaded)")
    if bundle is not None:
        prepare_bundle(bundle, datasets=[repo_id])
        typer.echo(f"linked from {bundle / 'README.md'}")


def handoff(
    bundle: BundleOrRepoArg,
    triton: Annotated[Path, typer.Option("--triton", help="Triton model repository folder to write into.")],
    backend: Annotated[str, typer.Option(help="onnx (onnxruntime_onnx) or tensorrt (tensorrt_plan).")] = "onnx",
    precision: Annotated[Optional[str], typer.Option(
        help="fp32, fp16 or int8: which ONNX (or engine) to hand off (default: fp32 ONNX, or the only engine).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Triton model name (default: the bundle's name).")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Engine file under trt/ (tensorrt backend).")] = None,
) -> None:
    """Write a Triton Inference Server model repository: <name>/config.pbtxt + <name>/1/model.*"""
    from exportline.deploy.pull import bundle_or_pull
    from exportline.deploy.triton import write_triton_repo

    model = write_triton_repo(bundle_or_pull(bundle, progress=err.print), triton, backend=backend, precision=precision, name=name, engine=engine)
    typer.echo(f"{model.model_dir}: {model.platform}, {len(model.inputs)} inputs, {len(model.outputs)} outputs "
               f"({', '.join(model.files)})")
    if model.engine_check is not None and not model.engine_check.usable:
        err.print(f"note: {model.engine_check.path} cannot run on this machine ({model.engine_check.reason}); "
                  "the Triton server needs the TensorRT version and GPU it was built for")


def register(app: typer.Typer) -> None:
    app.add_typer(card_app, name="card")
    app.command()(push)
    app.command()(pull)
    app.command("push-dataset")(push_dataset)
    app.command()(handoff)
