"""Stages: cached, atomic steps `inputs → files in the bundle`, each leaving a record.

A stage writes into a private temporary folder that mirrors the bundle layout; only when
it returns are its files renamed into place and its record (options, tool versions, input
fingerprints, wall time, peak memory, outputs) written to manifest.json. A stage whose
fingerprint is unchanged and whose outputs are intact is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

from exportline.exporters.core.bundle import Bundle, _disk_hint, carry_digest, file_digests
from exportline.exporters.core.consumer_files import without_consumer_block, write_consumer_files
from exportline.exporters.core.errors import (
    ConfigError,
    ExportlineError,
    IntegrityError,
    NotAvailable,
    OutputError,
    StageError,
)
from exportline.exporters.core.measure import measure
from exportline.exporters.core.presets import verification_record


class Source(Protocol):
    """What the pipeline needs of a model source (see exporters/sources.py)."""

    name: str

    def describe(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...

    def write_hf(self, dest: Path, progress: Callable[[str], None]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ExportOptions:
    """What the user set for the stages; each stage's `options` picks the fields that
    enter its fingerprint. None means the stage's own default."""

    calibration_data: Path | None = None  # int8: text to calibrate on
    calibration_inputs: Path | None = None  # int8 of a custom module: .npz of inputs (default: sampled from its spec)
    opset: int | None = None  # onnx
    trt_max_batch: int | None = None
    trt_max_sequence: int | None = None
    trt_workspace_gib: float | None = None
    trt_timing_cache: Path | None = None  # default: ~/.cache/exportline (tied to the GPU)
    with_training_state: bool = False  # hf: also store a nanoGPT .pt's optimizer etc. in training/

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class StageContext:
    bundle: Bundle
    source: Source
    tmp: Path  # write here, with the bundle's layout (e.g. tmp / "onnx" / "model.onnx")
    options: ExportOptions = field(default_factory=ExportOptions)
    progress: Callable[[str], None] = lambda message: None

    def bundle_file(self, rel: str) -> Path:
        """An artifact of an earlier stage, read-only."""
        return self.bundle.root / rel


@dataclass(frozen=True)
class Stage:
    """One export stage (the registry of them is exporters/stages/__init__.py)."""

    name: str
    run: Callable[[StageContext], dict[str, Any] | None]  # returns extra facts for the record
    inputs: Callable[[StageContext], list[str]]  # bundle-relative files the stage reads
    versions: tuple[str, ...] = ()  # distributions whose versions enter the fingerprint
    options: Callable[[ExportOptions], dict[str, Any]] = lambda opts: {}  # the options it uses
    description: str = ""


