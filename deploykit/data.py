"""Calibration and evaluation data: .npy/.npz files, an image folder, a Python callable, or
(with a loud warning) random inputs. Every source streams batches of ``{input_name: array}``
validated against the model's inputs; labels travel beside them when the source has them."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np

from deploykit.errors import DataError
from deploykit.targets import Preprocess

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
LABEL_KEYS = ("labels", "label", "y")

T = TypeVar("T")
Specs = Mapping[str, tuple[list[int | str], Any]]  # name -> (shape, numpy dtype), from model.input_specs


@dataclass
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None


class DataSource:
    """Base: subclasses yield samples as (feeds with a leading batch dim, labels or None)."""

    description = ""
    is_random = False
    exact_batches = False  # a fixed-batch model: every batch full (see batches())

    def __init__(self, specs: Specs, limit: int | None = None) -> None:
        self.specs = specs
        self.limit = limit

    def _chunks(self) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _size(self) -> int | None:
        """Samples the source holds, when known without reading it (progress totals)."""
        return None

    def expected_samples(self) -> int | None:
        """How many samples :meth:`batches` will yield, when known up front (else None)."""
        size = self._size()
        if size is None:
            return self.limit
        return size if self.limit is None else min(size, self.limit)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Re-batch the source's chunks to ``batch_size``. The last batch may be smaller, unless
        ``exact_batches`` (a fixed-batch model): then a partial last batch is dropped, or, when
        it is the only one, filled by repeating its samples."""
        if batch_size < 1:  # 0 would yield empty batches forever
            raise DataError(f"{self.description}: batch size {batch_size} must be >= 1")
        if self.limit is not None and self.limit < 0:  # a negative limit would slice from the end
            raise DataError(f"{self.description}: sample limit {self.limit} must be >= 0")
        pending: list[Batch] = []
        count = 0
        held = 0
        for chunk in self._chunks():
            self._validate(chunk)
            n = len(next(iter(chunk.feeds.values())))
            if self.limit is not None and count + n > self.limit:
                keep = self.limit - count
                chunk = Batch({k: v[:keep] for k, v in chunk.feeds.items()},
                              None if chunk.labels is None else chunk.labels[:keep])
                n = keep
            if n == 0:
                break
            count += n
            pending.append(chunk)
            held += n
            while held >= batch_size:
                batch, pending, held = _take(pending, batch_size)
                yield batch
            if self.limit is not None and count >= self.limit:
                break
        if count == 0:
            raise DataError(f"{self.description}: no samples")
        if held and self.exact_batches and count > held:
            return  # the model runs only full batches: drop the remainder
        if held and self.exact_batches:
            last = _concat(pending)
            reps = -(-batch_size // held)
            yield Batch({k: np.concatenate([v] * reps)[:batch_size] for k, v in last.feeds.items()},
                        None if last.labels is None else np.concatenate([last.labels] * reps)[:batch_size])
        elif held:
            yield _concat(pending)

    def _validate(self, chunk: Batch) -> None:
        feeds = chunk.feeds
        unknown = set(feeds) - set(self.specs)
        missing = set(self.specs) - set(feeds)
        if unknown or missing:
            raise DataError(
                f"{self.description}: data has inputs {sorted(feeds)} but the model expects {sorted(self.specs)}"
                + (f" (rename {sorted(unknown)})" if unknown else "")
            )
        sizes = {k: len(v) if np.ndim(v) else 0 for k, v in feeds.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"{self.description}: inputs have different sample counts {sizes}")
        for name, arr in feeds.items():
            shape, dtype = self.specs[name]
            if arr.ndim != len(shape):
                raise DataError(f"{self.description}: input '{name}' has shape {list(arr.shape)}, "
                                f"the model expects rank {len(shape)} {shape}")
            for axis, (got, want) in enumerate(zip(arr.shape, shape)):
                if isinstance(want, int) and want > 0 and got != want and not (axis == 0):
                    raise DataError(f"{self.description}: input '{name}' has shape {list(arr.shape)}, "
                                    f"the model expects {shape}")
            if arr.dtype != dtype:
                same_kind = np.issubdtype(arr.dtype, np.floating) == np.issubdtype(dtype, np.floating)
                if not same_kind or arr.dtype.kind == "b":
                    raise DataError(f"{self.description}: input '{name}' is {arr.dtype}, the model expects {np.dtype(dtype)}")
                feeds[name] = arr.astype(dtype)
            if np.issubdtype(dtype, np.floating) and not np.all(np.isfinite(feeds[name])):
                bad = int(np.size(feeds[name]) - np.count_nonzero(np.isfinite(feeds[name])))
                raise DataError(f"{self.description}: input '{name}' contains {bad} NaN/Inf values; clean the data")
        if chunk.labels is not None and len(chunk.labels) != next(iter(sizes.values())):
            raise DataError(f"{self.description}: {len(chunk.labels)} labels for {next(iter(sizes.values()))} samples")


def _take(pending: list[Batch], n: int) -> tuple[Batch, list[Batch], int]:
    """The first ``n`` samples of ``pending`` and what is left. Slices are views: a large chunk
    re-batched into small batches is never copied as a whole."""
    head: list[Batch] = []
    need = n
    while need:
        chunk = pending[0]
        size = len(next(iter(chunk.feeds.values())))
        if size <= need:
            head.append(pending.pop(0))
            need -= size
            continue
        head.append(_slice(chunk, 0, need))
        pending[0] = _slice(chunk, need, size)
        need = 0
    left = sum(len(next(iter(b.feeds.values()))) for b in pending)
    return _concat(head), pending, left


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return Batch({k: v[start:stop] for k, v in batch.feeds.items()},
                 None if batch.labels is None else batch.labels[start:stop])


def _concat(parts: list[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    feeds = {k: np.concatenate([p.feeds[k] for p in parts]) for k in parts[0].feeds}
    labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])
    return Batch(feeds, labels)


class ArraySource(DataSource):
    """.npy (one input) or .npz (arrays named after inputs, optional ``labels``).

    Neither is read whole: a .npy is memory-mapped and each .npz member is decompressed as a
    stream, so only the samples used are ever materialised (a 1 GB array behind a 1 MB
    compressed file costs what ``--samples`` asks for). Object arrays (pickles) are refused.
    """

    def __init__(self, path: Path, specs: Specs, limit: int | None = None) -> None:
        super().__init__(specs, limit)
        self.path = path
        self.description = str(path)
        if not path.exists():
            raise DataError(f"{path}: data file not found")
        self.labels: _NpzMember | np.ndarray | None
        try:
            if path.suffix == ".npy":
                arr = np.load(path, mmap_mode="r", allow_pickle=False)  # mmap: never the whole file
                if len(specs) != 1:
                    raise DataError(f"{path}: a .npy file feeds one input, the model has {sorted(specs)}; use .npz with named arrays")
                self.arrays: dict[str, Any] = {next(iter(specs)): arr}
                self.labels = None
            else:
                members = _npz_members(path)
                self.labels = next((members[k] for k in LABEL_KEYS if k in members), None)
                data_keys = [k for k in members if k not in LABEL_KEYS]
                if len(specs) == 1 and len(data_keys) == 1 and data_keys[0] not in specs:
                    self.arrays = {next(iter(specs)): members[data_keys[0]]}  # single unnamed array
                else:
                    self.arrays = {k: members[k] for k in data_keys}
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); expected .npy or .npz") from None
        for name, a in [*self.arrays.items(), *([("labels", self.labels)] if self.labels is not None else [])]:
            if a.dtype.hasobject:
                raise DataError(f"{path}: array '{name}' holds Python objects; deploykit never unpickles data, "
                                f"save numeric arrays")
        scalars = [k for k, a in self.arrays.items() if a.ndim == 0]
        if scalars:
            raise DataError(f"{path}: array {scalars} is a scalar; arrays need a leading sample axis")
        if self.labels is not None and self.labels.ndim == 0:
            raise DataError(f"{path}: 'labels' is a scalar; give one label per sample")
        sizes = {k: a.shape[0] for k, a in self.arrays.items()}
        if len(set(sizes.values())) > 1:
            raise DataError(f"{path}: inputs have different sample counts {sizes}")
        if self.labels is not None and sizes and self.labels.shape[0] != next(iter(sizes.values())):
            raise DataError(f"{path}: {self.labels.shape[0]} labels for {next(iter(sizes.values()))} samples")

    def _size(self) -> int | None:
        return min(a.shape[0] for a in self.arrays.values()) if self.arrays else 0

    def _chunks(self) -> Iterator[Batch]:
        n = min(a.shape[0] for a in self.arrays.values()) if self.arrays else 0
        if self.limit is not None:
            n = min(n, self.limit)
        step = 256
        readers = {k: _reader(a) for k, a in self.arrays.items()}
        labels = None if self.labels is None else _reader(self.labels)
        try:
            for i in range(0, n, step):
                m = min(step, n - i)
                yield Batch({k: r(i, m) for k, r in readers.items()}, None if labels is None else labels(i, m))
        finally:
            for r in [*readers.values(), *([labels] if labels is not None else [])]:
                getattr(r, "close", lambda: None)()


