"""Per-output comparison metrics against a reference (DESIGN.md §6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
    whose values no consumer reads and which backends are free to differ on.

    At most two float64 copies of the operands live at once (the difference overwrites this
    function's own copy of `out`, max |x| is max(x.max(), -x.min())): a batch-3 1B logits
    tensor is 49 MB in float64, and verify holds an ORT session of gigabytes meanwhile."""
    given = out
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape {out.shape} differs from reference {ref.shape}")
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        out, ref = out[keep], ref[keep]  # [n_real, ...]
    ref_norm = float(np.linalg.norm(ref))
    out_norm = float(np.linalg.norm(out))
    max_ref = _max_abs(ref)
    agree = None
    if top1 and ref.size:
        agree = float((out.argmax(-1) == ref.argmax(-1)).mean())
    cosine = float(np.dot(out.ravel(), ref.ravel()) / (out_norm * ref_norm)) if out_norm and ref_norm else 1.0
    owned = out is not given and out.base is None  # a copy made here, not the caller's array
    diff = np.subtract(out, ref, out=out if owned else None)
    max_abs = _max_abs(diff)
    diff_norm = float(np.linalg.norm(diff))
    return Comparison(
        max_abs=max_abs,
        max_abs_over_max_ref=max_abs / max_ref if max_ref else max_abs,
        rel_l2=diff_norm / ref_norm if ref_norm else diff_norm,
        cosine=cosine,
        top1=agree,
    )


def _max_abs(x: np.ndarray) -> float:
    """max |x| without an |x| temporary (exact: negation is)."""
    return float(max(x.max(), -x.min())) if x.size else 0.0


@dataclass
class LogitAgreement:
    """A candidate's logits against reference logits, accumulated batch by batch in float64
    (a 1B model's held-out logits do not fit in memory twice over as float64).

    `decided top-1` is the argmax agreement over positions the reference has decided: its
    top-1 − top-2 margin exceeds `z`·√2·σ, σ being the candidate's per-logit error (its
    rel_l2 × rms of the reference), capped at the rel_l2 bound: the noise of the candidate,
    but never more than a passing candidate may have, so a broken candidate cannot shrink
    the set below what the bound allows (and fails the rel_l2 bound anyway). Random-init
    logits are near-flat, so plain top-1 mostly measures ties."""

    diff2: float = 0.0
    ref2: float = 0.0
    out2: float = 0.0
    dot: float = 0.0
    count: int = 0
    margins: list = field(default_factory=list)
    agree: list = field(default_factory=list)

    def add(self, out: np.ndarray, ref: np.ndarray) -> None:
        out = np.asarray(out, dtype=np.float64).reshape(-1, np.shape(out)[-1])
        ref = np.asarray(ref, dtype=np.float64).reshape(-1, np.shape(ref)[-1])
        self.diff2 += float(np.square(out - ref).sum())
        self.ref2 += float(np.square(ref).sum())
        self.out2 += float(np.square(out).sum())
        self.dot += float((out * ref).sum())
        self.count += ref.size
        top2 = np.partition(ref, -2, axis=-1)[:, -2:]
        self.margins.append(top2[:, 1] - top2[:, 0])
        self.agree.append(out.argmax(-1) == ref.argmax(-1))

    @property
    def shape(self) -> list[int]:
        """[positions, vocabulary] seen so far."""
        positions = sum(len(m) for m in self.margins)
        return [positions, self.count // positions if positions else 0]

    def metrics(self, *, rel_l2_bound: float, z: float) -> dict[str, float | None]:
        if not self.margins:  # nothing comparable was produced: every bound fails on None
            return dict.fromkeys(("rel_l2", "cosine", "top1", "decided_top1", "decided_positions", "decided_fraction"))
        margins, agree = np.concatenate(self.margins), np.concatenate(self.agree)
        rel_l2 = float(np.sqrt(self.diff2 / self.ref2)) if self.ref2 else float(np.sqrt(self.diff2))
        sigma = min(rel_l2, rel_l2_bound) * float(np.sqrt(self.ref2 / self.count))
        decided = margins > z * np.sqrt(2.0) * sigma
        norms = np.sqrt(self.out2 * self.ref2)
        return {
            "rel_l2": rel_l2,
            "cosine": self.dot / norms if norms else 1.0,
            "top1": float(agree.mean()),
            "decided_top1": float(agree[decided].mean()) if decided.any() else None,
            "decided_positions": float(decided.sum()),
            "decided_fraction": float(decided.mean()),
        }
