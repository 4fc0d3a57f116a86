"""coremltools, imported without the converter front ends this plugin does not use.

``import coremltools`` imports every framework it has a front end for, when installed:
TensorFlow, PyTorch, torchao, scikit-learn, transformers (coremltools/_deps). This plugin builds
the ML program with the MIL builder from the canonical ONNX model, so it needs none of them, and
they cost most of the import: about 18 s of CPU with all of them installed against 1.7 s without
(coremltools 9, TensorFlow 2.21, torch 2.13; ``python -c "import coremltools"``).

:func:`coremltools` imports it with those frameworks hidden (:func:`deploykit.backend.require`'s
``hide``): for each one not imported yet, ``sys.modules[name] = None`` makes ``import name``
raise ImportError, which coremltools reads as "not installed"; the entries are removed right
after, so the process can import the framework itself later. What this leaves out: coremltools' own TensorFlow/PyTorch front ends
(``ct.convert`` of a torch or TensorFlow model) in a process where deploykit imported
coremltools before that framework. A process that needs them imports coremltools (or the
framework) first; a framework already imported is never hidden.
"""

from __future__ import annotations

from types import ModuleType

from deploykit.backend import require

INSTALL_HINT = "pip install 'deploykit[coreml]'"

#: frameworks coremltools imports for its converter front ends (none used here)
FRONT_ENDS = ("tensorflow", "torch", "torchao", "torchvision", "torchaudio", "executorch", "sklearn",
              "transformers", "xgboost", "libsvm")


def coremltools() -> ModuleType:
    """The coremltools module (imported once per process, :func:`deploykit.backend.require`
    with ``hide=FRONT_ENDS``). Raises BackendUnavailable, saying how to install it, when it
    cannot be imported."""
    module: ModuleType = require("coremltools", INSTALL_HINT, hide=FRONT_ENDS)
    return module