class _NpzMember:
    """One array of an .npz, known by its header; rows are decompressed only when read."""

    def __init__(self, path: Path, member: str, shape: tuple[int, ...], dtype: np.dtype, fortran: bool) -> None:
        self.path, self.member, self.shape, self.dtype, self.fortran = path, member, shape, dtype, fortran
        self.ndim = len(shape)

    def open(self) -> "_MemberReader":
        return _MemberReader(self)


class _MemberReader:
    """Sequential reads of rows from an .npz member (one decompression pass per use)."""

    def __init__(self, member: _NpzMember) -> None:
        import zipfile

        self.m = member
        self.zf = zipfile.ZipFile(member.path)
        self.fh = self.zf.open(member.member)
        _read_npy_header(self.fh)
        self.row_items = int(np.prod(member.shape[1:], dtype=np.int64))
        self.pos = 0
        self.whole: np.ndarray | None = None

    def __call__(self, start: int, count: int) -> np.ndarray:
        m = self.m
        if m.fortran:  # column-major rows are not contiguous: read it whole (rare for sample data)
            if self.whole is None:
                self.whole = np.lib.format.read_array(self.fh, allow_pickle=False)
            return np.ascontiguousarray(self.whole[start:start + count])
        if start != self.pos:
            raise ValueError("rows of an .npz member are read in order")
        nbytes = count * self.row_items * m.dtype.itemsize
        buf = self.fh.read(nbytes)
        if len(buf) != nbytes:
            raise DataError(f"{m.path}: array '{m.member[:-4]}' is truncated")
        self.pos += count
        return np.frombuffer(buf, dtype=m.dtype).reshape((count, *m.shape[1:])).copy()

    def close(self) -> None:
        self.fh.close()
        self.zf.close()


