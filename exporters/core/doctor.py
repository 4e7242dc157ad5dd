"""`exportline doctor`: what this machine can run, each missing piece "not available"."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not available: not installed"


def gpu_description() -> str:
    try:
        import torch
    except ImportError:
        return "not available: torch not installed"
    if not torch.cuda.is_available():
        return "not available: no CUDA GPU visible to torch"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} (sm{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"


def onnxruntime_providers() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not available: onnxruntime not installed"
    return ", ".join(onnxruntime.get_available_providers())


def tensorrt_version() -> str:
    try:
        import tensorrt
    except ImportError:
        return "not available: tensorrt not installed (pip install 'exportline[gpu]' on a GPU host)"
    except Exception as exc:  # the PyPI stub raises at import when its libs are missing
        return f"not available: tensorrt failed to import ({type(exc).__name__})"
    return tensorrt.__version__


def environment_report() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "exportline": _version("exportline"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
        "onnxruntime": _version("onnxruntime"),
        "onnxruntime providers": onnxruntime_providers(),
        "tensorrt": tensorrt_version(),
        "cuda-python": _version("cuda-python"),
        "gpu": gpu_description(),
    }