def tool_versions(dists: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _input_hashes(bundle: Bundle, rels: list[str], manifest: dict[str, Any]) -> dict[str, str]:
    """The inputs' checksums, each checked against the manifest (export publishes nothing,
    so a file whose size and mtime are unchanged keeps its recorded checksum)."""
    for rel in rels:
        if not (bundle.root / rel).is_file():
            raise StageError(f"missing input {bundle.root / rel}; run the stage that makes it first (see --stages)")
    listed = {f["path"]: f for f in manifest.get("files", [])}
    for c in bundle.check(rels, fast=True, manifest=manifest):
        if not c.ok:
            raise IntegrityError(f"input {bundle.root / c.path} {c.detail}, which differs from manifest.json: changed "
                                 f"since it was written; rebuild it: {bundle.rebuild_command(manifest, c.path)}")
    hashes = {rel: listed[rel]["sha256"] for rel in rels if rel in listed}
    unlisted = [rel for rel in rels if rel not in listed]
    digests = file_digests([bundle.root / rel for rel in unlisted])
    hashes.update({rel: digests[bundle.root / rel] for rel in unlisted})
    if "config.json" in hashes:  # the consumer block follows the graphs; no stage reads it
        hashes["config.json"] = hashlib.sha256(without_consumer_block(bundle.root / "config.json").encode()).hexdigest()
    return {rel: hashes[rel] for rel in rels}


def _outputs_intact(bundle: Bundle, record: dict, manifest: dict[str, Any]) -> bool:
    outputs = record.get("outputs", [])
    listed = {f["path"] for f in manifest.get("files", [])}
    return all(rel in listed for rel in outputs) and all(c.ok for c in bundle.check(outputs, fast=True, manifest=manifest))


@dataclass
class PipelineResult:
    manifest: dict[str, Any]
    ran: list[dict[str, Any]]  # the records of this run, in order


def run_pipeline(
    bundle: Bundle,
    source: Source,
    *,
    stages: list[Stage],
    options: ExportOptions | None = None,
    force: bool = False,
    require: tuple[str, ...] = (),
    progress: Callable[[str], None] = lambda message: None,
) -> PipelineResult:
    """Run `stages` in order under the bundle lock; returns the records of this run.

    A stage raising NotAvailable is recorded as skipped with the reason, unless it is in
    `require`. Any other error stops the pipeline; files of the failed stage never reach
    the bundle.
    """
    options = options or ExportOptions()
    if not stages:
        raise ConfigError("--stages is empty; name at least one stage, e.g. --stages hf,onnx")
    ran = []
    bundle.require_own_folder()
    with bundle.lock():
        bundle.clean_tmp()
        manifest = bundle.read_manifest()
        source = _continued_source(bundle, manifest, source)
        manifest = _replace_other_source(bundle, manifest, source, stages=[s.name for s in stages], force=force,
                                         progress=progress)
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        manifest["name"] = source.name
        manifest["source"] = source.describe()
        manifest["verification"] = verification_record(manifest["source"])
        manifest["source_fingerprint"] = source.fingerprint()
        manifest["exportline"] = tool_versions(["exportline"])["exportline"]
        for stage in stages:
            record = _run_stage(bundle, source, stage, manifest=manifest, options=options, force=force, progress=progress)
            ran.append(record)
            manifest.setdefault("stages", {})[stage.name] = record
            write_consumer_files(bundle.root)  # transformers.js/genai configs name the graphs now present
            manifest = bundle.write_manifest(manifest)
            if record["status"] == "skipped" and stage.name in require:
                raise NotAvailable(f"stage {stage.name} is required (--require) but {record['reason']}")
        manifest = _drop_stale_stages(bundle, manifest, ran=[s.name for s in stages], progress=progress)
        bundle.clean_tmp()
    return PipelineResult(manifest=manifest, ran=ran)


def _run_stage(
    bundle: Bundle, source: Source, stage: Stage, *, manifest: dict[str, Any], options: ExportOptions, force: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    ctx = StageContext(bundle=bundle, source=source, tmp=bundle.root, options=options, progress=progress)
    stage_options = stage.options(options)
    versions = tool_versions(("exportline", *stage.versions))
    inputs = _input_hashes(bundle, stage.inputs(ctx), manifest)
    fingerprint = hashlib.sha256(
        json.dumps(
            {"stage": stage.name, "source": source.fingerprint(), "options": stage_options,
             "versions": versions, "inputs": inputs},
            sort_keys=True, default=str,
        ).encode()
    ).hexdigest()
    record: dict[str, Any] = {
        "name": stage.name, "options": stage_options, "versions": versions,
        "inputs": inputs, "fingerprint": fingerprint,
    }
    previous = manifest.get("stages", {}).get(stage.name)
    if (
        not force and previous and previous.get("status") == "done"
        and previous.get("fingerprint") == fingerprint and _outputs_intact(bundle, previous, manifest)
    ):
        progress(f"{stage.name}: unchanged, skipped (use --force to rerun)")
        return {**previous, "status": "done", "cached": True}

    progress(f"{stage.name}: running")
    try:  # from the temp folder's making on: an interrupt anywhere leaves nothing behind
        ctx.tmp = bundle.tmp_dir(stage.name)
        with measure() as m:
            info = stage.run(ctx) or {}
    except NotAvailable as exc:
        bundle.clean_tmp()
        progress(f"{stage.name}: skipped: {exc}")
        return {**record, "status": "skipped", "reason": str(exc)}
    except BaseException as exc:  # nothing of a failed stage reaches the bundle
        bundle.clean_tmp()
        translated = _user_error(stage.name, exc)
        if translated is None:
            raise
        raise translated from None
    try:
        share_like_umask(ctx.tmp)
        outputs = bundle.commit(ctx.tmp)
    except OSError as exc:
        bundle.clean_tmp()
        raise _user_error(stage.name, exc) from None
    except BaseException:  # Ctrl-C between the stage and its commit
        bundle.clean_tmp()
        raise
    _remove_stale(bundle, previous, outputs)
    progress(f"{stage.name}: done in {m.wall_s:.1f}s, peak RSS {m.peak_rss_bytes / 2**30:.2f} GiB")
    return {
        **record, "status": "done", "cached": False, "outputs": outputs, "info": info,
        "wall_s": round(m.wall_s, 3), "peak_rss_bytes": m.peak_rss_bytes,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def share_like_umask(folder: Path) -> None:
    """Every file a stage wrote gets the mode the user's umask gives a new file. Some writers
    create theirs 0600 (safetensors' save_file, onnx's external data), which a serving
    container's non-root user cannot read; the bundle is meant to be shared."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    mode = 0o666 & ~mask
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            carry_digest(path, path, lambda path=path: path.chmod(mode))


def _user_error(stage: str, exc: BaseException) -> ExportlineError | None:
    """Out-of-memory and OS errors (e.g. a full disk) as one-line errors; anything else
    (an ExportlineError already is one) propagates unchanged."""
    if isinstance(exc, ExportlineError):
        return None
    if isinstance(exc, MemoryError):
        return StageError(f"stage {stage} ran out of memory; try a smaller preset or a machine with more RAM")
    if isinstance(exc, OSError):
        where = f" ({Path(exc.filename).name})" if exc.filename else ""
        return OutputError(f"stage {stage}: {exc.strerror or exc}{where}; {_disk_hint(exc)}")
    return None


def _remove_stale(bundle: Bundle, previous: dict | None, outputs: list[str]) -> None:
    """Files an earlier run of this stage wrote that this run did not (e.g. old shards)."""
    for rel in (previous or {}).get("outputs", []):
        if rel not in outputs:
            (bundle.root / rel).unlink(missing_ok=True)


@dataclass
class RecordedSource:
    """A bundle exported from its own root continues the export it records: its HF folder
    is the hf stage's output, not a new source (e.g. `exportline export out/1b --out out/1b
    --stages fp16,int8`), so name, description, bounds and fingerprint stay the recorded ones."""

    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest.get("name") or "bundle"

    def describe(self) -> dict[str, Any]:
        return self.manifest["source"]

    def fingerprint(self) -> str:
        return self.manifest["source_fingerprint"]

    def write_hf(self, dest: Path, progress: Callable[[str], None]) -> dict[str, Any]:
        raise StageError(f"the hf stage's output is this bundle's own source, so it cannot be rewritten from itself; "
                         f"rerun it from the original source ({_source_label(self.describe())}) with --stages hf --force")


def _continued_source(bundle: Bundle, manifest: dict[str, Any], source: Source) -> Source:
    """`source` itself, unless it is the bundle's own root and the files its hf stage
    recorded are intact: then the recorded source continues (see RecordedSource)."""
    path = getattr(source, "path", None)
    hf = manifest.get("stages", {}).get("hf") or {}
    if (path is None or Path(path).resolve() != bundle.root.resolve() or "source_fingerprint" not in manifest
            or hf.get("status") != "done"):
        return source
    if any(not c.ok for c in bundle.check(hf.get("outputs") or [], fast=True, manifest=manifest)):
        return source  # edited since: a new source, judged as one
    return RecordedSource(manifest)


def _replace_other_source(bundle: Bundle, manifest: dict, source: Source, *, stages: list[str], force: bool,
                          progress) -> dict:
    """A bundle of another source keeps nothing of the old model: stages this run does not
    redo would stay recorded as done for the old weights, so they are refused, or with
    --force deleted (with the reports) before anything runs."""
    old = manifest.get("source_fingerprint")
    if old is None or old == source.fingerprint():
        return manifest
    left = [n for n, r in manifest.get("stages", {}).items() if n not in stages and r.get("status") == "done"]
    if left and not force:
        raise OutputError(
            f"{bundle.root} holds an export of another source ({_source_label(manifest.get('source') or {})}) whose "
            f"stage {', '.join(left)} this run would leave behind; pass --force to delete them, add them to --stages, "
            "or choose another --out"
        )
    kept = {n: r for n, r in manifest.get("stages", {}).items() if n in stages}
    doomed = set(bundle.owned_paths(manifest)) - {rel for r in kept.values() for rel in r.get("outputs", [])}
    for rel in doomed:
        (bundle.root / rel).unlink(missing_ok=True)
    if left:
        progress(f"removed stage {', '.join(left)} of the previous source ({_source_label(manifest.get('source') or {})})")
    return bundle.write_manifest({**manifest, "stages": kept})


def _source_label(described: dict) -> str:
    return str(described.get("path") or described.get("preset") or described.get("kind") or "unknown")


def _digest_now(bundle: Bundle, files: dict[str, str], rel: str) -> str | None:
    """A stage input's checksum as _input_hashes takes it (config.json without the consumer block)."""
    if rel == "config.json" and rel in files and (bundle.root / rel).is_file():
        return hashlib.sha256(without_consumer_block(bundle.root / rel).encode()).hexdigest()
    return files.get(rel)


def _drop_stale_stages(bundle: Bundle, manifest: dict, *, ran: list[str], progress) -> dict:
    """A recorded stage not run now whose inputs changed since it ran (an upstream stage
    rewrote them) describes files that no longer follow from the bundle: its outputs and
    record go, and so, in turn, those of the stages that read them."""
    files = {f["path"]: f["sha256"] for f in manifest.get("files", [])}
    stages = dict(manifest.get("stages", {}))
    dropped = True
    while dropped:  # until nothing changes: a dropped stage's outputs are the next stage's inputs
        dropped = False
        for name, record in list(stages.items()):
            if name in ran or record.get("status") != "done":
                continue
            changed = [rel for rel, digest in record.get("inputs", {}).items() if _digest_now(bundle, files, rel) != digest]
            if not changed:
                continue
            for rel in record.get("outputs", []):
                (bundle.root / rel).unlink(missing_ok=True)
                files.pop(rel, None)
            del stages[name]
            dropped = True
            progress(f"{name}: removed: its input {changed[0]} changed; rerun it with --stages {name}")
    if stages == manifest.get("stages", {}):
        return manifest
    write_consumer_files(bundle.root)  # the configs no longer name the removed graphs
    return bundle.write_manifest({**manifest, "stages": stages})
