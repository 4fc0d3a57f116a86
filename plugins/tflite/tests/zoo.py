"""A small CNN that uses the rest of the op table (for the TFLite lowering tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploykit.backend import CanonicalModel


def op_zoo_cnn():
    """Grouped conv, average pool, Resize (nearest and bilinear), SiLU, sigmoid gate, Tanh,
    Pad, Transpose/Reshape/Flatten of 4-D tensors, Concat on channels, Linear, Softmax."""
    import torch
    from torch import nn

    class Zoo(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.pool = nn.AvgPool2d(2)
            self.pw = nn.Conv2d(16, 8, 1)
            self.fc = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            x = torch.relu(self.stem(x))                                   # [N, 8, 16, 16]
            g = self.grouped(x)
            g = g * torch.sigmoid(g)                                       # SiLU
            y = self.pool(g)                                               # [N, 8, 8, 8]
            up = nn.functional.interpolate(y, scale_factor=2, mode="nearest")
            y = torch.cat([x, up], dim=1)                                  # [N, 16, 16, 16]
            y = nn.functional.avg_pool2d(nn.functional.pad(y, (1, 1, 1, 1)), 2)  # Pad -> [N, 16, 9, 9]
            y = nn.functional.interpolate(y, size=(8, 8), mode="bilinear", align_corners=False)
            y = torch.tanh(self.pw(y))                                     # [N, 8, 8, 8]
            y = y.permute(0, 2, 3, 1).reshape(y.shape[0], 8, 8, 8)        # Transpose + Reshape
            z = torch.flatten(y, 1)
            return torch.softmax(self.fc(z), dim=-1)

    return Zoo()


def make_zoo_canonical(workdir: Path, seed: int = 0) -> CanonicalModel:
    import torch

    from deploykit import data, model
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing import cache

    torch.manual_seed(seed)
    module = op_zoo_cnn().eval()
    rng = np.random.default_rng(seed)
    example = rng.random((2, 3, 16, 16), dtype=np.float32)
    path = cache.export_onnx(module, (torch.from_numpy(example),), Path(workdir) / "zoo.onnx", ["x"])
    fp32 = model.normalise(model.load_onnx(path), str(path))
    calib = {"x": rng.random((32, 3, 16, 16), dtype=np.float32)}
    source = data.open_source(lambda: [calib], model.input_specs(fp32))
    result = quantize(fp32, source, "minmax", source_hash=model.model_hash(fp32))
    return write_canonical(result, fp32, Path(workdir), "zoo")


def op_zoo2_cnn(seed: int = 0):
    """LeakyRelu, HardSigmoid alone, Sub/Div by constants, padded MaxPool, Unsqueeze/Squeeze,
    ReduceMax, global average pool with keepdims, Clip to another range."""
    import torch
    from torch import nn

    torch.manual_seed(seed)  # the same weights whatever ran before in this process

    class Zoo2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.fc = nn.Linear(8, 6)

        def forward(self, x):
            x = nn.functional.leaky_relu(self.c1(x), 0.1)
            x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)             # explicit pads
            g = nn.functional.hardsigmoid(x)                                   # alone
            y = self.c2((x - 0.25) / 2.0 * g)
            y = torch.clamp(y, -0.5, 0.5) + y.amax(dim=1, keepdim=True)       # Clip, ReduceMax
            z = y.mean(dim=(2, 3), keepdim=True).squeeze(-1).squeeze(-1)      # [N, 8]
            return self.fc(z).unsqueeze(1)                                     # [N, 1, 6]

    return Zoo2()


def make_canonical_from(module, workdir: Path, stem: str, shape=(3, 16, 16), seed: int = 0) -> CanonicalModel:
    import torch

    from deploykit import data, model
    from deploykit.quantize import quantize, write_canonical
    from deploykit.testing import cache

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    example = rng.random((2, *shape), dtype=np.float32)
    path = cache.export_onnx(module.eval(), (torch.from_numpy(example),), Path(workdir) / f"{stem}.onnx", ["x"])
    fp32 = model.normalise(model.load_onnx(path), str(path))
    calib = {"x": rng.random((32, *shape), dtype=np.float32)}
    source = data.open_source(lambda: [calib], model.input_specs(fp32))
    result = quantize(fp32, source, "minmax", source_hash=model.model_hash(fp32))
    return write_canonical(result, fp32, Path(workdir), stem)


def token_mlp(seed: int = 0):
    """3-D activations through Linear layers: MatMul with a [K, N] weight, bias Add, ReLU, Mean."""
    import torch
    from torch import nn

    torch.manual_seed(seed)  # the same weights whatever ran before in this process

    class TokenMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 8)

        def forward(self, x):  # [N, 4, 8]
            return self.down(nn.functional.relu(self.up(x))).mean(dim=1)

    return TokenMLP()


def fixed_into_conv(seed: int = 0):
    """TFLite-fixed outputs read through a canonical Q/DQ: Tanh -> Conv, Sigmoid -> Conv."""
    import torch
    from torch import nn

    torch.manual_seed(seed)  # the same weights whatever ran before in this process

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 1), nn.Sigmoid(),
                         nn.Conv2d(8, 4, 1))


def dead_channel_cnn(seed: int = 0):
    """Per-channel weight ranges a real network has: conv channel 2 and depthwise channel 1 with
    weights ~1e-7 and no bias (the converter widens their scales), conv channel 5 ~1e-12 with a
    bias of 0.5 (dead: the bias cannot be an int32 at the canonical scale), conv channel 6 with
    negative weights ~1e-6 and a bias of -2 (dead, like EfficientNet-Lite0's stem channel 11:
    at the smallest weight scale that fits its bias into int32, the products push the
    accumulator past -2**31 and it wraps), ordinary ones."""
    import torch
    from torch import nn

    torch.manual_seed(seed)  # the same weights whatever ran before in this process (xdist orders tests differently)

    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 4, 1)
            with torch.no_grad():
                self.stem.weight[2] *= 1e-6
                self.stem.bias[2] = 0.0
                self.stem.weight[5] *= 1e-11
                self.stem.bias[5] = 0.5
                self.stem.weight[6] = -2e-6 * self.stem.weight[6].abs() / self.stem.weight[6].abs().max()
                self.stem.bias[6] = -2.0
                self.dw.weight[1] *= 1e-7
                self.dw.bias[1] = 0.0

        def forward(self, x):
            x = torch.relu(self.stem(x))
            return self.pw(torch.relu(self.dw(x)))

    return Dead()
