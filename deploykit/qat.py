"""Quantization-aware training from PyTorch into the canonical model.

    prepared = qat.prepare(model, example_inputs, calib)      # fake quantization, PTQ start point
    ...train prepared.module in your own loop, or:
    qat.distill(prepared, data, steps=300, lr=1e-5)           # label-free, from the FP32 model
    qat.export(prepared, "model.qdq.onnx")                    # canonical: build it as it is

It runs on torchao's PT2E flow (``prepare_qat_pt2e`` / ``convert_pt2e``; torch 2.13 has no
other supported QAT path that survives the dynamo ONNX exporter) with deploykit's own
:class:`CanonicalQuantizer`, which annotates the exported torch graph by the rules of
deploykit/canonical.py: inputs of conv/linear/matmul (both inputs of an activation x activation
matmul, zero point 0), the input of pooling over a rank-4 activation, both inputs of a residual
add, Concat inputs when its output is quantized, one shared scale across Concat and
scale-preserving ops (reshape-like ops, max/average pooling); per-channel symmetric
narrow-range [-127, 127] weights on the output-channel axis; per-tensor int8 activations in the
contract's profile. BatchNorm is folded into the convolutions first, as deploykit's
normalisation does, so what trains is what ships.

``prepare`` starts from a PTQ calibration with the build's methods (minmax, percentile,
entropy, mse): observers gather the same statistics as :mod:`deploykit.quantize.observe` on the
float model, and the activation scales are then frozen; weight scales follow the weights as
they train (amax / 127 per channel, the contract's rule). ``export`` converts, exports with
the dynamo exporter and takes the result through :func:`deploykit.quantize.adopt.adopt`: the
written model is canonical (lint clean, method ``qat``, data and source hashes), with the
FP32 teacher beside it as ``<stem>.fp32.onnx``, so ``deploykit build model.qdq.onnx`` lowers it
as given. Untrained, the export equals the PTQ canonical model of the same network.

torch and torchao are optional (``pip install 'deploykit[qat]'``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit import canonical as rules
from deploykit.errors import ConfigError, DataError, DeploykitError
from deploykit.quantize.observe import HIST_BINS, METHODS, TensorStats, needs_histograms

log = logging.getLogger("deploykit")
METHOD = "qat"
LOSSES = ("kl", "mse", "cosine")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise DeploykitError(f"quantization-aware training needs torch: pip install 'deploykit[qat]' ({exc})") from None
    return torch


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao prints warnings about GPU kernels it cannot load on a CPU-only wheel, and the
    exporter prints progress lines: neither says anything to a deploykit user."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _ao() -> Any:
    try:
        with _quiet():
            import torchao.quantization.pt2e as ao
            import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401 -- prepare_qat_pt2e, convert_pt2e
    except ImportError as exc:
        raise DeploykitError(f"quantization-aware training needs torchao: pip install 'deploykit[qat]' ({exc})") from None
    return ao


# --------------------------------------------------------------------------------------
# observers: the statistics of deploykit.quantize.observe, inside the torch graph
# --------------------------------------------------------------------------------------
def _observer_classes() -> tuple[type, type]:
    """(activation observer, weight observer) classes, built on torchao's ObserverBase."""
    torch = _torch()
    ao = _ao()

    class ActivationObserver(ao.ObserverBase):  # type: ignore[misc,name-defined]
        """Exact min/max (pass "ranges"), then a 2048-bin |x| histogram over [0, absmax]
        (pass "histograms"); the scale comes from the calibration method, as in a PTQ build.
        ``matmul_operand``: an input of an activation x activation matmul, whose zero point the
        contract decides (canonical.zero_centred), as place.build_table does."""

        def __init__(self, dtype: Any = torch.int8, qscheme: Any = torch.per_tensor_symmetric, quant_min: int = -128,
                     quant_max: int = 127, is_dynamic: bool = False, method: str = "minmax",
                     percentile: float = 99.99, profile: str = rules.SYMMETRIC, matmul_operand: bool = False,
                     **_: Any) -> None:
            super().__init__(dtype=dtype, is_dynamic=is_dynamic)
            self.qscheme, self.quant_min, self.quant_max = qscheme, quant_min, quant_max
            self.method, self.percentile = method, percentile
            self.profile, self.matmul_operand = profile, matmul_operand
            self.stats = TensorStats()
            self.phase = "ranges"
            self.final: tuple[float, int] | None = None

        def forward(self, x: Any) -> Any:
            if self.phase == "ranges":
                finite = x.detach()
                if not torch.isfinite(finite).all():
                    finite = finite[torch.isfinite(finite)]
                    self.stats.nonfinite = True
                if finite.numel():
                    self.stats.min = min(self.stats.min, float(finite.min()))
                    self.stats.max = max(self.stats.max, float(finite.max()))
            elif self.phase == "histograms":
                top = self.stats.absmax
                if self.stats.hist is None:
                    self.stats.hist = np.zeros(HIST_BINS, np.int64)
                if top > 0:
                    mag = x.detach().abs().reshape(-1)
                    mag = mag[torch.isfinite(mag)]
                    idx = torch.clamp((mag * (HIST_BINS / top)).to(torch.int64), max=HIST_BINS - 1)
                    self.stats.hist += torch.bincount(idx, minlength=HIST_BINS).numpy()
            return x

        def params(self) -> tuple[float, int]:
            """(scale, int8 zero point) by the calibration method and the profile."""
            if self.final is not None:
                return self.final
            method = self.method if self.phase == "done" else "minmax"
            amax = METHODS[method](self.stats, percentile=self.percentile)
            if rules.zero_centred(self.profile, self.matmul_operand, self.stats.min):
                return rules.activation_scale(amax), 0
            lo = max(float(self.stats.min), -amax) if np.isfinite(self.stats.min) else 0.0
            hi = min(float(self.stats.max), amax) if np.isfinite(self.stats.max) else 0.0
            return rules.asymmetric_params(lo, hi)

        def calculate_qparams(self, **_: Any) -> tuple[Any, Any]:
            scale, zp = self.params()
            return torch.tensor([scale], dtype=torch.float32), torch.tensor([zp], dtype=torch.int32)

    class WeightObserver(ao.ObserverBase):  # type: ignore[misc,name-defined]
        """Per-channel amax / 127 (1.0 for an all-zero channel), deploykit's quantize_weight."""

        def __init__(self, dtype: Any = torch.int8, qscheme: Any = torch.per_channel_symmetric, quant_min: int = -127,
                     quant_max: int = 127, ch_axis: int = 0, is_dynamic: bool = False, **_: Any) -> None:
            super().__init__(dtype=dtype, is_dynamic=is_dynamic)
            self.qscheme, self.quant_min, self.quant_max, self.ch_axis = qscheme, quant_min, quant_max, ch_axis
            self.register_buffer("amax", torch.ones(1))

        def forward(self, w: Any) -> Any:
            axis = self.ch_axis % w.dim()
            dims = [d for d in range(w.dim()) if d != axis]
            self.amax = w.detach().abs().amax(dim=dims) if dims else w.detach().abs()
            return w

        def calculate_qparams(self, **_: Any) -> tuple[Any, Any]:
            amax = self.amax.to(torch.float32)
            scale = torch.where(amax > 0, amax / rules.INT8_MAX, torch.ones_like(amax))
            return scale, torch.zeros_like(scale, dtype=torch.int32)

    return ActivationObserver, WeightObserver


