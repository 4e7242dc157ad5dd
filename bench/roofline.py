"""Roofline ceilings measured on this GPU, and the work model of each point.

Decode is bandwidth-bound: a step must read every weight it multiplies plus the KV cache,
so its floor is (weight bytes + KV bytes) ÷ measured device bandwidth. Prefill is
compute-bound: ≈ 2 × params × tokens (matmuls) + attention FLOPs, against the measured
fp16/bf16 matmul peak. Both ceilings are measured once per run, never taken from a spec
sheet; on CPU nothing is measured and the report says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from exportline.bench.workloads import Point
from exportline.exporters.core.shapes import KVLayout

CPU_RUN = "not measured: CPU run"
# Bytes per weight/KV element by backend precision; int8 keeps KV and norms in float, so
# its KV bytes are fp32 and only the (dominant) matmul weights shrink.
WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 4}


@dataclass(frozen=True)
class ModelCost:
    """What the work model needs of a model; counted from its config on the meta device."""

    params: int  # every parameter
    matmul_params: int  # params touched by matmuls per token (input embedding is a gather)
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict:
        return asdict(self)

    def flops(self, point: Point) -> float:
        """Prefill FLOPs: 2·matmul_params per token, plus QKᵀ and AV over the full (not
        causally halved) seq×seq score matrix: 4 · layers · batch · seq² · hidden."""
        tokens = point.batch * point.length
        attention = 4 * self.num_layers * point.batch * point.length**2 * self.hidden_size
        return 2.0 * self.matmul_params * tokens + attention

    def decode_bytes(self, point: Point, precision: str) -> float:
        """Bytes one decode step must read: the matmul weights once (shared by the batch) and
        the KV cache of every sequence."""
        kv = 2 * self.num_layers * point.batch * self.num_kv_heads * point.length * self.head_dim
        return self.matmul_params * WEIGHT_BYTES[precision] + kv * KV_BYTES[precision]


def model_cost(config) -> ModelCost:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    # A tied lm_head multiplies by the embedding matrix, so it counts as matmul weight.
    tied = getattr(config, "tie_word_embeddings", False)
    layout = KVLayout.from_config(config)  # the one shape declaration (exporters/shapes.py)
    return ModelCost(
        params=params,
        matmul_params=params if tied else params - embed,
        num_layers=layout.num_layers,
        hidden_size=config.hidden_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
    )


@dataclass(frozen=True)
class Ceilings:
    bandwidth_bytes_per_s: float
    matmul_flops_per_s: float
    matmul_dtype: str
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def measure_ceilings(*, copy_bytes: int = 1 << 30, matmul_n: int = 8192, repeat: int = 10) -> Ceilings:
    """Device-to-device copy bandwidth (read + write counted) and dense matmul throughput."""
    import torch

    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy_s = _best_of(lambda: dst.copy_(src), repeat)  # noqa: F821 (called before the del)
    del src, dst
    a = torch.randn(matmul_n, matmul_n, dtype=dtype, device="cuda")
    b = torch.randn(matmul_n, matmul_n, dtype=dtype, device="cuda")
    matmul_s = _best_of(lambda: a @ b, repeat)  # noqa: F821 (called before the del)
    del a, b
    torch.cuda.empty_cache()
    return Ceilings(
        bandwidth_bytes_per_s=2 * copy_bytes / copy_s,
        matmul_flops_per_s=2 * matmul_n**3 / matmul_s,
        matmul_dtype=str(dtype).removeprefix("torch."),
        method=(
            f"best of {repeat}: {copy_bytes >> 20} MiB device-to-device copy (bytes read + written); "
            f"{matmul_n}×{matmul_n} {str(dtype).removeprefix('torch.')} matmul"
        ),
    )


def _best_of(fn, repeat: int) -> float:
    """The fastest of `repeat` synchronized runs after two warm-ups: a ceiling is the best
    the device can do, so the minimum (not the median) is the right statistic."""
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def percent_of_roofline(point: Point, median_s: float, *, cost: ModelCost, ceilings: Ceilings, precision: str) -> dict:
    """% of the ceiling the point reached, with the model figures it rests on."""
    if point.workload == "prefill":
        flops = cost.flops(point)
        ideal_s = flops / ceilings.matmul_flops_per_s
        return {"bound": "compute", "flops": flops, "ideal_s": ideal_s, "percent": 100 * ideal_s / median_s}
    if point.workload == "decode":
        nbytes = cost.decode_bytes(point, precision)
        ideal_s = nbytes / ceilings.bandwidth_bytes_per_s
        return {"bound": "bandwidth", "bytes": nbytes, "ideal_s": ideal_s, "percent": 100 * ideal_s / median_s}
    return {"bound": "none", "percent": None, "note": "end-to-end generate mixes both bounds; see prefill and decode"}
