"""The one declaration of a causal LM's inputs, outputs and dynamic dimensions.

DESIGN.md §4 names; this table drives the ONNX dynamic axes, the verification inputs and
the TensorRT optimization profiles (house rule 3: shapes have one source).
"""

from __future__ import annotations

from dataclasses import dataclass

# Dynamic dimensions, by the names used as ONNX dim_params.
BATCH = "batch"
SEQUENCE = "sequence"
PAST = "past_sequence"
TOTAL = "past_sequence + sequence"  # attention_mask length; ONNX writes it as an expression


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name; "float" = the graph's float type
    dims: tuple[str | int, ...]


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> "KVLayout":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
        )

    def inputs(self) -> list[TensorSpec]:
        specs = [
            TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
            TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)),
        ]
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                specs.append(
                    TensorSpec(f"past_key_values.{i}.{kind}", "float", (BATCH, self.num_kv_heads, PAST, self.head_dim))
                )
        return specs

    def outputs(self) -> list[TensorSpec]:
        specs = [TensorSpec("logits", "float", (BATCH, SEQUENCE, self.vocab_size))]
        for i in range(self.num_layers):
            for kind in ("key", "value"):
                specs.append(
                    TensorSpec(f"present.{i}.{kind}", "float", (BATCH, self.num_kv_heads, TOTAL, self.head_dim))
                )
        return specs

    def past_names(self) -> list[str]:
        return [s.name for s in self.inputs() if s.name.startswith("past_key_values.")]

    def present_names(self) -> list[str]:
        return [s.name for s in self.outputs() if s.name.startswith("present.")]


@dataclass(frozen=True)
class ProfileShapes:
    """min/opt/max per input for one TensorRT optimization profile."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def resolve_dims(dims: tuple[str | int, ...], values: dict[str, int]) -> tuple[int, ...]:
    """Concrete sizes of `dims` given a size per dynamic dim, e.g. {BATCH: 2, SEQUENCE: 3, PAST: 5}."""
    out = []
    for d in dims:
        if isinstance(d, int):
            out.append(d)
        elif d == TOTAL:
            out.append(values[PAST] + values[SEQUENCE])
        else:
            out.append(values[d])
    return tuple(out)


def optimization_profiles(
    layout: KVLayout, *, max_batch: int, max_sequence: int, opt_batch: int = 1, opt_sequence: int | None = None
) -> list[ProfileShapes]:
    """Prefill (sequence 1..max, past 0) and decode (sequence 1, past 0..max-1), DESIGN.md §5.

    Shapes come from `layout.inputs()`, the same declaration that names the ONNX axes, so
    a new input cannot be missing from a profile.
    """
    opt_sequence = opt_sequence or max(1, max_sequence // 2)
    ranges = {
        "prefill": {
            BATCH: (1, opt_batch, max_batch),
            SEQUENCE: (1, opt_sequence, max_sequence),
            PAST: (0, 0, 0),
        },
        "decode": {
            BATCH: (1, opt_batch, max_batch),
            SEQUENCE: (1, 1, 1),
            # opt within 0..max-1, also when max_sequence is 1 (decode past is then 0 only)
            PAST: (0, min(opt_sequence, max_sequence - 1), max_sequence - 1),
        },
    }
    profiles = []
    for name, dims in ranges.items():
        shapes = {}
        for spec in layout.inputs():
            pick = [{k: v[i] for k, v in dims.items()} for i in range(3)]
            shapes[spec.name] = tuple(resolve_dims(spec.dims, p) for p in pick)
        profiles.append(ProfileShapes(name, shapes))
    return profiles