def _reader(a: Any) -> Callable[[int, int], np.ndarray]:
    if isinstance(a, _NpzMember):
        return a.open()
    return lambda start, count: np.ascontiguousarray(a[start:start + count])


def _read_npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)
    if version == (1, 0):
        return fmt.read_array_header_1_0(fh)
    if version == (2, 0):
        return fmt.read_array_header_2_0(fh)
    header: tuple[tuple[int, ...], bool, np.dtype[Any]] = fmt._read_array_header(  # type: ignore[attr-defined]
        fh, version)  # 3.0: utf-8 field names; numpy has no public reader for it
    return header


def _npz_members(path: Path) -> dict[str, _NpzMember]:
    """The arrays of an .npz by name, from their headers alone."""
    import zipfile

    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                shape, fortran, dtype = _read_npy_header(fh)
            out[info.filename[:-4]] = _NpzMember(path, info.filename, tuple(shape), np.dtype(dtype), fortran)
    return out


class ImageFolderSource(DataSource):
    """Images under a folder; class sub-folders (sorted) give labels."""

    def __init__(self, path: Path, specs: Specs, preprocess: Preprocess | None, limit: int | None = None) -> None:
        super().__init__(specs, limit)
        self.description = str(path)
        if len(specs) != 1:
            raise DataError(f"{path}: an image folder feeds one input, the model has {sorted(specs)}")
        self.input = next(iter(specs))
        self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        classes = sorted({p.parent.relative_to(path).parts[0] for p in self.files if p.parent != path})
        self.classes = classes if classes and all(p.parent != path for p in self.files) else []
        shape = specs[self.input][0]
        self.preprocess = preprocess or _default_preprocess(shape)

    def _size(self) -> int | None:
        return len(self.files)

    def _chunks(self) -> Iterator[Batch]:
        idx = {c: i for i, c in enumerate(self.classes)}
        root = Path(self.description)
        for group in _batched(self.files, 32):
            loaded = [load_image(f, self.preprocess) for f in group]
            if len({a.shape for a in loaded}) > 1:
                sizes = {f.name: list(a.shape) for f, a in zip(group, loaded)}
                raise DataError(f"{self.description}: images differ in size after preprocessing ({sizes}); "
                                f"set preprocess resize and crop")
            images = np.stack(loaded)
            labels = np.array([idx[f.relative_to(root).parts[0]] for f in group]) if self.classes else None
            yield Batch({self.input: images}, labels)


