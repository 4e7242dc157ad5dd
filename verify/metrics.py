"""Per-output comparison metrics against a reference (DESIGN.md §6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_abs_over_max_ref: float
    rel_l2: float
    cosine: float
    top1: float | None  # fraction of positions whose argmax agrees; logits only

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def compare(out: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None, top1: bool = False) -> Comparison:
    """Compare in float64. `mask` ([batch, seq], 1 = real token) drops padded positions,
    whose values no consumer reads and which backends are free to differ on."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape {out.shape} differs from reference {ref.shape}")
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        out, ref = out[keep], ref[keep]  # [n_real, ...]
    diff = out - ref
    ref_norm = float(np.linalg.norm(ref))
    out_norm = float(np.linalg.norm(out))
    max_ref = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    agree = None
    if top1 and ref.size:
        agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return Comparison(
        max_abs=max_abs,
        max_abs_over_max_ref=max_abs / max_ref if max_ref else max_abs,
        rel_l2=float(np.linalg.norm(diff)) / ref_norm if ref_norm else float(np.linalg.norm(diff)),
        cosine=float(np.dot(out.ravel(), ref.ravel()) / (out_norm * ref_norm)) if out_norm and ref_norm else 1.0,
        top1=agree,
    )
