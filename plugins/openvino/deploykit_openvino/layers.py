"""The per-layer runner for OpenVINO IR artifacts (``Capability.LAYER_RUNNER``, see deploykit.layers).

The saved IR itself is cut, not the canonical model: OpenVINO's ONNX front end turns each
canonical QuantizeLinear into FakeQuantize + Convert(i8), and the Convert's output keeps the
canonical tensor's name. At every such int8 output the IR gets a Result (what this layer
computed) and its readers are moved to a new int8 Parameter (fed the canonical model's own
value), so each layer runs from the canonical inputs through the IR's own dequantize chains,
compiled with the target's configuration (the CPU plugin's low-precision transformations
decide the int8 kernels, as for the artifact).

A Result on an int8 tensor keeps that tensor materialised, which the uncut IR fuses away;
that is inherent to reading intermediate values (polygraphy has the same caveat).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from deploykit.layers import OUTPUT_PREFIX


class IrLayerRunner:
    """A deploykit.layers.LayerRunner on the artifact's IR cut at every canonical int8 tensor."""

    def __init__(self, core: Any, ir_model: Any, cut: Any, device: str, config: Mapping[str, Any]) -> None:
        import openvino.opset13 as ops

        wanted = {t.name: t for t in cut.tensors}
        outputs: dict[str, Any] = {}
        for op in ir_model.get_ordered_ops():
            if op.get_type_name() in ("Result", "Parameter"):
                continue  # a Result repeats its input's names; a Parameter has no producer to compare
            for out in op.outputs():
                for name in out.get_names():
                    if name in wanted and name not in outputs:
                        outputs[name] = out
        self.names = [t.name for t in cut.tensors if t.name in outputs]
        self.zero_points = {name: wanted[name].zero_point for name in self.names}
        self.not_found = [t.name for t in cut.tensors if t.name not in outputs]
        params, results = [], []
        self.dtypes: dict[str, np.dtype] = {}
        self.float_scales: dict[str, float] = {}  # tensors fed as float through a copy of their FakeQuantize
        for name in self.names:
            out = outputs[name]
            readers = list(out.get_target_inputs())
            out.set_names({OUTPUT_PREFIX + name})
            fq = out.get_node().input_value(0).get_node() if out.get_node().get_type_name() == "Convert" else None
            if fq is not None and fq.get_type_name() == "FakeQuantize":
                # the readers get the same FakeQuantize -> Convert(i8) on a float Parameter: the
                # low-precision transformations see the quantize they see in the whole IR
                param = ops.parameter(fq.input_value(0).get_partial_shape(), fq.input_value(0).get_element_type(),
                                      name=f"deploykit_layer_in/{name}")
                copy = ops.fake_quantize(param, fq.input_value(1), fq.input_value(2), fq.input_value(3),
                                         fq.input_value(4), int(fq.get_attributes()["levels"]))
                source = ops.convert(copy, out.get_element_type()).output(0)
                self.float_scales[name] = wanted[name].scale
            else:
                param = ops.parameter(out.get_partial_shape(), out.get_element_type(), name=f"deploykit_layer_in/{name}")
                source = param.output(0)
            param.output(0).set_names({name})
            for reader in readers:
                reader.replace_source_output(source)
            result = ops.result(out)
            params.append(param)
            results.append(result)
            self.dtypes[name] = out.get_element_type().to_dtype()
        ir_model.add_parameters(params)
        ir_model.add_results(results)
        ir_model.validate_nodes_and_infer_types()
        compiled = core.compile_model(ir_model, device, dict(config))
        self.request: Any = compiled.create_infer_request()
        self.inputs = [(port.get_any_name(), port) for port in compiled.inputs]
        self.result_ports = {name: compiled.output(OUTPUT_PREFIX + name) for name in self.names}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.request is None:
            raise RuntimeError("layer runner is closed")
        given = {}
        for name, port in self.inputs:
            value = np.asarray(feeds[name])
            if name in self.float_scales:  # (q - zero point) * scale: the FakeQuantize gives q back
                value = (value.astype(np.float64) * self.float_scales[name]).astype(np.float32)
            elif name in self.zero_points:
                value = (value.astype(np.int32) + self.zero_points[name]).astype(self.dtypes[name])
            given[port] = value
        results = self.request.infer(given)
        return {n: np.asarray(results[self.result_ports[n]]).astype(np.int32) - self.zero_points[n]
                for n in self.names}

    def close(self) -> None:
        self.request = None
