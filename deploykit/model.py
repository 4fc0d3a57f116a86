"""Load, validate and normalise the FP32 model before quantizing.

Normalising means: opset 18, constants folded and BatchNorm folded into Conv (onnxruntime's
basic graph optimisations, which use only ONNX ops), shapes inferred, node names unique.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import onnx
from onnx import external_data_helper

from deploykit.canonical import OPSET
from deploykit.errors import ModelError
from deploykit.ortsession import session_options


def load_onnx(path: Path | str) -> onnx.ModelProto:
    """Load an .onnx file with its external data, refusing data paths outside its folder."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if not path.is_file():
        raise ModelError(f"{path}: not a file; pass an .onnx model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc}); re-export it") from None
    if not model.graph.node:
        raise ModelError(f"{path}: the ONNX graph has no nodes; re-export the model")
    if not model.graph.output:
        raise ModelError(f"{path}: the ONNX graph has no outputs; re-export the model naming its outputs")
    base = path.parent.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelError(
                f"{path}: tensor '{tensor.name}' has external data at '{location}', outside the model's folder; "
                f"move the data file next to the model"
            )
        if not target.is_file():
            raise ModelError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as exc:
        raise ModelError(f"{path}: cannot read external data ({exc})") from None
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise ModelError(f"{path}: invalid ONNX model: {first}") from None
    return model


