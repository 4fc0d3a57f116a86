"""Run a .tflite artifact with the LiteRT interpreter, taking NCHW feeds like every backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from deploykit.backend import Runner, check_feeds
from deploykit.errors import BackendUnavailable
from deploykit_tflite.lowering import NCHW_TO_NHWC, NHWC_TO_NCHW, safe_name

INSTALL_HINT = "pip install 'deploykit[tflite]'"


def interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise BackendUnavailable(f"ai_edge_litert is not importable ({exc}); install it: {INSTALL_HINT}") from None
    return Interpreter



def set_input(interpreter: Any, detail: Mapping[str, Any], x: np.ndarray, nhwc: bool) -> None:
    """Feed one model input as the artifact expects it: ids and masks (int64 / int32 / bool) as
    given, float images NCHW -> NHWC when the model was lowered NHWC, int8 inputs quantized with
    the input tensor's own scale and zero point."""
    if detail["dtype"] not in (np.int8, np.float32):
        interpreter.set_tensor(detail["index"], np.ascontiguousarray(x, dtype=detail["dtype"]))
        return
    x = x.astype(np.float32)
    if x.ndim == 4 and nhwc:
        x = x.transpose(NCHW_TO_NHWC)
    if detail["dtype"] == np.int8:
        scale, zero_point = detail["quantization"]
        x = np.clip(np.round(x / scale) + zero_point, -128, 127)
    interpreter.set_tensor(detail["index"], np.ascontiguousarray(x, dtype=detail["dtype"]))

class LiteRTRunner(Runner):
    """NCHW in, canonical output order out. 4-D tensors are transposed to/from NHWC, int8 I/O is
    quantized/dequantized with the tensor's own parameters (round half to even, as onnxruntime).
    A batch other than the compiled one resizes the interpreter, or runs one compiled batch at
    a time when the model cannot be resized."""

    def __init__(self, path: Path, input_names: Sequence[str], output_names: Sequence[str], threads: int = 0,
                 nhwc: bool = True) -> None:
        self.path = Path(path)
        self.nhwc = nhwc  # False for an encoder lowered in ONNX axis order (4-D attention tensors)
        self.threads = threads or None
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        # batch size -> (interpreter allocated for it, input details, output details)
        self._interpreters: dict[int, tuple[Any, list[dict], list[dict]]] = {}
        base = self._new()
        if not self.input_names:  # an artifact without metadata: the signature's (sanitised ONNX) names
            sig = base._get_full_signature_list().get("serving_default", {})
            self.input_names = list(sig.get("inputs", {})) or [d["name"] for d in base.get_input_details()]
        self.compiled_batch = int(base.get_input_details()[0]["shape"][0])
        self._interpreters[self.compiled_batch] = (base, *self._io(base))
        self._cannot_resize = False

    def _new(self):
        it = interpreter_class()(model_path=str(self.path), num_threads=self.threads)
        it.allocate_tensors()
        return it

    def _io(self, it) -> tuple[list[dict], list[dict]]:
        """Input/output details in canonical order (signature names are the sanitised ONNX names)."""
        ins, outs = it.get_input_details(), it.get_output_details()
        sig = it._get_full_signature_list().get("serving_default")
        if sig:
            by_index_in = {d["index"]: d for d in ins}
            by_index_out = {d["index"]: d for d in outs}
            named = sig["inputs"]
            if all(safe_name(n) in named for n in self.input_names):
                ins = [by_index_in[named[safe_name(n)]] for n in self.input_names]
            outputs = sig["outputs"]
            keys = sorted(outputs, key=lambda k: int(k.rsplit("_", 1)[-1]) if k.rsplit("_", 1)[-1].isdigit() else 0)
            outs = [by_index_out[outputs[k]] for k in keys]
        return ins, outs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        check_feeds(self.input_names, feeds)
        batch = int(np.asarray(feeds[self.input_names[0]]).shape[0])
        if batch in self._interpreters:
            interpreter, ins, outs = self._interpreters[batch]
            return self._invoke(interpreter, ins, outs, feeds)
        if not self._cannot_resize:
            got = self._resized(batch, feeds)
            if got is not None:
                return got
        return self._run_chunks(feeds, batch)  # not resizable: run compiled-size chunks

    def _resized(self, batch: int, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray] | None:
        """Run on an interpreter resized to ``batch``, and keep it only if its first and last
        samples equal the compiled batch's: a Reshape with the batch baked in can resize without
        an error and mix samples (an encoder's attention reshapes do)."""
        it = self._new()
        try:
            for d in it.get_input_details():
                it.resize_tensor_input(d["index"], [batch, *d["shape"][1:]], strict=False)
            it.allocate_tensors()
            ins, outs = self._io(it)
            got = self._invoke(it, ins, outs, feeds)
            if any(o.ndim == 0 or o.shape[0] != batch for o in got):
                raise ValueError("output batch does not follow the input batch")
            step = self.compiled_batch
            for part in ((slice(0, step), slice(batch - step, batch)) if batch >= step else ()):
                base, base_ins, base_outs = self._interpreters[step]
                want = self._invoke(base, base_ins, base_outs, {k: np.asarray(v)[part] for k, v in feeds.items()})
                if not all(np.allclose(a[part], b, rtol=1e-4, atol=1e-5 * (np.abs(b).max() + 1))
                           for a, b in zip(got, want)):
                    raise ValueError("resized interpreter does not reproduce the compiled batch")
        except (ValueError, RuntimeError):
            self._cannot_resize = True
            return None
        self._interpreters[batch] = (it, ins, outs)
        return got

    def _run_chunks(self, feeds: Mapping[str, np.ndarray], batch: int) -> list[np.ndarray]:
        compiled = self._interpreters[self.compiled_batch]
        step = self.compiled_batch
        parts: list[list[np.ndarray]] = []
        for start in range(0, batch, step):
            chunk = {k: np.asarray(v)[start:start + step] for k, v in feeds.items()}
            n = next(iter(chunk.values())).shape[0]
            if n < step:  # pad the last chunk to the compiled batch
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - n, axis=0)]) for k, v in chunk.items()}
            got = self._invoke(compiled[0], compiled[1], compiled[2], chunk)
            parts.append([o[:n] for o in got])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def _invoke(self, it, ins: list[dict], outs: list[dict], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for name, d in zip(self.input_names, ins):
            set_input(it, d, np.asarray(feeds[name]), self.nhwc)
        it.invoke()
        results = []
        for d in outs:
            y = it.get_tensor(d["index"])
            if d["dtype"] == np.int8:
                scale, zero_point = d["quantization"]
                y = (y.astype(np.float32) - zero_point) * np.float32(scale)
            if y.ndim == 4 and self.nhwc:
                y = y.transpose(NHWC_TO_NCHW)
            results.append(np.ascontiguousarray(y, dtype=np.float32))
        return results
