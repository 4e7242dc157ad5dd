"""The one declaration of a model's inputs, outputs and dynamic dimensions.

Built-in causal LMs: KVLayout (DESIGN.md §4 names). Custom modules (`--inputs SPEC.yaml`,
exporters/sources/custom): DeclaredIO, the same TensorSpec records plus a range per dynamic
dim and a value range / distribution per input. Either one drives the ONNX dynamic axes,
the verification inputs and the TensorRT optimization profiles (house rule 3: shapes have
one source); `optimization_profiles` takes both.
"""

from __future__ import annotations

from dataclasses import dataclass

# model_types whose positions index a learned table (GPT-2's wpe): no position past the
# table exists, so generation past it must crop the context (nanoGPT's sample.py does).
# Every other supported architecture is rotary: any position computes, but none past
# max_position_embeddings was trained.
LEARNED_POSITIONS = frozenset({"gpt2"})

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
    values: tuple[float, float] | None = None  # integer inputs: [low, high) of the ids
    distribution: str = "normal"  # float inputs: "normal" (mean 0, std 1) or "uniform" ([-1, 1))


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None = None  # n_positions / max_position_embeddings; None = unbounded
    learned_positions: bool = False  # True: a position ≥ max_positions has no embedding at all

    @classmethod
    def from_config(cls, config) -> "KVLayout":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            max_positions=max_positions(config),
            learned_positions=getattr(config, "model_type", None) in LEARNED_POSITIONS,
        )

    def fit(self, wanted: int, *, used: int = 0) -> int:
        """`wanted` positions, fewer when `used` + `wanted` would pass the model's positions."""
        if self.max_positions is None:
            return wanted
        return max(0, min(wanted, self.max_positions - used))

    def inputs(self) -> list[TensorSpec]:
        specs = [
            TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
            TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),
            TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)),
        ]
        return specs + self._kv_specs("past_key_values", PAST)

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("logits", "float", (BATCH, SEQUENCE, self.vocab_size)), *self._kv_specs("present", TOTAL)]

    def _kv_specs(self, prefix: str, length: str) -> list[TensorSpec]:
        """`prefix`.{layer}.key / .value for every layer, `length` positions long."""
        return [TensorSpec(f"{prefix}.{i}.{kind}", "float", (BATCH, self.num_kv_heads, length, self.head_dim))
                for i in range(self.num_layers) for kind in ("key", "value")]

    def past_names(self) -> list[str]:
        return [s.name for s in self.inputs() if s.name.startswith("past_key_values.")]

    def present_names(self) -> list[str]:
        return [s.name for s in self.outputs() if s.name.startswith("present.")]


@dataclass(frozen=True)
class ProfileShapes:
    """min/opt/max per input for one TensorRT optimization profile."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def max_positions(config) -> int | None:
    """The model's position count from its config (GPT-2 names it n_positions)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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
    layout, *, max_batch: int = 0, max_sequence: int = 0, opt_batch: int = 1, opt_sequence: int | None = None
) -> list[ProfileShapes]:
    """Prefill (sequence 1..max, past 0) and decode (sequence 1, past 0..max-1), DESIGN.md §5.

    Shapes come from `layout.inputs()`, the same declaration that names the ONNX axes, so
    a new input cannot be missing from a profile. A DeclaredIO gives one profile from its
    own dim ranges (the max_* arguments do not apply to it).
    """
    if isinstance(layout, DeclaredIO):
        return [layout.profile()]
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


