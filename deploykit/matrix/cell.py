"""One cell of a benchmark matrix: a model on a target at one batch size and precision.

Defined once here; the history stores :meth:`Cell.to_json`, every renderer and ``compare``
read it back with :meth:`Cell.from_json`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

CellStatus = Literal["ok", "error", "not_run"]

#: FP32 median latency over INT8 (or FP16) median latency, per round, same runtime and batch
SPEEDUP_DEFINITION = ("speed-up = the same runtime's FP32 p50 / this cell's p50, computed per interleaved "
                      "round at the same batch size (median over rounds)")


@dataclass
class Cell:
    model: str
    target: str
    backend: str
    device: str
    batch_size: int
    precision: str  # fp32 | fp16 | int8
    status: CellStatus = "ok"
    error: str = ""  # why it errored or was not run
    # latency, milliseconds per call at batch_size; p50 = median of the round medians
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    spread: float | None = None  # (max - min) of the round medians / p50
    round_ms: list[float] = field(default_factory=list)
    calls_per_round: int = 0
    throughput: float | None = None  # samples per second at p50
    memory_mb: float | None = None  # peak resident memory over the group's baseline
    # against the same runtime's FP32, measured in the same rounds
    speedup: float | None = None
    speedup_spread: float | None = None
    fp32_p50_ms: float | None = None
    # this process's CPU time per call (all threads), median over rounds, and FP32's over INT8's per
    # round: the work, which other processes' load does not stretch (a descheduled call uses no CPU)
    cpu_ms: float | None = None
    cpu_speedup: float | None = None
    # accuracy on the evaluation data (against onnxruntime FP32 and the labels)
    top1_agreement: float | None = None
    cosine: float | None = None
    accuracy: float | None = None
    fp32_accuracy: float | None = None
    eval_samples: int = 0
    guard: str = ""  # performance guard: why this INT8 cell is not faster than FP32
    note: str = ""  # what a reader should know besides (e.g. why the guard held back)
    artifact: dict[str, Any] = field(default_factory=dict)  # key, path, rebuilt, checks
    env: dict[str, Any] = field(default_factory=dict)  # cpu, cores, threads, os, versions, load average
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.target}/b{self.batch_size}/{self.precision}"

    def to_json(self) -> dict[str, Any]:
        """Strict JSON: NaN and infinities become null."""
        cleaned: dict[str, Any] = _clean(dataclasses.asdict(self))
        return cleaned

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Cell:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