def _default_preprocess(shape: list[int | str]) -> Preprocess:
    layout = "NHWC" if len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3) else "NCHW"
    channels = shape[1] if layout == "NCHW" else shape[-1]
    h = shape[2] if layout == "NCHW" else shape[1]
    size = h if isinstance(h, int) and h > 0 else None
    return Preprocess(resize=size, crop=size, layout=layout, color="L" if channels == 1 else "RGB")


def load_image(path: Path, pp: Preprocess) -> np.ndarray:
    from PIL import Image

    try:
        img = Image.open(path).convert(pp.color)
    except Exception as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from None
    if pp.resize:
        w, h = img.size
        k = pp.resize / min(w, h)
        img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
    if pp.crop:
        w, h = img.size
        left, top = (w - pp.crop) // 2, (h - pp.crop) // 2
        img = img.crop((left, top, left + pp.crop, top + pp.crop))
    arr = np.asarray(img, dtype=np.float32) / pp.scale
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = ((arr - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)).astype(np.float32)
    return arr.transpose(2, 0, 1) if pp.layout == "NCHW" else arr


class CallableSource(DataSource):
    """``module:function`` (or ``path/to/file.py:function``) returning or yielding feeds.

    The function gets no arguments and returns an iterable of dicts (or arrays for a
    single-input model), optionally as (feeds, labels) pairs, or one dict of arrays.
    """

    def __init__(self, spec: str, specs: Specs, limit: int | None = None) -> None:
        super().__init__(specs, limit)
        self.description = spec
        self.fn = _resolve_callable(spec)

    def _chunks(self) -> Iterator[Batch]:
        try:
            result = self.fn()
        except SystemExit as exc:  # must not end deploykit with the function's exit code
            raise DataError(f"{self.description}: the data function called sys.exit({exc.code!r}); "
                            f"return the data instead") from None
        except Exception as exc:
            raise DataError(f"{self.description}: the data function raised {type(exc).__name__}: {exc}") from None
        if result is None:
            raise DataError(f"{self.description}: the data function returned nothing; return feed dicts "
                            f"(a dict, a list or a generator)")
        if isinstance(result, Mapping):
            result = [result]
        try:
            items = iter(result)
        except TypeError:
            raise DataError(f"{self.description}: the data function returned {type(result).__name__}; "
                            f"return feed dicts (a dict, a list or a generator)") from None
        while True:
            try:  # a generator fails while iterated, not when called
                item = next(items)
            except StopIteration:
                break
            except SystemExit as exc:
                raise DataError(f"{self.description}: the data function called sys.exit({exc.code!r}); "
                                f"yield the data instead") from None
            except Exception as exc:
                raise DataError(f"{self.description}: the data function raised {type(exc).__name__}: {exc}") from None
            labels = None
            if isinstance(item, tuple) and len(item) == 2:
                item, labels = item
                labels = np.asarray(labels)
            feeds = dict(item) if isinstance(item, Mapping) else {next(iter(self.specs)): item}
            yield Batch({k: np.asarray(v) for k, v in feeds.items()}, labels)