@dataclass(frozen=True)
class DimRange:
    """A named dynamic dimension and the sizes it may take (TensorRT's min/opt/max)."""

    name: str
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class DeclaredIO:
    """Inputs and outputs declared as data for a module exportline has no table for.

    `dims` bounds every named dim; dims of outputs that no input has are found by tracing
    (written as `name` in the graph, checked against the reference, never fed)."""

    dims: tuple[DimRange, ...]
    input_specs: tuple[TensorSpec, ...]
    output_specs: tuple[TensorSpec, ...]

    def inputs(self) -> list[TensorSpec]:
        return list(self.input_specs)

    def outputs(self) -> list[TensorSpec]:
        return list(self.output_specs)

    def dim(self, name: str) -> DimRange:
        return next(d for d in self.dims if d.name == name)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """optimum's form: {"input_ids": {0: "batch", 1: "sequence"}}, inputs and outputs."""
        return {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)}
                for s in (*self.input_specs, *self.output_specs)}

    def trace_sizes(self) -> dict[str, int]:
        """A size per dim to trace with: opt, moved off 0/1 and off another dim's size so
        torch.export neither specializes a dim nor takes two dims for one."""
        sizes: dict[str, int] = {}
        for d in self.dims:
            size = max(d.opt, min(2, d.max))
            while size in sizes.values() and size < d.max:
                size += 1
            sizes[d.name] = size
        return sizes

    def case_sizes(self) -> list[dict[str, int]]:
        """Sizes to verify on: every dim at its min, max and a middle size that is not the
        traced one (the others at their traced size), plus all dims at max together."""
        traced = self.trace_sizes()
        seen, out = set(), []
        for d in self.dims:
            middle = next((v for v in range((d.min + d.max) // 2, d.max + 1) if v != traced[d.name]), d.max)
            for value in (d.min, middle, d.max):
                sizes = {**traced, d.name: value}
                key = tuple(sorted(sizes.items()))
                if key not in seen:
                    seen.add(key)
                    out.append(sizes)
        widest = {d.name: d.max for d in self.dims}
        if tuple(sorted(widest.items())) not in seen:
            out.append(widest)
        return out

    def sample(self, sizes: dict[str, int], seed: int = 0) -> dict:
        """Seeded inputs of the given sizes: ids uniform in their value range, floats from
        their distribution."""
        import numpy as np

        rng = np.random.default_rng(seed)
        feed = {}
        for spec in self.input_specs:
            shape = resolve_dims(spec.dims, sizes)
            if spec.dtype.startswith(("int", "uint", "bool")):
                low, high = spec.values or (0, 2)
                feed[spec.name] = rng.integers(int(low), int(high), size=shape).astype(spec.dtype)
            elif spec.distribution == "uniform":
                feed[spec.name] = rng.uniform(-1.0, 1.0, size=shape).astype(spec.dtype)
            else:
                feed[spec.name] = rng.standard_normal(size=shape).astype(spec.dtype)
        return feed

    def profile(self) -> ProfileShapes:
        shapes = {}
        for spec in self.input_specs:
            pick = [{d.name: (d.min, d.opt, d.max)[i] for d in self.dims} for i in range(3)]
            shapes[spec.name] = tuple(resolve_dims(spec.dims, p) for p in pick)
        return ProfileShapes("declared", shapes)

    def to_dict(self) -> dict:
        return {
            "dims": {d.name: {"min": d.min, "opt": d.opt, "max": d.max} for d in self.dims},
            # lists, not mappings: the order is the forward's argument order, and JSON
            # writers that sort keys (config.json, manifest.json) must not change it
            "inputs": [{"name": s.name, **_spec_dict(s)} for s in self.input_specs],
            "outputs": [{"name": s.name, **_spec_dict(s)} for s in self.output_specs],
        }


def _spec_dict(spec: TensorSpec) -> dict:
    out: dict = {"dtype": spec.dtype, "shape": list(spec.dims)}
    if spec.values is not None:
        out["values"] = list(spec.values)
    elif not spec.dtype.startswith(("int", "uint", "bool")):
        out["distribution"] = spec.distribution
    return out


INPUT_DTYPES = ("float32", "float64", "int64", "int32", "bool")


def declared_io(data: dict, *, where: str = "--inputs") -> DeclaredIO:
    """The input spec (YAML/JSON already parsed) → DeclaredIO; every mistake is one line
    naming the entry. Form: {dims: {batch: {min, opt, max}}, inputs: {name: {dtype, shape,
    values | distribution}}, outputs: {name: {shape}}}."""
    from exportline.exporters.core.errors import ConfigError

    if not isinstance(data, dict) or not all(isinstance(data.get(k), (dict, list)) for k in ("inputs", "outputs")):
        raise ConfigError(f"{where}: needs `dims:`, `inputs:` and `outputs:` mappings (see README, 'Your own nn.Module')")
    dims = []
    for name, r in (data.get("dims") or {}).items():
        try:
            low, high = int(r["min"]), int(r["max"])
            d = DimRange(str(name), low, int(r.get("opt", (low + high) // 2)), high)
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"{where}: dim {name!r} needs integer min and max (opt optional)") from None
        if not 1 <= d.min <= d.opt <= d.max:
            raise ConfigError(f"{where}: dim {name!r} needs 1 <= min <= opt <= max, got {d.min}/{d.opt}/{d.max}")
        dims.append(d)
    known = {d.name for d in dims}
    specs = {"inputs": [], "outputs": []}
    for part in specs:
        for name, entry in _entries(data[part], part=part, where=where):
            specs[part].append(_tensor_spec(name, entry, known, part=part, where=where))
    if not specs["inputs"] or not specs["outputs"]:
        raise ConfigError(f"{where}: declare at least one input and one output")
    return DeclaredIO(tuple(dims), tuple(specs["inputs"]), tuple(specs["outputs"]))


def _entries(table, *, part: str, where: str) -> list[tuple[str, dict]]:
    """`{name: {...}}` (YAML order) or `[{name: ..., ...}]` → (name, entry) in order."""
    from exportline.exporters.core.errors import ConfigError

    if isinstance(table, dict):
        return [(str(k), dict(v or {})) for k, v in table.items()]
    if not all(isinstance(e, dict) and "name" in e for e in table):
        raise ConfigError(f"{where}: every entry of {part}: needs a name")
    return [(str(e["name"]), {k: v for k, v in e.items() if k != "name"}) for e in table]


def _tensor_spec(name: str, entry: dict, known: set[str], *, part: str, where: str) -> TensorSpec:
    from exportline.exporters.core.errors import ConfigError

    dtype = str(entry.get("dtype", "float32"))
    shape = entry.get("shape")
    if dtype not in INPUT_DTYPES:
        raise ConfigError(f"{where}: {part} {name!r} dtype {dtype!r}; use one of {', '.join(INPUT_DTYPES)}")
    if not isinstance(shape, list) or not shape:
        raise ConfigError(f"{where}: {part} {name!r} needs `shape: [dim, ...]` (names of dims or sizes)")
    unknown = [d for d in shape if isinstance(d, str) and d not in known and part == "inputs"]
    if unknown:
        raise ConfigError(f"{where}: input {name!r} uses dim {unknown[0]!r}, which `dims:` does not declare")
    values = entry.get("values")
    if dtype.startswith(("int", "bool")) and part == "inputs":
        if not (isinstance(values, list) and len(values) == 2 and values[0] < values[1]):
            raise ConfigError(f"{where}: integer input {name!r} needs `values: [low, high)`, e.g. [0, vocab_size]")
        values = (values[0], values[1])
    distribution = str(entry.get("distribution", "normal"))
    if distribution not in ("normal", "uniform"):
        raise ConfigError(f"{where}: {part} {name!r} distribution {distribution!r}; use normal or uniform")
    dims = tuple(d if isinstance(d, str) else int(d) for d in shape)
    return TensorSpec(name, dtype, dims, values if part == "inputs" else None, distribution)
