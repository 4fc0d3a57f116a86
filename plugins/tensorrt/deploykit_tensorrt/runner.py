"""Runs a TensorRT engine: Polygraphy deserializes it and owns the GPU buffers and stream;
cuda-python's CUDA events time the engine's kernels.

``last_gpu_ms`` is read by the core (and bench/tensorrt_latency.py) beside its own end-to-end
latency: the GPU time of the last ``run()``, between CUDA events recorded on the stream right
before and after ``execute_async_v3`` (the engine's kernels only, no host<->device copies).
``last_e2e_ms`` is the wall time of the same call, copies and synchronisation included.
Polygraphy's TrtRunner is not used for the call itself because its ``infer()`` sets shapes and
addresses between any events we could record around it, which would count host work as GPU time.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from deploykit.backend import Runner, check_feeds
from deploykit.errors import BackendUnavailable


class _GpuTimer:
    """Two CUDA events on one stream (cuda-python's runtime bindings)."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart  # older cuda-python
        self._rt = cudart
        self._start = self._ok(cudart.cudaEventCreate())
        self._stop = self._ok(cudart.cudaEventCreate())
        self._elapsed = getattr(cudart, "cudaEventElapsedTime", None) or cudart.cudaEventElapsedTime_v2

    def _ok(self, result):
        err, *value = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA runtime error {err}")
        return value[0] if value else None

    def start(self, stream: int) -> None:
        self._ok(self._rt.cudaEventRecord(self._start, stream))

    def stop(self, stream: int) -> None:
        self._ok(self._rt.cudaEventRecord(self._stop, stream))

    def elapsed_ms(self) -> float:
        self._ok(self._rt.cudaEventSynchronize(self._stop))
        return float(self._ok(self._elapsed(self._start, self._stop)))

    def close(self) -> None:
        for event in (self._start, self._stop):
            self._rt.cudaEventDestroy(event)


class TensorRTRunner(Runner):
    """Feeds NCHW numpy arrays by the canonical model's input names; returns outputs in its order."""

    def __init__(self, engine: bytes, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        try:
            import tensorrt as trt
            from polygraphy import cuda
            from polygraphy.backend.trt import EngineFromBytes
        except ImportError as exc:
            raise BackendUnavailable(f"the TensorRT runner needs tensorrt and polygraphy ({exc}); "
                                     "pip install 'deploykit[tensorrt]'") from None
        self.input_names, self.output_names = list(inputs), list(outputs)
        try:
            self._engine = EngineFromBytes(engine)()
        except Exception as exc:  # Polygraphy raises its own exception type on a failed deserialisation
            said = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackendUnavailable(f"TensorRT could not deserialize the engine ({said}): it was probably built by "
                                     "another TensorRT version or for another GPU; rebuild it here") from None
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
                        for n in self.input_names + self.output_names}
        self._buffers = {n: cuda.DeviceArray(dtype=self._dtypes[n]) for n in self.input_names + self.output_names}
        try:
            self._timer: _GpuTimer | None = _GpuTimer()
        except ImportError:  # cuda-python missing: results still come, only GPU time is not measured
            self._timer = None
        self.last_gpu_ms: float | None = None
        self.last_e2e_ms: float | None = None

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.input_names, feeds)
        start = time.perf_counter()
        stream = self._stream
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            device = self._buffers[name].resize(host.shape).copy_from(host, stream)
            if not self._context.set_input_shape(name, host.shape):
                raise ValueError(f"input '{name}' shape {host.shape} is outside the engine's optimisation profile")
            self._context.set_tensor_address(name, device.ptr)
        hosts = []
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            self._context.set_tensor_address(name, self._buffers[name].resize(shape).ptr)
            hosts.append(np.empty(shape, self._dtypes[name]))
        if self._timer is not None:
            self._timer.start(stream.ptr)
        if not self._context.execute_async_v3(stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed; see TensorRT's log")
        if self._timer is not None:
            self._timer.stop(stream.ptr)
        for name, host in zip(self.output_names, hosts):
            self._buffers[name].copy_to(host, stream)
        stream.synchronize()
        self.last_gpu_ms = self._timer.elapsed_ms() if self._timer is not None else None
        self.last_e2e_ms = (time.perf_counter() - start) * 1e3
        return hosts

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()
        if self._timer is not None:
            self._timer.close()
        self._stream.free()
