"""One error hierarchy. The CLI prints a DeploykitError as one line and exits non-zero."""

from __future__ import annotations


class DeploykitError(Exception):
    """A handled error: the message names the file/target/key and says what to do."""

    exit_code = 2


class ModelError(DeploykitError):
    """The model file is missing, corrupt, or cannot be normalised."""


class DataError(DeploykitError):
    """Calibration or evaluation data does not fit the model."""


class ConfigError(DeploykitError):
    """targets.toml or a command-line option is invalid."""


class PluginError(DeploykitError):
    """A plugin failed to load or registered something invalid."""


class LoweringError(DeploykitError):
    """A backend could not lower the canonical model (names the node and op where it can)."""


class BackendUnavailable(DeploykitError):
    """Raised by a backend when its SDK or hardware is missing; the target is skipped."""


class OutputDirError(DeploykitError):
    """The output folder holds files deploykit did not write."""


class DeviceError(DeploykitError):
    """A remote device's agent could not be reached, or refused or failed a job (names the
    device and its address); that target or cell fails, the others go on."""


class CheckFailed(DeploykitError):
    """At least one check failed its threshold (exit code 1, results are still written)."""

    exit_code = 1


class BuildFault(DeploykitError):
    """An unexpected fault (a bug, here or in a vendor SDK) in one named step of a build.
    Printed as one line; ``-v`` shows the traceback of the original exception."""

    exit_code = 3

    def __init__(self, step: str, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        super().__init__(f"unexpected fault while {step}: {type(exc).__name__}"
                         + (f": {first}" if first else "") + " (rerun with -v for the traceback)")
        self.step = step
        self.original = exc


class Terminated(BaseException):
    """SIGTERM arrived: the build stops like on Ctrl-C, exit code 143 (128 + SIGTERM)."""

    exit_code = 143
