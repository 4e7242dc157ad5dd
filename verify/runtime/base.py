"""The runner contract, after Polygraphy: a cheap constructor, `activate()` acquires the
session / engine / device, `infer(feed)` maps input names to arrays, `deactivate()` frees.

Feeds and outputs use the ONNX names of exporters/shapes.py (`input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value` → `logits`, `present.{i}.key|value`), so
verify, generate and bench drive every backend with the same code.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np


class Runner(abc.ABC):
    name: str = "runner"

    def __init__(self) -> None:
        self.is_active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def activate(self) -> None:
        if not self.is_active:
            self.activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: call activate() (or use `with`) before infer()")
        return self.infer_impl(feed)

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
