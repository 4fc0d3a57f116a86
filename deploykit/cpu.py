"""Facts about this host's CPU that decide how int8 kernels behave on it.

On x86 without VNNI (AVX2-only, or AVX-512 without ``avx512_vnni``), onnxruntime's and
OpenVINO's u8 x s8 integer kernels multiply with ``vpmaddubsw``, which adds each pair of
u8*s8 products into a *saturating* int16: 2 * 255 * 127 = 64,770 overflows 32,767, so a layer
whose activations use the upper half of the uint8 range silently computes wrong sums.
VNNI (``vpdpbusd``) accumulates in int32 and is exact. See docs/toolchain-facts.md.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def u8s8_saturates() -> bool:
    """True where u8 x s8 int8 dot products can saturate (x86 without VNNI).

    Unknown flags (no /proc/cpuinfo) count as not saturating: we only change behaviour on
    evidence.
    """
    flags = cpu_flags()
    return is_x86() and bool(flags) and "avx2" in flags and not (flags & _VNNI_FLAGS)
