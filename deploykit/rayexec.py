"""Check jobs on a Ray cluster (``--executor ray``), an optional extra: ``pip install 'deploykit[ray]'``.

Each device is a custom resource of the cluster, ``device:NAME``, declared by the Ray node
that runs on it (``ray start --address HEAD:6379 --resources '{"device:NAME": 1}'``). A
target's check job becomes one Ray task asking for ``{"device:NAME": 1}``: it is scheduled
only on that device's node, and since the node holds one unit, one timing job per device at a
time. The job and its files travel through Ray's object store as a bundle
(:func:`deploykit.remote.bundle`: no shared filesystem), and the worker lays them out with the
same rules as the device agent before it runs :func:`deploykit.jobs.run_job`. A target whose
device no node declares fails at once with the ``ray start`` line that would add it.

Without an address a local Ray instance is started, declaring ``device:NAME`` for the devices
this machine stands for (``local`` and the names given). docs/agent.md has the set-up.
"""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from deploykit.errors import ConfigError, DeviceError
from deploykit.jobs import CheckJob, DevicePlacing, run_job
from deploykit.plugins import Registry, load_registry
from deploykit.remote import DEVICE_NOTE, bundle, fingerprint, lay_out
from deploykit.results import Availability, JobResult
from deploykit.targets import Target

INSTALL_HINT = "pip install 'deploykit[ray]'"
LOCAL_DEVICE = "local"  # a target without a device in targets.toml


def resource(device: str) -> str:
    """The Ray custom resource standing for ``device``."""
    return f"device:{device}"


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    """The worker's backends, loaded once per worker process (Ray reuses its workers)."""
    return load_registry()


def run_bundle(files: Mapping[str, bytes]) -> dict[str, Any]:
    """On a Ray worker: lay out a job's bundle in a fresh folder, run it, return its JobResult JSON."""
    def writer(data: bytes) -> Callable[[Path], None]:
        def write(dest: Path) -> None:
            dest.write_bytes(data)

        return write

    with tempfile.TemporaryDirectory(prefix="deploykit-ray-job-") as tmp:
        job = lay_out(Path(tmp), {name: writer(data) for name, data in files.items()})
        result = run_job(job, _registry())
        result.notes[DEVICE_NOTE] = fingerprint()
        return result.to_json()


class RayExecutor(DevicePlacing):
    """Runs each check job as a Ray task on the node that declares its target's device."""

    def __init__(self, address: str | None = None, devices: Iterable[str] = (), num_cpus: int | None = None,
                 timeout: float | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(f"--executor ray needs Ray: {INSTALL_HINT}") from None
        self.ray: Any = ray  # untyped SDK
        self.timeout = timeout
        self.address = address or "a local Ray instance"
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:  # a local instance standing for this machine's devices
                kwargs["num_cpus"] = num_cpus
                kwargs["resources"] = {resource(n): 1 for n in sorted({LOCAL_DEVICE, *devices})}
            self._init(kwargs)
        self._remote = ray.remote(max_retries=0)(run_bundle)

    def _init(self, kwargs: Mapping[str, Any], attempts: int = 3) -> None:
        """``ray.init``, tried again when the node misses Ray's fixed 30 s start-up window (seen on
        a 2-core machine under a load average of 20)."""
        for attempt in range(attempts):
            try:
                self.ray.init(**kwargs)
                return
            except ConnectionError as exc:
                raise DeviceError(f"cannot reach the Ray cluster at {self.address}: {exc}") from None
            except Exception as exc:
                self.ray.shutdown()
                if "timed out during startup" not in str(exc) or attempt + 1 == attempts:
                    raise DeviceError(f"{self.address} did not start: {type(exc).__name__}: "
                                      f"{(str(exc).strip().splitlines() or [''])[0][:300]}") from None

    def accepts(self, target: Target, availability: Availability) -> str:
        """Every target: its job goes to the node declaring its device, whatever this machine can
        run; a device no node declares is an error of that target (:meth:`submit`), not a skip."""
        return ""

    def declared(self) -> set[str]:
        """The devices some node of the cluster declares."""
        return {k.split(":", 1)[1] for k in self.ray.cluster_resources() if k.startswith("device:")}

    def run(self, job: CheckJob) -> JobResult:
        return self.result(self.submit(job), job)

    def submit(self, job: CheckJob) -> Any:
        """Start ``job`` on its device's node; returns the task's reference (see :meth:`result`)."""
        device = job.target.device.name
        if device not in self.declared():
            raise DeviceError(f"no node of {self.address} declares device '{device}' (resource {resource(device)}); "
                              f"on the device run: ray start --address HEAD:6379 --resources "
                              f"'{{\"{resource(device)}\": 1}}'")
        with tempfile.TemporaryDirectory(prefix="deploykit-ray-ship-") as tmp:
            files = {name: path.read_bytes() for name, path in bundle(job, Path(tmp)).items()}
        return self._remote.options(resources={resource(device): 1}).remote(files)

    def result(self, ref: Any, job: CheckJob) -> JobResult:
        """The JobResult of a task from :meth:`submit` (DeviceError naming the device on failure)."""
        ray = self.ray
        device = job.target.device
        timeout = self.timeout or device.timeout
        t0 = time.monotonic()
        try:
            raw = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise DeviceError(f"device '{device.name}' on Ray: {job.target.name}: no result within {timeout:g} s") \
                from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1][:300]
            raise DeviceError(f"device '{device.name}' on Ray: {job.target.name}: {first}") from None
        except ray.exceptions.RayError as exc:  # a node or worker lost
            raise DeviceError(f"device '{device.name}' on Ray: {job.target.name}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
        result = JobResult.from_json(raw)
        result.seconds["dispatch"] = max(0.0, time.monotonic() - t0 - sum(result.seconds.values()))
        return result
