"""Which ONNX operators TensorRT's ONNX parser accepts: a data table, checked without TensorRT.

Transcribed from onnx-tensorrt's docs/operators.md (the "Operator Support Matrix" of TensorRT
10.15, which supports opsets 9 to 24). Only the Supported column is kept; the restrictions that
matter to the canonical model (Q/DQ zero points must be 0, no int32 bias DequantizeLinear) are
checked by the canonical lint. When TensorRT is installed the parser's own ``supports_operator``
is asked as well (see :func:`deploykit_tensorrt.lowering.parser_supports`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

#: The table's source, recorded in the pre-flight metadata.
SOURCE = "onnx-tensorrt docs/operators.md (TensorRT 10.15)"
OPSET_MIN, OPSET_MAX = 9, 24

_SUPPORTED = """
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
"""

_UNSUPPORTED = """
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder
MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss
Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch
SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit
TfIdfVectorizer Unique
"""

SUPPORTED = frozenset(_SUPPORTED.split())
UNSUPPORTED = frozenset(_UNSUPPORTED.split())
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpProblem:
    """A node TensorRT's ONNX parser would reject."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"node '{self.node}' ({self.op_type}): {self.reason}"


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """op type -> number of nodes, in first-seen order (domain-qualified when not ONNX's)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def unsupported_nodes(model: onnx.ModelProto) -> list[OpProblem]:
    """Nodes whose operator the table marks unsupported, or does not list at all."""
    problems = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"#{i}"
        if node.domain not in DEFAULT_DOMAINS:
            problems.append(OpProblem(name, f"{node.domain}::{node.op_type}",
                                      "custom-domain op: TensorRT needs a plugin for it"))
        elif node.op_type in UNSUPPORTED:
            problems.append(OpProblem(name, node.op_type, "not supported by TensorRT's ONNX parser"))
        elif node.op_type not in SUPPORTED:
            problems.append(OpProblem(name, node.op_type, "not in TensorRT's ONNX operator table"))
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    if opset > OPSET_MAX:
        problems.append(OpProblem(model.graph.name or "graph", "opset",
                                  f"opset {opset} is newer than the parser's {OPSET_MAX}"))
    return problems