def _resolve_callable(spec: str) -> Callable[[], Any]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise DataError(f"'{spec}': a callable source is 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise DataError(f"{path}: file not found")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            if spec_ is None or spec_.loader is None:
                raise DataError(f"{path}: not importable as a Python module")
            module = importlib.util.module_from_spec(spec_)
            sys.modules.setdefault(path.stem, module)
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except DataError:
        raise
    except SystemExit as exc:
        raise DataError(f"'{spec}': importing it called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise DataError(f"'{spec}': cannot import ({type(exc).__name__}: {exc})") from None
    if not callable(fn):
        raise DataError(f"'{spec}': {attr} is not callable")
    return fn  # type: ignore[no-any-return]  # callable() checked it


class RandomSource(DataSource):
    """Random inputs: only to get scales at all. Reports say so loudly."""

    is_random = True

    def __init__(self, specs: Specs, samples: int = 64, seed: int = 0) -> None:
        super().__init__(specs, samples)
        self.description = "random data"
        self.seed = seed

    def _chunks(self) -> Iterator[Batch]:
        rng = np.random.default_rng(self.seed)
        remaining = self.limit or 64
        while remaining > 0:
            n = min(32, remaining)
            feeds = {}
            for name, (shape, dtype) in self.specs.items():
                dims = [n] + [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
                if np.issubdtype(dtype, np.floating):
                    feeds[name] = rng.standard_normal(dims).astype(dtype)
                elif np.issubdtype(dtype, np.bool_):
                    feeds[name] = rng.integers(0, 2, dims).astype(dtype)
                else:
                    feeds[name] = rng.integers(0, 2, dims).astype(dtype)  # ids/masks: small valid values
            remaining -= n
            yield Batch(feeds)


def is_code(src: Any) -> bool:
    """Whether ``src`` names code to run (``module:function`` or ``file.py:function``) rather
    than data: such a source runs only when the user asked for it explicitly."""
    if src is None or callable(src):
        return callable(src)
    text = str(src)
    path = Path(text)
    return ":" in text and not path.is_dir() and path.suffix not in (".npy", ".npz") and not path.exists()


def open_source(src: str | Path | Callable[[], Any] | None, specs: Specs, preprocess: Preprocess | None = None,
                limit: int | None = None) -> DataSource | None:
    """Pick the source for ``src``: a .npy/.npz file, an image folder, or ``module:function``."""
    if src is None:
        return None
    if callable(src):
        s = CallableSource.__new__(CallableSource)
        DataSource.__init__(s, specs, limit)
        s.description, s.fn = getattr(src, "__name__", "callable"), src
        return s
    text = str(src)
    path = Path(text)
    if path.is_dir():
        return ImageFolderSource(path, specs, preprocess, limit)
    if path.suffix in (".npy", ".npz"):
        return ArraySource(path, specs, limit)
    if ":" in text and not path.exists():
        return CallableSource(text, specs, limit)
    if not path.exists():
        raise DataError(f"{text}: data not found (give a .npy/.npz file, an image folder, or module:function)")
    raise DataError(f"{text}: unsupported data ({path.suffix or 'no suffix'}); use .npy/.npz, an image folder, or module:function")


def _batched(items: list[T], n: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def collect_batches(src: DataSource, batch_size: int) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Every batch of ``src`` as feeds, and the labels concatenated (None unless every batch has them)."""
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    has_labels = True
    for b in src.batches(batch_size):
        feeds.append(b.feeds)
        if b.labels is None:
            has_labels = False
        else:
            labels.append(b.labels)
    return feeds, (np.concatenate(labels) if has_labels and labels else None)
