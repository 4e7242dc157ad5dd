"""Every error exportline raises on purpose lives here.

``str(error)`` is one line for the user: what failed, why, and what to do next. The CLI
prints it and exits non-zero; a traceback is shown only for errors outside this hierarchy.
"""

from __future__ import annotations


class Interrupted(BaseException):
    """Ctrl-C (SIGINT), raised by the CLI's handler. A BaseException, so that no `except
    Exception` swallows it while every `finally` and temp-folder cleanup still runs."""


class ExportlineError(Exception):
    """Base class; the message is shown to the user as-is."""

    exit_code = 1


class SourceError(ExportlineError):
    """A checkpoint, preset or HF folder cannot be read."""


class UnsupportedArchitecture(SourceError):
    """The model's architecture (config.json model_type) has no export support."""


class ConfigError(ExportlineError):
    """A preset, threshold or option value is invalid."""


class OutputError(ExportlineError):
    """The output folder cannot be written, or is in use by another run."""


class StageError(ExportlineError):
    """A stage failed while producing its artifact."""


class NotAvailable(ExportlineError):
    """A tool or device this step needs is not present (e.g. TensorRT, a CUDA GPU)."""

    exit_code = 3


class ArtifactError(ExportlineError):
    """A bundle file is missing, truncated or does not match its manifest checksum."""


class IntegrityError(ArtifactError):
    """A file manifest.json lists is missing, truncated, or its sha256 differs: the bundle
    breaks its promise, so no command uses it (an absent optional artifact is NotAvailable)."""


class VerificationFailed(ExportlineError):
    """A numerical check did not meet its bound."""

    exit_code = 2


class ChildProcessDied(ExportlineError):
    """A helper process exportline started (verify's torch side) ended without answering."""


class HubError(ExportlineError):
    """Talking to the Hugging Face Hub failed."""


class BenchmarkFailed(ExportlineError):
    """A benchmark regressed beyond its --fail-over threshold, or a backend crashed mid-run."""

    exit_code = 4