# --------------------------------------------------------------------------------------
# the quantizer: the canonical placement rules on the aten graph
# --------------------------------------------------------------------------------------
def _aten_sets() -> dict[str, frozenset[Any]]:
    torch = _torch()
    aten = torch.ops.aten

    def ops(*names: str) -> frozenset[Any]:
        out = set()
        for name in names:
            packet, _, overload = name.partition(".")
            if hasattr(aten, packet):
                op = getattr(aten, packet)
                if hasattr(op, overload or "default"):
                    out.add(getattr(op, overload or "default"))
        return frozenset(out)

    return {
        "conv": ops("conv1d.default", "conv2d.default", "conv3d.default", "convolution.default",
                    "conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"),
        "linear": ops("linear.default"),
        "matmul": ops("matmul.default", "bmm.default", "mm.default"),
        "pool": ops("max_pool2d.default", "avg_pool2d.default", "adaptive_avg_pool2d.default", "mean.dim",
                    "max_pool2d_with_indices.default", "_adaptive_avg_pool2d.default"),
        # output scale = input scale (deploykit.canonical.SCALE_PRESERVING_OPS as aten ops)
        "preserving": ops("max_pool2d.default", "avg_pool2d.default", "adaptive_avg_pool2d.default",
                          "_adaptive_avg_pool2d.default", "view.default", "reshape.default", "_unsafe_view.default",
                          "permute.default", "transpose.int", "t.default", "flatten.using_ints", "squeeze.dim",
                          "squeeze.dims", "squeeze.default", "unsqueeze.default", "constant_pad_nd.default",
                          "pad.default", "clone.default", "contiguous.default", "dropout.default", "alias.default"),
        "cat": ops("cat.default", "concat.default"),
        "add": ops("add.Tensor"),
        # element-wise ops a conv's output may pass through before a residual add (place._CONV_EPILOGUE)
        "epilogue": ops("relu.default", "relu_.default", "hardtanh.default", "hardtanh_.default", "clamp.default",
                        "leaky_relu.default", "hardswish.default", "hardswish_.default", "sigmoid.default",
                        "mul.Tensor", "silu.default", "batch_norm.default",
                        "_native_batch_norm_legit_no_training.default"),
    }


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return val.dim() if val is not None and hasattr(val, "dim") else None


def _is_weight(node: Any) -> bool:
    return getattr(node, "op", None) == "get_attr"


def _quantizer_class() -> type:
    ao = _ao()
    from torchao.quantization.pt2e.quantizer import (
        QuantizationAnnotation,
        QuantizationSpec,
        Quantizer,
        SharedQuantizationSpec,
    )

    torch = _torch()

    class CanonicalQuantizer(Quantizer):  # type: ignore[misc]
        """Annotates an exported torch graph so the converted model is deploykit's canonical model."""

        def __init__(self, method: str = "minmax", percentile: float = 99.99, activations: str = rules.SYMMETRIC,
                     learn_scales: bool = False, keep_float: Sequence[str] = ()) -> None:
            super().__init__()
            self.keep_float = tuple(keep_float)
            act_obs, w_obs = _observer_classes()
            self.ops = _aten_sets()
            self.learn = learn_scales
            self.act = self._act_spec(act_obs, method, percentile, activations, False)
            self.act_matmul = self._act_spec(act_obs, method, percentile, activations, True)
            self.w_obs = w_obs
            self.weight_specs: dict[int, Any] = {}

        def _weight_spec(self, axis: int) -> Any:
            if axis not in self.weight_specs:
                self.weight_specs[axis] = QuantizationSpec(
                    dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                    ch_axis=axis, is_dynamic=False, observer_or_fake_quant_ctr=ao.FakeQuantize.with_args(
                        observer=self.w_obs, quant_min=-127, quant_max=127, dtype=torch.int8,
                        qscheme=torch.per_channel_symmetric, ch_axis=axis))
            return self.weight_specs[axis]

        def _act_spec(self, obs: type, method: str, percentile: float, profile: str, matmul_operand: bool) -> Any:
            # an attention operand in the asymmetric profile is affine too (its zero point may be -128;
            # torch's LearnableFakeQuantize zeroes a symmetric one), its zero point frozen in prepare()
            scheme = torch.per_tensor_symmetric if profile == rules.SYMMETRIC else torch.per_tensor_affine
            # learnable scales (LSQ, gradients scaled by 1/sqrt(numel * 127)), or fixed after calibration
            ctr, extra = (ao.LearnableFakeQuantize, {"use_grad_scaling": True}) if self.learn else (ao.FakeQuantize, {})
            return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=scheme, is_dynamic=False,
                                    observer_or_fake_quant_ctr=ctr.with_args(
                                        observer=obs, quant_min=-128, quant_max=127, dtype=torch.int8, qscheme=scheme,
                                        method=method, percentile=percentile, profile=profile,
                                        matmul_operand=matmul_operand, **extra))

        def _weight_axis(self, node: Any, weight: Any) -> int:
            rank = _rank(weight) or 2
            if node.target in self.ops["matmul"]:
                return rank - 1  # [.., K, N]: the output channel is the last axis
            if "transpose" in str(node.target):
                return 1 if rank > 1 else 0  # ConvTranspose [C, M/g, ...]: ONNX says axis 0; torch's is 1
            return 0  # conv [M, C/g, ...], linear [N, K]

        def _from_conv(self, node: Any, depth: int = 2) -> bool:
            while node is not None and getattr(node, "op", None) == "call_function" and depth >= 0:
                if node.target in self.ops["conv"]:
                    return True
                if node.target not in self.ops["epilogue"]:
                    return False
                node = node.args[0] if node.args else None
                depth -= 1
            return False

        def annotate(self, model: Any) -> Any:
            graph = model.graph
            wrap: dict[Any, list[tuple[Any, Any]]] = {}  # consumer -> [(input node, spec kind)]
            weights: dict[Any, tuple[Any, int]] = {}
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                t = node.target
                if self.keep_float and (t in self.ops["conv"] or t in self.ops["linear"] or t in self.ops["matmul"]) \
                        and _in_modules(node, self.keep_float):
                    continue  # a float island: float input and weight; the export declares it (adopt)
                if t in self.ops["conv"] or t in self.ops["linear"]:
                    x, w = node.args[0], node.args[1]
                    wrap[node] = [(x, "act")]
                    if _is_weight(w):
                        weights[node] = (w, self._weight_axis(node, w))
                elif t in self.ops["matmul"]:
                    a, b = node.args[0], node.args[1]
                    if _is_weight(b):
                        wrap[node] = [(a, "act")]
                        weights[node] = (b, self._weight_axis(node, b))
                    else:  # activation x activation (attention): both, zero point 0 (or -128, see the observer)
                        wrap[node] = [(a, "matmul"), (b, "matmul")]
                elif t in self.ops["pool"] and _rank(node.args[0]) == 4:
                    if t.__name__.startswith("mean") and not _spatial_mean(node):
                        continue
                    wrap[node] = [(node.args[0], "act")]
                elif t in self.ops["add"] and len(node.args) == 2 and all(hasattr(a, "op") for a in node.args):
                    a, b = node.args
                    if _rank(a) == 4 and _rank(b) == 4 and not (_is_weight(a) or _is_weight(b)) \
                            and (self._from_conv(a) or self._from_conv(b)):
                        wrap[node] = [(a, "act"), (b, "act")]
            changed = True
            while changed:  # a quantized Concat output quantizes its inputs (one shared scale)
                changed = False
                quantized = {x for edges in wrap.values() for x, _ in edges}
                for node in graph.nodes:
                    if node.op == "call_function" and node.target in self.ops["cat"] and node in quantized \
                            and node not in wrap:
                        wrap[node] = [(x, "act") for x in node.args[0] if hasattr(x, "op") and not _is_weight(x)]
                        changed = True
            group_of = self._groups(graph)
            # one fake quantizer per shared-scale group, on its first edge; the matmul operand's
            # zero-point rule (canonical.zero_centred) for the whole group when any member feeds an
            # activation x activation matmul
            matmul_groups = {group_of(x) for edges in wrap.values() for x, kind in edges if kind == "matmul"}
            first: dict[Any, tuple[Any, Any]] = {}  # group root -> the edge holding its fake quantizer
            for node in graph.nodes:
                if node not in wrap and node not in weights:
                    continue
                qmap: dict[Any, Any] = {}
                for x, _ in wrap.get(node, []):
                    root = group_of(x)
                    if root in first:
                        qmap[x] = SharedQuantizationSpec(first[root])
                    else:
                        first[root] = (x, node)
                        qmap[x] = self.act_matmul if root in matmul_groups else self.act
                if node in weights:
                    w, axis = weights[node]
                    qmap[w] = self._weight_spec(axis)
                node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qmap, _annotated=True)
            return model

        def _groups(self, graph: Any) -> Callable[[Any], Any]:
            parent: dict[Any, Any] = {}

            def find(n: Any) -> Any:
                parent.setdefault(n, n)
                while parent[n] is not n:
                    parent[n] = parent[parent[n]]
                    n = parent[n]
                return n

            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                if node.target in self.ops["preserving"] and node.args and hasattr(node.args[0], "op"):
                    parent[find(node)] = find(node.args[0])
                elif node.target in self.ops["cat"]:
                    for x in node.args[0]:
                        if hasattr(x, "op"):
                            parent[find(x)] = find(node)
            return find

        def validate(self, model: Any) -> None:
            pass

    return CanonicalQuantizer


