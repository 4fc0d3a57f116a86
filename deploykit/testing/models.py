"""Small real models for tests, benchmarks and backend conformance (needs torch).

- ``ResNetCNN``: conv-BN-ReLU stem, residual blocks (Conv+Add), global average pool, Linear.
- ``MobileNetCNN``: depthwise-separable blocks with ReLU6 and hard-swish, concat, max pool.
- ``TinyEncoder``: token embedding (Gather), attention with a padding mask, LayerNorm, GELU.
- ``train_digits_cnn``: a ResNetCNN trained for a few seconds on scikit-learn's digits.

Nothing is downloaded: digits ships with scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _torch() -> Any:
    import torch  # lazy: deploykit itself does not need torch

    return torch


def _nn() -> Any:
    return _torch().nn


def resnet_cnn(in_ch: int = 1, num_classes: int = 10, width: int = 16, blocks: int = 2) -> Any:
    nn = _nn()

    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(c)
            self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(c)

        def forward(self, x: Any) -> Any:
            y = self.b2(self.c2(nn.functional.relu(self.b1(self.c1(x)))))
            return nn.functional.relu(x + y)

    class ResNetCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(*[Block(width) for _ in range(blocks)])
            self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x: Any) -> Any:
            x = self.down(self.body(self.stem(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return ResNetCNN()


def mobilenet_cnn(in_ch: int = 3, num_classes: int = 10, width: int = 16) -> Any:
    nn = _nn()

    def dw_sep(cin: int, cout: int, stride: int, act: Any) -> Any:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin), act(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), act())

    class MobileNetCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, stride=1, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.Hardswish())
            self.b1 = dw_sep(width, width, 1, nn.ReLU6)
            self.b2 = dw_sep(width, width, 1, nn.Hardswish)
            self.pool = nn.MaxPool2d(2)
            self.b3 = dw_sep(2 * width, 2 * width, 1, nn.ReLU6)
            self.fc = nn.Linear(2 * width, num_classes)

        def forward(self, x: Any) -> Any:
            x = self.stem(x)
            x = self.pool(nn.functional.relu6(self.b1(x) + x).clone())
            x = self.b3(self._cat(x))
            return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

        def _cat(self, x: Any) -> Any:
            return _torch().cat([x, self.b2[0:3](x)], dim=1)

    return MobileNetCNN()


def tiny_encoder(vocab: int = 64, dim: int = 32, heads: int = 2, layers: int = 2, seq: int = 16) -> Any:
    torch = _torch()
    nn = _nn()

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.ln1 = nn.LayerNorm(dim)
            self.ff1 = nn.Linear(dim, 2 * dim)
            self.ff2 = nn.Linear(2 * dim, dim)
            self.ln2 = nn.LayerNorm(dim)

        def forward(self, x: Any, bias: Any) -> Any:
            b, t, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            att = (q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5 + bias
            y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, dim)
            x = self.ln1(x + self.proj(y))
            return self.ln2(x + self.ff2(nn.functional.gelu(self.ff1(x))))

    class TinyEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Parameter(torch.randn(1, seq, dim) * 0.1)
            self.layers = nn.ModuleList([Layer() for _ in range(layers)])

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            x = self.tok(input_ids) + self.pos[:, : input_ids.shape[1]]
            # BERT-style additive mask: the huge negative number is why the mask path stays float
            bias = torch.where(attention_mask[:, None, None, :] > 0, 0.0, torch.finfo(torch.float32).min)
            for layer in self.layers:
                x = layer(x, bias)
            return x.mean(dim=1)

    return TinyEncoder()


def encoder_inputs(n: int, vocab: int = 64, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq), dtype=np.int64)
    lengths = rng.integers(seq // 2, seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def bert_encoder(vocab: int = 96, dim: int = 32, heads: int = 2, layers: int = 2, max_positions: int = 64) -> Any:
    """A small sentence-embedding encoder from transformers' own BertModel (random weights), mean-pooled
    over the attention mask like sentence-transformers: exported, it has the same graph as a real
    BERT-family encoder (Range, GatherND, Expand, And, Where, IsNaN for the mask; Erf GELU;
    LayerNormalization; int64 inputs)."""
    torch = _torch()
    nn = _nn()
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * dim, max_position_embeddings=max_positions, type_vocab_size=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    class SentenceEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=False)

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)

    return SentenceEncoder().eval()


def bert_inputs(n: int, seq: int = 16, vocab: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids with a [CLS] first, padded rows (mask 0 at the end), two token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(n, seq), dtype=np.int64)
    ids[:, 0] = 1
    lengths = rng.integers(max(2, seq // 3), seq + 1, size=n)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    types = (np.arange(seq)[None, :] >= (lengths[:, None] // 2)).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def export_legacy(module: Any, example: tuple[Any, ...], path: Path | str, input_names: list[str]) -> Path:
    """Export with torch's legacy (TorchScript) exporter, batch and sequence dynamic, as older
    pipelines and most published encoder .onnx files do."""
    torch = _torch()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(module.eval(), tuple(example), str(path), dynamo=False, opset_version=17,
                          input_names=input_names, output_names=["embedding"],
                          dynamic_axes={name: {0: "batch", 1: "sequence"} for name in input_names})
    return path


def export_onnx(module: Any, example: tuple[Any, ...], path: Path | str, input_names: list[str] | None = None,
                dynamic_batch: bool = True, dynamic_sequence: bool = False) -> Path:
    """Export for tests and benches: :func:`deploykit.model.export_torch`."""
    from deploykit.model import export_torch

    return export_torch(module, example, path, input_names, dynamic_batch, dynamic_sequence)


@dataclass
class Digits:
    x_train: np.ndarray  # float32 [N, 1, 8, 8] in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(seed: int = 0) -> Digits:
    """scikit-learn's 8x8 digits (1,797 images, 16 grey levels) as float32 in [0, 1], shuffled
    for ``seed``, split 70/30. Read from the file scikit-learn ships, as its ``load_digits``
    reads it (``np.loadtxt`` of ``datasets/data/digits.csv.gz``: 64 pixels then the label per
    row), without importing scikit-learn: that import costs ~1.5 s of CPU in every process."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the digits data ships with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    x = (data[:, :-1].reshape(-1, 8, 8).astype(np.float32) / 16.0)[:, None]
    y = data[:, -1].astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    x, y = x[idx], y[idx]
    cut = int(0.7 * len(x))
    return Digits(x[:cut], y[:cut], x[cut:], y[cut:])