def export_torch(module: Any, example_inputs: tuple[Any, ...], path: Path | str, input_names: list[str] | None = None,
                 dynamic_batch: bool = True, dynamic_sequence: bool = False) -> Path:
    """Export a torch.nn.Module with the dynamo exporter at opset 18 (docs/toolchain-facts.md: the one that
    works), batch dimension dynamic unless ``dynamic_batch`` is False; ``dynamic_sequence`` also makes
    dimension 1 of every input dynamic (token sequences)."""
    try:
        import torch
    except ImportError as exc:
        raise ModelError(f"exporting a torch module needs torch: pip install torch==2.13.0 ({exc})") from None
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = tuple({0: batch} for _ in example_inputs)
    if dynamic_sequence:
        sequence = torch.export.Dim("sequence", min=2, max=512)
        dynamic = tuple({**(d or {}), 1: sequence} for d in (dynamic or (None,) * len(example_inputs)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    list_torchlib_ops_once()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress lines
            torch.onnx.export(module.eval(), tuple(example_inputs), str(path), dynamo=True, opset_version=OPSET,
                              external_data=False, input_names=input_names, dynamic_shapes=dynamic, verbose=False)
    except Exception as exc:
        raise ModelError(f"torch export of {type(module).__name__} failed: {type(exc).__name__}: {exc}") from None
    return path


#: the onnxscript module torch 2.13's dynamo exporter takes its torchlib op list from
#: (torch/onnx/_internal/_lazy_import.py: ``onnxscript_apis``)
TORCHLIB_APIS = "onnxscript._framework_apis.torch_2_11"


def list_torchlib_ops_once() -> None:
    """Make onnxscript's list of torchlib ops once per process, not in every dynamo export.

    ``torch.onnx.export(dynamo=True)`` builds its ONNX op registry anew on every call from
    ``get_torchlib_ops()``, and onnxscript 0.7 makes that list by parsing the Python source of
    each of its ~560 torchlib functions to read their domain: ~0.65 s of CPU in every export
    after the first (a QAT export exports twice: the fake-quantized model and its FP32 teacher).
    The list depends only on the installed onnxscript; torch reads it and builds its own
    registry from it (nothing mutates it), so every export still gets a fresh registry. Without
    that module (another onnxscript or torch) nothing changes."""
    try:
        apis = importlib.import_module(TORCHLIB_APIS)
    except ImportError:
        return
    listed = getattr(apis, "get_torchlib_ops", None)
    if callable(listed) and not hasattr(listed, "cache_info"):
        setattr(apis, "get_torchlib_ops", functools.cache(listed))  # noqa: B010 (a module attribute mypy cannot see)


def model_hash(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def normalise(model: onnx.ModelProto, source: str = "model", fed: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Opset 18, constant folding, BatchNorm folding, shape inference, unique node names.

    Graph inputs backed by an initializer (every weight, in the IR-3 model-zoo layout) become
    constants unless named in ``fed``, as onnxruntime treats them when nobody feeds them."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    unique_node_names(named)  # onnxruntime refuses to load a graph with duplicate node names
    if constant_initializers(named, fed) and named.ir_version < 4:
        named.ir_version = 4  # IR 3 required initializers to be listed as inputs
    model = _to_opset(named, source)
    constant_initializers(model, fed)  # the converter may add initializer-backed inputs of its own
    if model.ir_version < 8:  # opset 18 needs IR 8; IR < 4 also demanded initializers be inputs
        model.ir_version = 8
    model = _ort_basic_optimise(model, source)
    model = _fold_batchnorm(model)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{source}: shape inference failed: {exc}") from None
    unique_node_names(model)
    return model


def constant_initializers(model: onnx.ModelProto, fed: frozenset[str] = frozenset()) -> list[str]:
    """Drop graph inputs that an initializer backs (unless ``fed``); returns their names."""
    inits = {i.name for i in model.graph.initializer}
    dropped = [i.name for i in model.graph.input if i.name in inits and i.name not in fed]
    if dropped:
        keep = [i for i in model.graph.input if i.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return dropped


def _to_opset(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current == OPSET:
        return model
    if current > OPSET:
        raise ModelError(f"{source}: opset {current} is newer than deploykit's {OPSET}; re-export at opset {OPSET}")
    try:
        converted = onnx.version_converter.convert_version(model, OPSET)
        converted.ir_version = max(converted.ir_version, 8)
        onnx.checker.check_model(converted)
        return converted
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"^.*?: operator\(\): ", "", first)[:200]  # drop the converter's C++ source location
        ops = sorted({n.op_type for n in model.graph.node} & _NO_CONVERTER)
        attr = re.search(r"Attribute (\w+)", first)
        if attr:  # name the node whose attribute blocks the adapter
            ops += [f"{n.op_type} '{n.name}'" for n in model.graph.node if any(a.name == attr.group(1) for a in n.attribute)][:3]
        blocker = f" (blocked by {', '.join(ops)})" if ops else ""
        raise ModelError(f"{source}: cannot convert opset {current} to {OPSET}{blocker}: {first}; "
                         f"re-export the model at opset {OPSET}") from None


#: ops the ONNX version converter cannot carry across to opset 18
_NO_CONVERTER = {"Upsample", "Scatter", "ScaledTanh", "ImageScaler", "Crop", "Affine", "ParametricSoftplus",
                 "ThresholdedRelu", "GRUUnit", "GivenTensorFill", "ConstantFill", "MeanVarianceNormalization"}


def _ort_basic_optimise(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """onnxruntime's basic level folds constants and Conv+BatchNorm using ONNX ops only."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="deploykit-norm-") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, src)
        opts = session_options()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = dst
        try:
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0][:300]
            raise ModelError(f"{source}: onnxruntime cannot load the model: {msg}") from None
        out = onnx.load(dst)
    # keep the original metadata; declare only the opset domains the nodes use (onnxruntime's
    # optimiser writes all nine of its own, which then show up in every tool as if imported)
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    used = used_domains(out)
    keep = [o for o in out.opset_import if _domain(o.domain) in used]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _domain(name: str) -> str:
    return "ai.onnx" if name in ("", "ai.onnx") else name


def used_domains(model: onnx.ModelProto) -> set[str]:
    """The opset domains the model's nodes (and its functions' nodes) really use; "ai.onnx" always."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    graphs = [a.g for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    while graphs:  # If/Loop/Scan bodies
        g = graphs.pop()
        nodes.extend(g.node)
        graphs.extend(a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return {"ai.onnx"} | {_domain(n.domain) for n in nodes}


def _fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold any Conv -> BatchNormalization the optimiser left (e.g. a Conv with a shared output)."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    producer = {o: n for n in g.node for o in n.output}
    remove = []
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or consumers.get(bn.input[0], 0) != 1:
            continue
        if conv.input[1] not in inits or any(n not in inits for n in bn.input[1:5]):
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        k = gamma / np.sqrt(var + eps)
        w_new = (w * k.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        b_new = ((b - mean) * k + beta).astype(np.float32)
        # named after the Conv, not the weight: two Convs may share one weight and fold different BNs
        w_name, b_name = f"{conv.name or conv.output[0]}_weight_bnfold", f"{conv.name or conv.output[0]}_bias_bnfold"
        g.initializer.extend([numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)])
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        remove.append(bn)
    for bn in remove:
        g.node.remove(bn)
    return model


def unique_node_names(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        base = node.name or f"{node.op_type}_{i}"
        name, k = base, 1
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)


def fixed_batch(specs: Mapping[str, tuple[list[int | str], Any]]) -> int | None:
    """The batch a model was exported with when its batch dimension is not dynamic (it only
    runs at that batch), else None. ``specs`` as from :func:`input_specs`."""
    fixed = {shape[0] for shape, _ in specs.values() if shape and isinstance(shape[0], int) and shape[0] > 0}
    return min(fixed) if fixed else None


def input_specs(model: onnx.ModelProto) -> dict[str, tuple[list[int | str], Any]]:
    """name -> (shape with symbolic dims as strings, numpy dtype) for the real graph inputs."""
    inits = {i.name for i in model.graph.initializer}
    specs = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        specs[inp.name] = (shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return specs