def _in_modules(node: Any, names: Sequence[str]) -> bool:
    """Whether ``node`` of an exported graph was traced inside one of the modules ``names``
    (qualified names, as ``model.named_modules()`` gives them) or a submodule of one."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return any(path == name or path.startswith(name + ".") for path in paths for name in names)


def _spatial_mean(node: Any) -> bool:
    dims = node.args[1] if len(node.args) > 1 else None
    return dims is not None and sorted(int(d) % 4 for d in dims) == [2, 3]


# --------------------------------------------------------------------------------------
# data: arrays, feed dicts, DataSources or iterables of batches
# --------------------------------------------------------------------------------------
Feeds = dict[str, np.ndarray]


def _batches(data: Any, names: Sequence[str], batch_size: int, shuffle: bool = False,
             seed: int = 0) -> Iterator[Feeds]:
    """Feed dicts of at most ``batch_size`` samples from ``data``: an array (one input), a dict
    of arrays, a :class:`deploykit.data.DataSource`, or an iterable of either per batch."""
    for _, feeds in _indexed_batches(data, names, batch_size, shuffle, seed):
        yield feeds


def _indexed_batches(data: Any, names: Sequence[str], batch_size: int, shuffle: bool = False,
                     seed: int = 0) -> Iterator[tuple[np.ndarray | None, Feeds]]:
    """:func:`_batches` with each batch's sample indices when ``data`` is an array or a dict of
    arrays (None for a DataSource or an iterable: no index is known across passes)."""
    from deploykit.data import DataSource

    if isinstance(data, DataSource):
        for batch in data.batches(batch_size):
            yield None, batch.feeds
        return
    if isinstance(data, np.ndarray) or _is_tensor(data):
        data = {names[0]: data}
    if isinstance(data, Mapping):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"qat: data has no array for input(s) {missing}; give a dict keyed by input name")
        n = min(len(a) for a in arrays.values())
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for i in range(0, n, batch_size):
            idx = np.sort(order[i:i + batch_size]) if shuffle else order[i:i + batch_size]
            yield idx, {k: np.ascontiguousarray(arrays[k][idx]) for k in names}
        return
    for item in data:
        for _, feeds in _indexed_batches(item, names, batch_size):
            yield None, feeds


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "numpy")


def _to_torch(feeds: Feeds, names: Sequence[str]) -> tuple[Any, ...]:
    torch = _torch()
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)


# --------------------------------------------------------------------------------------
# prepare / distill / export
# --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A model with the canonical fake quantization, ready to train.

    module: the torch module to train (call it like the original, positional inputs in
    ``input_names`` order). teacher: the FP32 model (BatchNorm folded), never trained.
    calibration: the batches the PTQ start point was calibrated on (the export's table of the
    float tensors the model leaves unquantized comes from them). history: losses of
    :func:`distill` (one per step). teacher_onnx: the teacher's ONNX export, kept by
    :func:`export` for the next export of the same teacher (keyed by :func:`_teacher_key`).
    """

    module: Any
    teacher: Any
    input_names: list[str]
    example_inputs: tuple[Any, ...]
    method: str
    activations: str
    calibration: list[Feeds]
    data_hash: str
    dynamic_sequence: bool = False
    recipe: str = "none"
    history: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    teacher_onnx: tuple[str, bytes] | None = field(default=None, repr=False)

    def parameters(self) -> Iterator[Any]:
        """What a training loop optimises: the weights and biases, and the activation scales when
        prepared with ``learn_scales``."""
        return (p for p in self.module.parameters() if p.requires_grad)

    def scale_parameters(self) -> list[Any]:
        """The learned activation scales and zero points (``learn_scales``) and SmoothQuant factors
        (``learn_smoothing``): what trains at ``distill``'s ``scale_lr``; empty without either."""
        torch = _torch()
        quant = [t for fq in _fake_quants(self.module) for t in (getattr(fq, "scale", None),
                                                                  getattr(fq, "zero_point", None))
                 if isinstance(t, torch.nn.Parameter) and t.requires_grad]
        smoothing = [p for name, p in self.module.named_parameters()
                     if name.startswith(_SMOOTH_PREFIX) and p.requires_grad]
        return quant + smoothing

    def __call__(self, *inputs: Any) -> Any:
        return self.module(*inputs)