def _digits_cache(seed: int, width: int, epochs: int) -> Path:
    """Where the trained weights of this exact training live: keyed by the training code, its
    arguments and the versions of torch, scikit-learn (the data) and numpy (the split)."""
    import hashlib
    import inspect
    import os
    from importlib import metadata

    torch = _torch()
    source = "".join(inspect.getsource(f) for f in (train_digits_cnn, resnet_cnn, digits))
    versions = [torch.__version__, metadata.version("scikit-learn"), np.__version__]
    key = hashlib.sha256(repr((source, seed, width, epochs, versions)).encode()).hexdigest()[:16]
    root = Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit"))
    return root / "digits" / f"resnet_cnn-{key}.pt"


def train_digits_cnn(seconds: float = 8.0, seed: int = 0, width: int = 16,
                     epochs: int = 12) -> tuple[Any, Digits, float]:
    """Train a ResNetCNN on digits for ``epochs`` epochs (deterministic for a seed, whatever
    the machine's load; ``seconds`` is only kept for callers); returns (model, Digits, test
    accuracy). The trained weights are cached (:func:`_digits_cache`): the same training on
    the same versions gives the same weights, so it runs once per machine, not once per suite."""
    import os

    torch = _torch()
    torch.manual_seed(seed)
    data = digits(seed)
    model = resnet_cnn(1, 10, width)
    cache = _digits_cache(seed, width, epochs)
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))  # tensors only: never runs code
        model.eval()
        with torch.no_grad():
            acc = float((model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean())
        return model, data, acc
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, cache)  # atomic: a concurrent identical training simply wins or loses
    return model, data, acc


# ---------------------------------------------------------------------------------------
# digits32: the real-sized bundled sample (deploykit/samples/digits32_cnn.onnx)
# ---------------------------------------------------------------------------------------
#: (in, out, stride) of its six 3x3 convolutions on a 32x32 input: ~40 M multiply-adds per
#: image, enough work per call that INT8 pays off on every CPU runtime, yet only ~108 k weights
DIGITS32_CONVS = ((1, 24, 1), (24, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 1))


def digits32_cnn(num_classes: int = 10) -> Any:
    nn = _nn()
    layers: list[Any] = []
    for cin, cout, stride in DIGITS32_CONVS:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    class Digits32CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.fc = nn.Linear(DIGITS32_CONVS[-1][1], num_classes)

        def forward(self, x: Any) -> Any:
            return self.fc(self.features(x).mean(dim=(2, 3)))

    return Digits32CNN()


def digits32(seed: int = 0) -> Digits:
    """scikit-learn's digits upsampled 4x (nearest: the 8x8 pixels stay exact, so the bundled
    .npz files compress to a few tens of KB) to [N, 1, 32, 32]."""
    d = digits(seed)
    def up(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a.repeat(4, axis=2).repeat(4, axis=3))

    return Digits(up(d.x_train), d.y_train, up(d.x_test), d.y_test)


def train_digits32_cnn(seed: int = 0, epochs: int = 10, batch: int = 32) -> tuple[Any, Digits, float]:
    """Train :func:`digits32_cnn` (deterministic for a seed); returns (model, Digits32, test accuracy)."""
    torch = _torch()
    torch.manual_seed(seed)
    data = digits32(seed)
    model = digits32_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            b = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(data.x_test)).argmax(1).numpy() == data.y_test).mean())
    return model, data, acc
