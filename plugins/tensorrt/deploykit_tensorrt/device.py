"""What this host has for TensorRT (package, CUDA driver, GPU) and the facts an engine is tied to.

Nothing here imports tensorrt at module import. The GPU is queried through the CUDA driver API
(``libcuda``) with ctypes, which exists on desktop GPUs and on Jetson alike (Jetson has no
nvidia-smi); nvidia-smi, when present, adds the display driver version.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from deploykit.errors import BackendUnavailable

INSTALL_HINT = ("pip install 'deploykit[tensorrt]' (tensorrt>=10, polygraphy, cuda-python) on a machine with an "
                "NVIDIA GPU and driver; on Jetson use JetPack's TensorRT (apt install python3-libnvinfer)")
_CU_ATTR_CC_MAJOR, _CU_ATTR_CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR/MINOR


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.6"
    driver: str  # display driver ("550.54.14") when nvidia-smi says, else the CUDA driver API version
    cuda_driver: str  # CUDA driver API version, "12.4"


def _libcuda() -> ctypes.CDLL | None:
    names = ["nvcuda.dll"] if sys.platform.startswith("win") else ["libcuda.so.1", "libcuda.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_driver_present() -> bool:
    return _libcuda() is not None


def nvidia_smi() -> str | None:
    return shutil.which("nvidia-smi")


def _display_driver() -> str | None:
    smi = nvidia_smi()
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].strip() if out else None


def query_gpu(index: int = 0) -> GpuInfo | None:
    """Name, compute capability and driver of CUDA device ``index``; None when there is none."""
    lib = _libcuda()
    if lib is None or lib.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        return None
    device = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor, version = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetName(name, 256, device)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _CU_ATTR_CC_MAJOR, device)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _CU_ATTR_CC_MINOR, device)
    lib.cuDriverGetVersion(ctypes.byref(version))
    cuda_driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
    return GpuInfo(name.value.decode(errors="replace"), f"{major.value}.{minor.value}",
                   _display_driver() or f"CUDA {cuda_driver}", cuda_driver)


def tensorrt_version() -> tuple[str | None, str]:
    """(version, "") when the tensorrt package imports, else (None, why not).

    The PyPI ``tensorrt`` name also serves a stub that fails on import, so finding the
    package is not enough: it has to import.
    """
    if "tensorrt" not in sys.modules and not module_present("tensorrt"):
        return None, "the tensorrt Python package is not installed"
    try:
        import tensorrt  # noqa: PLC0415 - lazy by design
    except Exception as exc:  # a stub wheel or missing libnvinfer raises anything
        return None, f"the tensorrt package does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
    return str(tensorrt.__version__), ""


def module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def cache_dir() -> Path:
    """deploykit's cache folder for TensorRT: $DEPLOYKIT_CACHE/tensorrt, else ~/.cache/deploykit/tensorrt."""
    root = os.environ.get("DEPLOYKIT_CACHE")
    if root:
        return Path(root) / "tensorrt"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deploykit" / "tensorrt"


def timing_cache_path(gpu: GpuInfo | None, trt_version: str | None) -> Path:
    """A timing cache per GPU model, compute capability and TensorRT version (tactic timings are only
    valid there); ``timing.cache`` when those are unknown (e.g. pre-flight on a machine without a GPU)."""
    if gpu is None or trt_version is None:
        return cache_dir() / "timing.cache"
    key = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu.name}-sm{gpu.compute_capability}-trt{trt_version}").strip("-")
    return cache_dir() / f"timing-{key}.cache"


# ----------------------------------------------------------------------------------------------
# the facts an engine is tied to (sidecar JSON next to the .engine)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineFacts:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    driver: str
    hardware_compatibility_level: str = "none"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngineFacts":
        raw = json.loads(text)
        return cls(**{k: str(raw[k]) for k in cls.__dataclass_fields__ if k in raw})


class EngineMismatch(BackendUnavailable):
    """The engine was built for another TensorRT version or GPU family than this host's."""


def sidecar_path(engine: Path) -> Path:
    return Path(engine).with_name(Path(engine).name + ".json")


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


def check_compatible(built: EngineFacts, here: EngineFacts, engine: Path | str = "engine") -> None:
    """Refuse (EngineMismatch) an engine this host cannot run; TensorRT's own refusal is a cryptic
    deserialisation failure, so we say which versions differ and what to do."""
    if built.tensorrt_version != here.tensorrt_version:
        raise EngineMismatch(
            f"{engine} was built with TensorRT {built.tensorrt_version} but this host has TensorRT "
            f"{here.tensorrt_version}: engines only run on the TensorRT version that built them; rebuild it here "
            f"or install TensorRT {built.tensorrt_version}")
    level = built.hardware_compatibility_level
    ok = (_cc(here.compute_capability) >= (8, 0)) if level == "ampere_plus" else (
        built.compute_capability == here.compute_capability)
    if not ok:
        need = "an Ampere or newer GPU (compute capability >= 8.0)" if level == "ampere_plus" else (
            f"a GPU of compute capability {built.compute_capability}")
        raise EngineMismatch(
            f"{engine} was built on {built.gpu_name} (compute capability {built.compute_capability}, "
            f"hardware_compatibility_level '{level}') and needs {need}; this host has {here.gpu_name} "
            f"(compute capability {here.compute_capability}): rebuild it here, or build with "
            f"hardware_compatibility_level = \"ampere_plus\" for Ampere and newer GPUs")
    if level == "none" and built.gpu_name != here.gpu_name:
        warnings.warn(f"{engine} was built on {built.gpu_name} and runs on {here.gpu_name} (same compute capability "
                      f"{here.compute_capability}): it runs, but its tactics were timed on the other GPU", stacklevel=2)


def check_sidecar(engine: Path, here: EngineFacts) -> EngineFacts | None:
    """Compare the engine's sidecar with this host; None when the engine has no sidecar
    (built outside deploykit, e.g. by trtexec: TensorRT then checks on deserialisation)."""
    path = sidecar_path(engine)
    if not path.is_file():
        return None
    try:
        built = EngineFacts.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError) as exc:
        raise EngineMismatch(f"{path}: not a valid engine description ({exc}); rebuild the engine") from None
    check_compatible(built, here, engine)
    return built