def prepare(model: Any, example_inputs: tuple[Any, ...], calib: Any, *, method: str = "minmax",
            percentile: float = 99.99, activations: str = rules.SYMMETRIC, batch_size: int = 8,
            input_names: Sequence[str] | None = None, dynamic_sequence: bool = False,
            learn_scales: bool = False, learn_smoothing: bool = False, recipe: str | None = "auto",
            keep_float: Sequence[str] = ()) -> Prepared:
    """Insert the canonical fake quantization into ``model`` and calibrate it on ``calib``.

    ``example_inputs``: a tuple of tensors (as for torch.export). ``calib``: unlabeled samples
    (an array for a one-input model, a dict of arrays keyed by input name, a DataSource, or an
    iterable of batches). ``method``/``percentile``: the PTQ calibration method that sets the
    starting activation scales (as ``deploykit build --method``). ``activations``: the contract's
    activation profile (symmetric lowers to every backend). ``dynamic_sequence``: dimension 1
    of every input is dynamic too (token sequences). ``learn_scales``: activation scales are
    trained too (LSQ), starting from the calibrated ones; else they stay as calibrated.
    ``learn_smoothing``: SmoothQuant's per-channel factors (the ``x / s`` before each smoothed
    activation's fake quantization) train too, starting from the recipe's; the weights take
    the inverse through their own training. A learned equivalent transformation: it moves
    range between each input channel and its weights where the quantization noise is smaller.
    Exported as the float multiply the canonical model already carries for SmoothQuant.
    ``recipe``: the build's float rewrites applied before the fake quantization, so training
    starts where a PTQ build with that recipe ends: ``smoothquant[:ALPHA]``, ``bias_correction``
    and ``gptq[:DAMPING]`` (the weights start from GPTQ's rounding, then train); ``auto`` (the
    default): ``smoothquant:0.8`` for a transformer (linear layers and LayerNorm; lower than the
    build's 0.9, :data:`QAT_SMOOTHQUANT_ALPHA` says why), the build's ``bias_correction`` for
    other networks; ``none``. ``keep_float``: qualified names of submodules (as
    ``model.named_modules()`` gives them) whose convolutions, linear layers and matmuls stay
    float: float islands, as ``deploykit build --keep-float`` makes; the export declares them.
    """
    torch = _torch()
    ao = _ao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    if method not in METHODS:
        raise ConfigError(f"qat: unknown calibration method '{method}'; use one of {', '.join(METHODS)}")
    if activations not in rules.PROFILES:
        raise ConfigError(f"qat: unknown activation profile '{activations}'; use one of {', '.join(rules.PROFILES)}")
    if not _is_auto(recipe):
        _recipe_steps(recipe, None)  # a step QAT does not apply is refused before the export, not after
    known = {name for name, _ in model.named_modules()}
    unknown = [name for name in keep_float if name not in known or not name]
    if unknown:
        raise ConfigError(f"qat: keep_float names no submodule '{unknown[0]}'; use a name from "
                          f"model.named_modules(), such as '{next((n for n in known if n), '')}'")
    started = time.monotonic()
    example_inputs = tuple(example_inputs)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with _quiet():
        exported = torch.export.export(copy.deepcopy(model).eval(), example_inputs,
                                       dynamic_shapes=_dynamic(example_inputs, dynamic_sequence))
        module = exported.module()
        _fuse_conv_bn_(module)  # BatchNorm folded as deploykit's normalisation does: what trains is what ships
    names = list(input_names or [n.name for n in module.graph.nodes if n.op == "placeholder"])
    batches = list(_batches(calib, names, batch_size))
    if not batches:
        raise DataError("qat.prepare: the calibration data is empty")
    steps = _recipe_steps(recipe, module)
    for step in steps:  # the float rewrites of the build's recipe, before the fake quantization
        if step.name == "smoothquant":
            assert step.value is not None
            smoothed = _smooth_quant(module, batches, names, step.value, learn=learn_smoothing)
            log.debug("qat.prepare: smoothquant:%g on %d activation tensors", step.value, smoothed)
    with _quiet():
        prepared = prepare_qat_pt2e(module, _quantizer_class()(method, percentile, activations, learn_scales,
                                                                     tuple(keep_float)))
    for p in prepared.parameters():
        p.requires_grad_(True)
    observers = _fake_quants(prepared)
    activation = [fq for fq in observers if hasattr(fq.activation_post_process, "stats")]
    from deploykit.progress import bar

    # calibrate on the float model, as a PTQ build does: observers on, fake quantization off
    prepared.apply(ao.disable_fake_quant)
    prepared.apply(ao.enable_observer)
    passes = ["ranges"] + (["histograms"] if needs_histograms(method) else [])
    with torch.no_grad(), _quiet():
        for phase in passes:
            for fq in activation:
                fq.activation_post_process.phase = phase
            with bar(sum(len(next(iter(b.values()))) for b in batches), f"qat: calibrate {phase}", "sample") as b:
                for feeds in batches:
                    prepared(*_to_torch(feeds, names))
                    b.update(len(next(iter(feeds.values()))))
    for fq in activation:  # the method's scales; then frozen, or learned from there (learn_scales)
        obs = fq.activation_post_process
        obs.phase = "done"
        obs.final = obs.params()
        scale, zp = obs.calculate_qparams()
        if isinstance(fq, ao.LearnableFakeQuantize):
            fq._initialize_or_update_qparams(scale, zp)
            fq.enable_range_learning()
            if fq.qscheme == torch.per_tensor_symmetric or obs.matmul_operand:  # 0 or -128 stays
                fq.zero_point.requires_grad_(False)
        else:
            fq.scale.resize_(scale.shape).copy_(scale)
            fq.zero_point.resize_(zp.shape).copy_(zp)
            fq.disable_observer()
    prepared.apply(ao.enable_fake_quant)
    gptq = next((step for step in steps if step.name == "gptq"), None)
    if gptq is not None:  # after placement and scales, as a build
        from deploykit.quantize.recipes import DEFAULT_GPTQ_DAMPING

        damping = DEFAULT_GPTQ_DAMPING if gptq.value is None else float(gptq.value)
        rounded = _gptq(prepared, batches, names, damping)
        log.debug("qat.prepare: gptq:%g on %d linear layers", damping, rounded)
    if any(step.name == "bias_correction" for step in steps):  # after placement and scales, as a build
        corrected = _bias_correction(prepared, batches, names)
        log.debug("qat.prepare: bias_correction on %d layers", corrected)
    data_hash = _data_hash(batches)
    result = Prepared(prepared, teacher, names, example_inputs, method, activations, batches, data_hash,
                      dynamic_sequence, recipe=",".join(str(s) for s in steps) or "none")
    result.seconds["prepare"] = time.monotonic() - started
    log.debug("qat.prepare: %d fake quantizers (%d activation), calibrated on %d samples (%s) in %.1f s",
              len(observers), len(activation), sum(len(next(iter(b.values()))) for b in batches), method,
              result.seconds["prepare"])
    return result


