"""coremltools, imported without the converter front ends this plugin does not use.

``import coremltools`` imports every framework it has a front end for, when installed:
TensorFlow, PyTorch, torchao, scikit-learn, transformers (coremltools/_deps). This plugin builds
the ML program with the MIL builder from the canonical ONNX model, so it needs none of them, and
they cost most of the import: about 18 s of CPU with all of them installed against 1.7 s without
(coremltools 9, TensorFlow 2.21, torch 2.13; ``python -c "import coremltools"``).

:func:`coremltools` imports it with those frameworks hidden: for each one not imported yet,
``sys.modules[name] = None`` makes ``import name`` raise ImportError, which coremltools reads as
"not installed"; the entries are removed right after, so the process can import the framework
itself later. What this leaves out: coremltools' own TensorFlow/PyTorch front ends
(``ct.convert`` of a torch or TensorFlow model) in a process where deploykit imported
coremltools before that framework. A process that needs them imports coremltools (or the
framework) first; a framework already imported is never hidden.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

from deploykit.errors import BackendUnavailable

INSTALL_HINT = "pip install 'deploykit[coreml]'"

#: frameworks coremltools imports for its converter front ends (none used here)
FRONT_ENDS = ("tensorflow", "torch", "torchao", "torchvision", "torchaudio", "executorch", "sklearn",
              "transformers", "xgboost", "libsvm")

_lock = threading.Lock()


def coremltools() -> ModuleType:
    """The coremltools module (imported once per process). Raises BackendUnavailable, saying how
    to install it, when it cannot be imported."""
    module = sys.modules.get("coremltools")
    if module is not None:
        return module
    with _lock:
        hidden = [name for name in FRONT_ENDS if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]  # "import name" -> ImportError
        try:
            return importlib.import_module("coremltools")
        except ImportError as exc:
            raise BackendUnavailable(f"coremltools is not importable ({exc}); install it: {INSTALL_HINT}") from None
        finally:
            for name in hidden:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