_QAT_STEPS = ("smoothquant", "bias_correction", "gptq")  # the recipe steps prepare applies
# SmoothQuant's alpha that ``auto`` gives a transformer. Lower than the build's 0.9: PTQ can only
# trade activation noise against weight noise once, QAT trains the weights and the activation
# scales, and every point of alpha moves outliers into the weights, whose per-channel amax then
# coarsens the grid of the whole channel. all-MiniLM-L6-v2, one pass of distill over 5,000
# sentences (docs/qat.md): alpha 0.9 starts at 0.9976 and ends at 0.9988; 0.7 starts at 0.9974
# and ends at 0.9989 (training loss 0.00115 -> 0.00102); 0.8 starts at 0.9978 and ends at 0.9990,
# and after two passes at 0.9990 (0.99902 and 0.99901 with two shuffling seeds); 0.5 lets the
# outliers back (0.9979).
QAT_SMOOTHQUANT_ALPHA = 0.8


def _is_auto(spec: str | None) -> bool:
    return spec is not None and spec.strip().lower() == "auto"


def _recipe_steps(spec: str | None, module: Any) -> tuple[Any, ...]:
    """The recipe steps ``prepare`` applies (``auto`` resolved as a build's
    :func:`deploykit.quantize.recipes.resolve_auto` does: a transformer, linear layers and
    LayerNorm, takes SmoothQuant, at QAT's own alpha; any other network bias correction).
    ``module`` (the exported graph) is read only for ``auto``."""
    from deploykit.quantize import recipes

    torch = _torch()
    if _is_auto(spec):
        targets = [n.target for n in module.graph.nodes if n.op == "call_function"]
        linears = sum(1 for t in targets if t == torch.ops.aten.linear.default)
        transformer = linears >= 2 and torch.ops.aten.layer_norm.default in targets
        if transformer:
            spec = f"smoothquant:{QAT_SMOOTHQUANT_ALPHA:g}"
        else:  # the build's weight rounding steps are what training does here: auto keeps the rest
            spec = recipes.format_recipe([s for s in recipes.parse_recipe(recipes.DEFAULT_CNN)
                                          if s.name in _QAT_STEPS and s.name != "gptq"])
    steps = recipes.parse_recipe(spec)
    for step in steps:
        if step.name not in _QAT_STEPS:
            raise ConfigError(f"qat.prepare: recipe step '{step}' is not applied by QAT (training adjusts the "
                              f"weights themselves); use smoothquant[:ALPHA], bias_correction, gptq[:DAMPING], auto "
                              f"or none")
    return tuple(recipes.Step(s.name, recipes.DEFAULT_ALPHA if s.name == "smoothquant" and s.value is None
                              else s.value) for s in steps)


def _record(module: Any, batches: list[Feeds], names: Sequence[str], nodes: Any,
            seen: Callable[[Any, Any], None]) -> None:
    """Run the graph of ``module`` over the calibration ``batches`` (no gradients) and call
    ``seen(node, value)`` with the value of each of ``nodes`` as it is computed: what the
    recipe steps on the torch graph (SmoothQuant, GPTQ, bias correction) measure."""
    torch = _torch()

    class Record(torch.fx.Interpreter):  # type: ignore[misc,name-defined]
        def run_node(self, n: Any) -> Any:
            out = super().run_node(n)
            if n in nodes:
                seen(n, out.detach())
            return out

    with torch.no_grad(), _quiet():
        for feeds in batches:
            Record(module).run(*_to_torch(feeds, names))


def _quantized_layers(module: Any, kinds: Sequence[str] = ("conv", "linear")) -> dict[Any, tuple[Any, Any, Any, Any]]:
    """The conv / linear nodes of the prepared graph reading a fake-quantized input and a
    fake-quantized weight: node -> (raw input x, its fake quantization x_q, weight node, the
    weight's fake quantizer)."""
    ao = _ao()
    ops = _aten_sets()
    fake_quant = {name: m for name, m in module.named_modules() if isinstance(m, ao.FakeQuantizeBase)}
    targets = frozenset().union(*(ops[k] for k in kinds))

    def quantizer(node: Any) -> Any:
        return fake_quant.get(node.target) if getattr(node, "op", None) == "call_module" else None

    layers: dict[Any, tuple[Any, Any, Any, Any]] = {}
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        x_q, w_q = node.args[0], node.args[1]
        if "transpose" in str(node.target) or quantizer(x_q) is None or quantizer(w_q) is None \
                or not _is_weight(w_q.args[0]):
            continue
        layers[node] = (x_q.args[0], x_q, w_q.args[0], quantizer(w_q))
    return layers


def _gptq(module: Any, batches: list[Feeds], names: Sequence[str], damping: float) -> int:
    """GPTQ on the fake-quantized torch graph, as :func:`deploykit.quantize.recipes.gptq` does on
    the canonical model: one pass over the calibration data records, for every linear layer, the
    Gram matrix of its fake-quantized input; each weight is then rounded by
    :func:`deploykit.quantize.recipes.gptq_levels` on its per-channel grid and stored as those
    levels times their scales, so training starts from GPTQ's rounding (kept only where it
    lowers the layer's output error below nearest rounding's). The largest weight of each
    channel keeps its level (+-127), so the channel's scale, amax / 127, stays where it was.
    Returns the number of layers rounded."""
    import operator

    from deploykit.quantize.recipes import gptq_levels

    torch = _torch()
    layers = _quantized_layers(module, ("linear",))
    grams: dict[Any, Any] = {}
    inputs = {deq for _, deq, _, _ in layers.values()}

    def gram(n: Any, out: Any) -> None:
        x = out.reshape(-1, out.shape[-1]).to(torch.float64)
        grams[n] = x.T @ x + grams[n] if n in grams else x.T @ x

    _record(module, batches, names, inputs, gram)
    rounded = 0
    for _, deq, weight_node, _ in layers.values():
        weight = operator.attrgetter(weight_node.target)(module)
        w = weight.detach().to(torch.float64)  # [out N, in K]
        amax = w.abs().amax(1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).numpy()
        wk, h = w.T.numpy(), grams[deq].numpy()
        q = gptq_levels(wk, s, h, damping)
        if q is None:
            continue
        top = np.argmax(np.abs(wk), axis=0)  # per channel: the weight that sets amax keeps +-127
        cols = np.arange(wk.shape[1])
        q[top, cols] = np.clip(np.round(wk[top, cols] / s), -127, 127)
        nearest = np.clip(np.round(wk / s), -127, 127)

        def error(levels: np.ndarray) -> float:
            d = levels * s - wk  # the output error x @ d, its energy through the Gram matrix
            return float(np.sum(d * (h @ d)))  # trace(d^T H d), through BLAS

        if not error(q) < error(nearest):
            continue
        with torch.no_grad():
            weight.copy_(torch.from_numpy((q * s).T).to(weight.dtype))
        rounded += 1
    return rounded


def _bias_correction(module: Any, batches: list[Feeds], names: Sequence[str]) -> int:
    """Empirical bias correction on the fake-quantized torch graph, as
    :func:`deploykit.quantize.recipes.bias_correction` does on the canonical ONNX model: one pass
    over the calibration data records, for every conv/linear layer reading a fake-quantized
    input, the per-channel means of that input before (``x``) and after (``x_q``) its
    quantization; the layer's own error on its output mean, ``W_q * mean(x_q) - W * mean(x)``
    (kernel taps summed, padding ignored, as there), is subtracted from its float bias (a layer
    without a bias gains one). Returns the number of layers corrected."""
    torch = _torch()
    ops = _aten_sets()
    graph = module.graph
    layers = _quantized_layers(module)
    if not layers:
        return 0
    axis = {node: 1 if node.target in ops["conv"] else -1 for node in layers}
    watched: dict[Any, int] = {}
    for node, (raw, deq, _, _) in layers.items():
        watched[raw] = watched[deq] = axis[node]
    sums: dict[Any, Any] = {}
    counts: dict[Any, int] = {}

    def mean(n: Any, out: Any) -> None:
        axis = watched[n] % out.dim()
        dims = [d for d in range(out.dim()) if d != axis]
        total = out.sum(dim=dims, dtype=torch.float64)
        sums[n] = total + sums[n] if n in sums else total
        counts[n] = counts.get(n, 0) + out.numel() // out.shape[axis]

    _record(module, batches, names, watched, mean)
    import operator

    changed = False
    corrected = 0
    for i, (node, (raw, deq, weight_node, w_fq)) in enumerate(layers.items()):
        bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias_node is not None and not _is_weight(bias_node):
            continue
        with torch.no_grad():
            w = operator.attrgetter(weight_node.target)(module).detach()
            wq = w_fq(w).detach()
            m, m_q = sums[raw] / counts[raw], sums[deq] / counts[deq]
            delta = (_through(node, ops, wq, m_q) - _through(node, ops, w, m)).to(torch.float32)
        if bias_node is None:
            attr = f"_deploykit_corrected_bias_{i}"
            module.register_parameter(attr, torch.nn.Parameter(-delta))
            with graph.inserting_before(node):
                got = graph.get_attr(attr)
            args = list(node.args) + [None] * max(0, 3 - len(node.args))
            args[2] = got
            node.args = tuple(args)
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
            changed = True
        else:
            with torch.no_grad():
                operator.attrgetter(bias_node.target)(module).sub_(delta)
        corrected += 1
    if changed:
        graph.lint()
        module.recompile()
    return corrected


def _through(node: Any, ops: dict[str, frozenset[Any]], w: Any, m: Any) -> Any:
    """A layer's output mean per channel for an input of per-channel mean ``m`` (no bias):
    :func:`deploykit.quantize.recipes._through` on the torch layer."""
    w = w.to(m.dtype)
    if node.target not in ops["conv"]:
        return w @ m  # linear [out, in]
    groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
    if node.target == _torch().ops.aten.convolution.default:
        groups = int(node.args[8]) if len(node.args) > 8 else groups
    cout, cin_g = w.shape[0], w.shape[1]
    per_out = w.reshape(cout, cin_g, -1).sum(-1)  # [cout, cin/g]
    idx = _torch().arange(cout) // (cout // groups)
    return (per_out * m.reshape(groups, cin_g)[idx]).sum(1)


_SMOOTH_PREFIX = "_deploykit_smooth_inv_"  # the module attributes holding 1 / s of each smoothed tensor


def _smooth_quant(module: Any, batches: list[Feeds], names: Sequence[str], alpha: float,
                  learn: bool = False) -> int:
    """SmoothQuant on the float torch graph, as deploykit.quantize.recipes.smooth_quant does on
    the ONNX model: for the linear layers reading one activation ``x`` (the query, key and value
    projections share one), ``x / s`` (a multiply inserted before them: the tensor the fake
    quantization then sees) and ``W * s`` along the input channels, with the recipe's factors
    from the calibration data. The function is unchanged; returns the number of tensors smoothed.
    ``learn``: the factors are parameters (trained by ``distill``), else buffers."""
    import operator

    from deploykit.quantize.recipes import smoothing_factors

    torch = _torch()
    graph = module.graph
    readers: dict[Any, list[Any]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default and _is_weight(node.args[1]):
            readers.setdefault(node.args[0], []).append(node)
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)
    # a weight shared with another layer (tied embeddings) cannot take one reader's factors
    readers = {x: ls for x, ls in readers.items() if all(uses.get(n.args[1].target) == 1 for n in ls)}
    if not readers:
        return 0
    xmax: dict[Any, Any] = {}

    def amax(n: Any, out: Any) -> None:
        m = out.abs().reshape(-1, out.shape[-1]).amax(0)
        xmax[n] = m if n not in xmax else torch.maximum(xmax[n], m)

    _record(module, batches, names, readers, amax)
    for i, (x, linears) in enumerate(readers.items()):
        weights = [operator.attrgetter(n.args[1].target)(module) for n in linears]
        wmax = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0)
        s = torch.from_numpy(smoothing_factors(xmax[x].numpy(), wmax.numpy(), alpha))
        with torch.no_grad():
            for w in weights:
                w.mul_(s)  # [out, in]: input channel k times s_k
        attr = f"{_SMOOTH_PREFIX}{i}"
        inverse = (1.0 / s).to(torch.float32)
        if learn:
            module.register_parameter(attr, torch.nn.Parameter(inverse))
        else:
            module.register_buffer(attr, inverse)
        with graph.inserting_after(x):
            inv = graph.get_attr(attr)
        with graph.inserting_after(inv):
            mul = graph.call_function(torch.ops.aten.mul.Tensor, (x, inv))
        if "val" in x.meta:
            mul.meta["val"] = x.meta["val"]
        for n in linears:
            n.replace_input_with(x, mul)
    graph.lint()
    module.recompile()
    return len(readers)


def _fake_quants(module: Any) -> list[Any]:
    ao = _ao()
    return [m for m in module.modules() if isinstance(m, ao.FakeQuantizeBase)]


def _dynamic(example_inputs: tuple[Any, ...], sequence: bool) -> tuple[dict[int, Any], ...]:
    torch = _torch()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=2, max=512)
    return tuple({0: batch, **({1: seq} if sequence and x.dim() > 1 else {})} for x in example_inputs)


def _data_hash(batches: list[Feeds]) -> str:
    hashers: dict[str, Any] = {}
    for feeds in batches:  # as Observer.data_hash: one hasher per input, batch size does not matter
        for k in sorted(feeds):
            a = np.ascontiguousarray(feeds[k])
            hashers.setdefault(k, hashlib.sha256(f"{k}:{a.dtype}:{a.shape[1:]}".encode())).update(a.tobytes())
    h = hashlib.sha256()
    for k in sorted(hashers):
        h.update(hashers[k].digest())
    return h.hexdigest()


def distill(prepared: Prepared, data: Any, *, steps: int | None = None, epochs: float | None = None,
            lr: float = 1e-5, batch_size: int = 16, loss: str = "kl", temperature: float = 1.0,
            budget_s: float | None = None, cpu_budget_s: float | None = None, warmup: float = 0.0, seed: int = 0,
            weight_decay: float = 0.0, scale_lr: float | None = None,
            on_step: Callable[[int, float], None] | None = None) -> Prepared:
    """Label-free knowledge distillation: train ``prepared`` to reproduce its FP32 teacher on
    unlabeled ``data`` (same forms as :func:`prepare`'s ``calib``).

    ``loss``: ``kl`` (classifiers: KL divergence of the softmax at ``temperature``), ``mse`` or
    ``cosine`` (embeddings). Stops after ``steps`` optimiser steps, or ``epochs`` passes over the
    data (default one pass), or ``budget_s`` wall seconds, or ``cpu_budget_s`` CPU seconds of
    this process (all its threads: on a shared machine a wall-clock budget buys fewer steps
    than the same time on idle cores), whichever comes first. Adam; the learning rate rises
    linearly over the first ``warmup`` fraction of the run, then decays on a cosine to zero.
    The run's progress is the furthest of steps, wall and CPU seconds towards their limits,
    so a run stopped by a budget still ends its decay. The teacher's outputs are computed once
    per sample and reused on later passes when ``data`` is an array or a dict of arrays. The
    activation scales stay as calibrated; weight scales follow the weights. With
    ``learn_scales`` the activation scales train too, at ``scale_lr`` (default 10 x ``lr``: a
    scale is a hundredth of a typical weight's magnitude, Adam's steps are not relative).
    Returns ``prepared`` (trained in place); ``prepared.history`` holds the losses and
    ``prepared.seconds`` the wall (``distill``) and CPU (``distill_cpu``) seconds.
    """
    torch = _torch()
    if loss not in LOSSES:
        raise ConfigError(f"qat.distill: loss '{loss}' is not one of {', '.join(LOSSES)}")
    if steps is not None and steps < 1:
        raise ConfigError(f"qat.distill: steps {steps} must be at least 1")
    if not 0.0 <= warmup < 1.0:
        raise ConfigError(f"qat.distill: warmup {warmup} must be a fraction of the run in [0, 1)")
    samples = _count(data, prepared.input_names)
    per_epoch = max(1, math.ceil(samples / batch_size)) if samples else None
    total = steps if steps is not None else (max(1, round((epochs or 1.0) * per_epoch)) if per_epoch else None)
    if total is None:
        raise ConfigError("qat.distill: give steps= when the data's length is not known up front")
    scales = prepared.scale_parameters()
    ids = {id(p) for p in scales}
    groups = [{"params": [p for p in prepared.parameters() if id(p) not in ids], "weight_decay": weight_decay,
               "base_lr": lr}]
    if scales:
        scale_base = 10 * lr if scale_lr is None else scale_lr
        groups.append({"params": scales, "lr": scale_base, "weight_decay": 0.0, "base_lr": scale_base})
    try:  # one fused kernel: half the CPU of the default Adam step (0.33 vs 0.69 CPU s for 4.6M weights)
        optimiser = torch.optim.Adam(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # pragma: no cover - a build without the fused CPU kernel
        optimiser = torch.optim.Adam(groups, lr=lr)
    started, cpu_started = time.monotonic(), time.process_time()

    def progress(step: int) -> float:
        done = step / total
        if budget_s is not None:
            done = max(done, (time.monotonic() - started) / budget_s)
        if cpu_budget_s is not None:
            done = max(done, (time.process_time() - cpu_started) / cpu_budget_s)
        return min(done, 1.0)

    def factor(done: float) -> float:
        if done < warmup:
            return max(done, 1.0 / total) / warmup
        return 0.5 * (1 + math.cos(math.pi * (done - warmup) / (1.0 - warmup)))

    from deploykit.progress import bar

    step = 0
    epoch = 0
    # images: channels-last memory is what mkldnn's depthwise and 1x1 convolutions run fastest on
    # (EfficientNet-Lite0 training step 1.8x faster measured); restored before returning
    images = any(x.dim() == 4 for x in prepared.example_inputs)
    layout = torch.channels_last if images else torch.contiguous_format
    prepared.module.to(memory_format=layout)
    prepared.teacher.to(memory_format=layout)
    cache: dict[int, Any] = {}  # sample index -> the teacher's output for it (later passes reuse it)
    reuse = per_epoch is not None and total > per_epoch

    def as_torch(feeds: Feeds) -> tuple[Any, ...]:
        return tuple(x.contiguous(memory_format=layout) if x.dim() == 4 else x
                     for x in _to_torch(feeds, prepared.input_names))

    def teacher(idx: np.ndarray | None, inputs: tuple[Any, ...]) -> Any:
        if idx is not None and all(int(i) in cache for i in idx):
            return torch.stack([cache[int(i)] for i in idx])
        with torch.no_grad():
            out = _first(prepared.teacher(*inputs))
        if idx is not None and reuse:
            cache.update((int(i), row) for i, row in zip(idx, out))
        return out

    with bar(total, "qat: distill", "step") as b, _quiet():
        while step < total and progress(step) < 1.0:
            for idx, feeds in _indexed_batches(data, prepared.input_names, batch_size, shuffle=True,
                                               seed=seed + epoch):
                scale = factor(progress(step))
                for group in optimiser.param_groups:
                    group["lr"] = group["base_lr"] * scale
                inputs = as_torch(feeds)
                target = teacher(idx, inputs)
                out = _first(prepared.module(*inputs))
                value = _loss(loss, out, target, temperature)
                optimiser.zero_grad(set_to_none=True)
                value.backward()
                optimiser.step()
                prepared.history.append(float(value))
                step += 1
                b.update()
                if on_step is not None:
                    on_step(step, float(value))
                if step >= total or progress(step) >= 1.0:
                    break
            epoch += 1
    prepared.module.to(memory_format=torch.contiguous_format)
    prepared.teacher.to(memory_format=torch.contiguous_format)
    prepared.seconds["distill"] = prepared.seconds.get("distill", 0.0) + time.monotonic() - started
    prepared.seconds["distill_cpu"] = prepared.seconds.get("distill_cpu", 0.0) + time.process_time() - cpu_started
    return prepared


def _first(out: Any) -> Any:
    if isinstance(out, (tuple, list)):
        return out[0]
    if isinstance(out, Mapping):
        return next(iter(out.values()))
    return out


def _loss(kind: str, out: Any, target: Any, temperature: float) -> Any:
    torch = _torch()
    f = torch.nn.functional
    if kind == "kl":
        t = temperature
        return f.kl_div(f.log_softmax(out / t, -1), f.log_softmax(target / t, -1), log_target=True,
                        reduction="batchmean") * t * t
    if kind == "mse":
        return f.mse_loss(out, target)
    return (1 - f.cosine_similarity(out.flatten(1), target.flatten(1), dim=1)).mean()


def _count(data: Any, names: Sequence[str]) -> int | None:
    from deploykit.data import DataSource

    if isinstance(data, DataSource):
        return data.expected_samples()
    if isinstance(data, np.ndarray) or _is_tensor(data):
        return len(data)
    if isinstance(data, Mapping):
        return min(len(v) for v in data.values())
    if isinstance(data, Sequence):
        return sum(_count(item, names) or 0 for item in data)
    return None


def _teacher_key(prepared: Prepared) -> str:
    """What the teacher's ONNX export depends on: its weights and buffers (by content: a deep
    copy of a Prepared keeps the key), the example inputs' shapes and types, the input names and
    the dynamic dimensions. Hashing is milliseconds; the dynamo export it saves is seconds to
    minutes (about 40% of :func:`export` for the digits CNN)."""
    h = hashlib.sha256()
    for name, tensor in sorted(prepared.teacher.state_dict().items()):
        a = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    h.update(repr([(tuple(x.shape), str(x.dtype)) for x in prepared.example_inputs]).encode())
    h.update(repr((prepared.input_names, prepared.dynamic_sequence)).encode())
    return h.hexdigest()


def export(prepared: Prepared, path: Path | str, *, source_hash: str = "") -> Path:
    """Convert, export with the dynamo exporter and write the canonical model at ``path``
    (``<stem>.qdq.onnx``) with ``<stem>.calib.json`` and the FP32 teacher ``<stem>.fp32.onnx``
    beside it. Raises DeploykitError if the export is not canonical (a placement rule this
    quantizer does not yet express for some op: the message names the node)."""
    torch = _torch()
    import onnx
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from deploykit.data import open_source
    from deploykit.fileio import atomic_output, sha256
    from deploykit.model import export_torch, input_specs, list_torchlib_ops_once
    from deploykit.quantize import saturation
    from deploykit.quantize.adopt import NotCanonical, adopt
    from deploykit.quantize.recipes import META_RECIPE

    path = Path(path)
    if not path.name.endswith(".qdq.onnx"):
        raise ConfigError(f"qat.export: {path}: name it <stem>.qdq.onnx (the FP32 teacher goes beside it as "
                          f"<stem>.fp32.onnx)")
    stem = path.name[: -len(".qdq.onnx")]
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="deploykit-qat-") as tmp:
        raw_path = Path(tmp) / "qat.onnx"
        list_torchlib_ops_once()
        with _quiet():
            module = copy.deepcopy(prepared.module)
            converted = convert_pt2e(module)
            torch.onnx.export(converted, prepared.example_inputs, str(raw_path), dynamo=True,
                              opset_version=rules.OPSET, external_data=False, input_names=prepared.input_names,
                              dynamic_shapes=_dynamic(prepared.example_inputs, prepared.dynamic_sequence),
                              verbose=False)
        raw = onnx.load(str(raw_path))
        calib = open_source(lambda: prepared.calibration, input_specs(raw))
        try:
            taken = adopt(raw, source_hash=source_hash or sha256(raw_path), calib=calib, method=METHOD,
                          data_hash=prepared.data_hash, where="the QAT export")
        except NotCanonical as exc:
            raise DeploykitError(f"internal error: the QAT export is not canonical: {exc}") from None
        rules.set_metadata(taken.model, META_RECIPE, prepared.recipe)  # the float rewrites training started from
        # the int16 saturation record a PTQ build writes: OpenVINO's overflow_fix (auto) splits the
        # layers it names on CPUs without VNNI; without it an adopted export gets first_layer only
        if calib is not None:  # always: open_source returns None only for no data spec
            saturation.measure_and_record(taken.model, calib, 8, prepared.activations)
        fp32_path = path.with_name(f"{stem}.fp32.onnx")
        key = _teacher_key(prepared)
        if prepared.teacher_onnx is None or prepared.teacher_onnx[0] != key:
            with _quiet():
                export_torch(prepared.teacher, prepared.example_inputs, Path(tmp) / "fp32.onnx", prepared.input_names,
                             dynamic_sequence=prepared.dynamic_sequence)
            prepared.teacher_onnx = (key, (Path(tmp) / "fp32.onnx").read_bytes())
        with atomic_output(fp32_path) as out:
            out.write_bytes(prepared.teacher_onnx[1])
    with atomic_output(path.with_name(f"{stem}.calib.json")) as out:
        taken.table.save(out)
    with atomic_output(path) as out:
        onnx.save(taken.model, str(out))
    prepared.seconds["export"] = time.monotonic() - started
    return path
