"""Check jobs on other machines: the bundle a job travels as, the path rules every receiver
enforces, and the client of a device's ``deploykit agent``.

A job travels as a **bundle**: a mapping from relative POSIX names to files, ``job.json`` and
``arrays.npz`` (the job saved with every path inside its folder) plus the artifact's and the
canonical model's files. The receiver (the agent, a Ray worker) validates every name before it
writes anything (:func:`safe_name`), lays the files out in a fresh folder, loads the job
(``allow_pickle=False``) and refuses it when any path it names leaves that folder
(:func:`check_job_paths`).

:class:`AgentExecutor` runs a job on one agent over HTTP with the standard library only
(nothing extra on the build machine): files are content-addressed by sha256 and uploaded only
when the agent does not hold them yet; a dropped connection is retried with back-off, then the
job fails with one line naming the device, its address and the reason. :class:`DeviceRouter`
sends each job to its target's device: this machine's executor, or that device's agent.
docs/agent.md describes the API and the set-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import platform
import re
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping

from deploykit import cpu
from deploykit._version import __version__
from deploykit.canonical import CanonicalModel
from deploykit.errors import DeviceError
from deploykit.fileio import atomic_output, sha256
from deploykit.jobs import ARRAYS_FILE, JOB_FILE, CheckJob, DevicePlacing, Executor, target_to_json
from deploykit.results import SCHEMA_VERSION, Artifact, Availability, CheckResult, JobResult
from deploykit.targets import Device, Target

log = logging.getLogger("deploykit")

#: the agent's HTTP API version (``/v1/``); a probe answering another is refused
API_VERSION = 1
#: key of ``JobResult.notes`` under which a remote executor reports the device's fingerprint
DEVICE_NOTE = "device"
#: a lowering request: the target, the canonical model's two files, the example shapes
LOWER_FILE = "lower.json"
LOWER_KIND = "deploykit.lower_request"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_NAME = 512
_MAX_FILES = 10_000


def fingerprint() -> dict[str, Any]:
    """What identifies the environment a job ran in (reported with its result)."""
    return {"hostname": socket.gethostname(), "os": f"{platform.system()} {platform.release()}",
            "machine": platform.machine(), "cpu": cpu.cpu_name(), "cores": os.cpu_count(),
            "int8_saturates": cpu.u8s8_saturates(), "python": platform.python_version(), "deploykit": __version__}


def is_digest(text: str) -> bool:
    return bool(_DIGEST.fullmatch(text))


# ---------------------------------------------------------------------------------------
# the bundle and its path rules
# ---------------------------------------------------------------------------------------
def safe_name(name: object) -> PurePosixPath:
    """``name`` as a relative path that cannot leave the folder it is joined to, or ValueError.

    Relative POSIX names only: no absolute path, no drive, no backslash, no ``..``, ``.`` or
    empty part, no NUL or control character."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise ValueError(f"file name {str(name)[:80]!r}: not a non-empty string of at most {_MAX_NAME} characters")
    if "\\" in name or any(ord(ch) < 32 for ch in name) or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"file name {name[:80]!r}: only relative POSIX names are accepted")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"file name {name[:80]!r}: '..', '.' and empty parts are not accepted")
    return PurePosixPath(name)


def check_names(names: list[str], required: tuple[str, ...] = (JOB_FILE, ARRAYS_FILE)) -> None:
    """Every name safe, none twice, no file where another one needs a folder, the ``required``
    ones there; else ValueError."""
    if len(names) > _MAX_FILES:
        raise ValueError(f"{len(names)} files in one job: at most {_MAX_FILES}")
    paths = [safe_name(n) for n in names]
    if len(set(paths)) != len(paths):
        raise ValueError("a file name is given twice")
    files = set(paths)
    for p in paths:
        for parent in p.parents:
            if parent in files:
                raise ValueError(f"file name {str(p)!r} needs {str(parent)!r} to be a folder, but it is also a file")
    if any(PurePosixPath(r) not in files for r in required):
        raise ValueError(f"a request needs {' and '.join(required)}")


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` resolves (symbolic links followed) inside ``folder``."""
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_job_paths(job: CheckJob, folder: Path) -> None:
    """ValueError unless every file the job names lies inside ``folder`` (the job's own)."""
    named = {"canonical_path": job.canonical_path, "fp32_path": job.fp32_path, "artifact.path": job.artifact.path}
    named.update({f"artifact.files[{i}]": f for i, f in enumerate(job.artifact.files)})
    for key, path in named.items():
        if not inside(path, folder):
            raise ValueError(f"{JOB_FILE} {key} = {str(path)[:120]!r} lies outside the job's folder")


def check_job_json(raw: object) -> None:
    """ValueError unless a received ``job.json`` names every file with a safe relative name
    (checked before anything of the job is written; :func:`check_job_paths` checks again after)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("artifact"), dict):
        raise ValueError(f"{JOB_FILE} is not a check job")
    art = raw["artifact"]
    files = art.get("files")
    if not isinstance(files, list):
        raise ValueError(f"{JOB_FILE} artifact.files is not a list")
    for key, value in [("canonical_path", raw.get("canonical_path")), ("fp32_path", raw.get("fp32_path")),
                       ("artifact.path", art.get("path"))] + [(f"artifact.files[{i}]", f) for i, f in enumerate(files)]:
        try:
            safe_name(value)
        except ValueError as exc:
            raise ValueError(f"{JOB_FILE} {key}: {exc}") from None


def bundle(job: CheckJob, folder: Path) -> dict[str, Path]:
    """Save ``job`` into ``folder`` as it will lie on the receiver (every path inside), and
    return the bundle: each relative name with the local file it comes from."""
    art = job.artifact
    base = art.path.parent
    files = list(art.files) or ([art.path] if art.path.is_file() else sorted(p for p in art.path.rglob("*")
                                                                               if p.is_file()))
    out: dict[str, Path] = {}

    def place(name: str, source: Path) -> Path:
        out[name] = Path(source)
        return folder / name

    try:
        art_files = tuple(place(f"artifact/{Path(f).resolve().relative_to(base.resolve()).as_posix()}", f)
                          for f in files)
    except ValueError:
        raise DeviceError(f"{job.target.name}: the artifact's files do not all lie beside {art.path}; "
                          f"cannot ship it") from None
    relocated = dataclasses.replace(
        job,
        artifact=dataclasses.replace(art, path=folder / "artifact" / art.path.name, files=art_files),
        canonical_path=place(f"model/{job.canonical_path.name}", job.canonical_path),
        fp32_path=place(f"model/fp32-{job.fp32_path.name}", job.fp32_path))
    relocated.save(folder)
    out[JOB_FILE], out[ARRAYS_FILE] = folder / JOB_FILE, folder / ARRAYS_FILE
    for name, source in out.items():
        if not source.is_file():
            raise DeviceError(f"{job.target.name}: {source} ({name}) is missing; cannot ship the job")
    return out


def write_files(folder: Path, files: Mapping[str, Callable[[Path], None]]) -> None:
    """Write each named file below ``folder`` (its name made safe, its parent folders created):
    ``files`` maps a name to a function writing that file's bytes to the path it is given."""
    for name, write in files.items():
        dest = folder / safe_name(name)
        if not inside(dest, folder):  # cannot happen after safe_name in a fresh folder; checked anyway
            raise ValueError(f"file name {name!r} leaves the job's folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        write(dest)


def lay_out(folder: Path, files: Mapping[str, Callable[[Path], None]]) -> CheckJob:
    """Write a received bundle into the fresh ``folder`` and load its job.

    ``files`` maps each name to a function writing that file's bytes to the path it is given.
    Every name is checked before anything is written; ValueError when a name or a path of the
    job is not allowed (the folder is then left as it was, or holds only the bundle's files)."""
    check_names(list(files))
    write_files(folder, files)
    job = CheckJob.load(folder)
    check_job_paths(job, folder)
    return job


# ---------------------------------------------------------------------------------------
# the agent's client
# ---------------------------------------------------------------------------------------
class _Retry(Exception):
    """A connection-level failure: worth another attempt."""


class AgentExecutor(DevicePlacing):
    """Runs check jobs on one ``deploykit agent`` (see docs/agent.md).

    ``retries`` attempts after the first for each request that fails at the connection level
    (refused, reset, timed out), waiting ``backoff`` seconds, doubled each time; then
    :class:`DeviceError` naming the device and its address. HTTP answers (401, 413, ...) are not
    retried: they are the agent's decision."""

    def __init__(self, address: str, token: str, *, name: str = "", timeout: float = 1800.0, retries: int = 3,
                 backoff: float = 0.5, request_timeout: float = 30.0) -> None:
        self.address = address.rstrip("/")
        self.name = name or self.address
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.request_timeout = request_timeout
        self._token = token
        self._probe: dict[str, Any] | None = None
        self.uploaded: list[str] = []  # digests sent (the agent did not hold them yet), for the curious

    @classmethod
    def for_device(cls, device: Device, **kwargs: Any) -> AgentExecutor:
        """The executor of a remote device in targets.toml; its token from ``device.token_env``."""
        token = os.environ.get(device.token_env, "") if device.token_env else ""
        if not token:
            raise DeviceError(f"device '{device.name}' ({device.address}): no agent token: set ${device.token_env} "
                              f"to the token the agent was started with (targets.toml token_env)")
        return cls(device.address, token, name=device.name, timeout=device.timeout, **kwargs)

    def __repr__(self) -> str:  # never the token
        return f"AgentExecutor({self.name!r}, {self.address!r})"

    def _where(self) -> str:
        return f"device '{self.name}' ({self.address})" if self.name != self.address else f"agent {self.address}"

    # -- HTTP ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Callable[[], Any] | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float | None = None) -> tuple[int, bytes]:
        """One request with retries on connection failures; (status, body) of the answer."""
        attempts = self.retries + 1
        last = ""
        for attempt in range(attempts):
            try:
                return self._once(method, path, body, headers, timeout or self.request_timeout)
            except _Retry as exc:
                last = str(exc)
                if attempt + 1 < attempts:
                    delay = self.backoff * 2**attempt
                    log.debug("%s: %s %s failed (%s); retrying in %.1f s", self._where(), method, path, last, delay)
                    time.sleep(delay)
        raise DeviceError(f"{self._where()} unreachable: {last} (after {attempts} attempts); "
                          f"is 'deploykit agent' running there and the address right?")

    def _once(self, method: str, path: str, body: Callable[[], Any] | None, headers: Mapping[str, str] | None,
              timeout: float) -> tuple[int, bytes]:
        req = urllib.request.Request(self.address + path, data=body() if body else None, method=method,
                                     headers={"Authorization": f"Bearer {self._token}", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as exc:  # an answer: the agent's decision, not retried
            with exc:
                return exc.code, exc.read()
        except urllib.error.URLError as exc:
            raise _Retry(_reason(exc.reason)) from None
        except (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError, OSError) as exc:
            raise _Retry(_reason(exc)) from None
        finally:
            if req.data is not None and hasattr(req.data, "close"):
                req.data.close()

    def _json(self, method: str, path: str, payload: Any = None, ok: tuple[int, ...] = (200,),
              timeout: float | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        status, raw = self._request(method, path, (lambda: data) if data is not None else None,
                                    {"Content-Type": "application/json"} if data is not None else None, timeout)
        if status not in ok:
            self._refused(status, raw, f"{method} {path}")
        try:
            return json.loads(raw)
        except ValueError:
            raise DeviceError(f"{self._where()}: {method} {path} answered {status} with something that is not "
                              f"JSON; is that address a deploykit agent?") from None

    def _refused(self, status: int, raw: bytes, what: str) -> None:
        try:
            message = str(json.loads(raw).get("error", ""))
        except (ValueError, AttributeError):
            message = raw.decode("utf-8", "replace")[:200]
        if status == 401:
            raise DeviceError(f"{self._where()} refused the token (401): check that the token variable holds the "
                              f"token 'deploykit agent' was started with")
        raise DeviceError(f"{self._where()}: {what} refused ({status}): {message or 'no reason given'}")

    # -- the API ---------------------------------------------------------------------------
    def probe(self, refresh: bool = False) -> dict[str, Any]:
        """What the agent can run: ``api``, ``deploykit``, ``device`` (fingerprint), ``backends``
        (name -> availability), ``max_upload_bytes``, ``jobs`` (queued or running)."""
        if self._probe is None or refresh:
            probe = self._json("GET", "/v1/probe")
            if not isinstance(probe, dict) or probe.get("api") != API_VERSION:
                raise DeviceError(f"{self._where()}: speaks API {probe.get('api') if isinstance(probe, dict) else '?'}, "
                                  f"this deploykit speaks {API_VERSION}; install the same deploykit on both")
            if probe.get("schema_version") != SCHEMA_VERSION:
                raise DeviceError(f"{self._where()}: reads check jobs of schema {probe.get('schema_version')}, this "
                                  f"deploykit writes {SCHEMA_VERSION}; install the same deploykit on both")
            self._probe = probe
        return self._probe

    def upload(self, path: Path, digest: str | None = None) -> str:
        """Send one file unless the agent holds it already; its sha256."""
        digest = digest or sha256(path)
        status, _ = self._request("HEAD", f"/v1/blobs/{digest}")
        if status == 200:
            return digest
        if status != 404:
            self._refused(status, b"", f"HEAD /v1/blobs/{digest[:12]}...")
        self._put(path, digest)
        return digest

    def _put(self, path: Path, digest: str) -> None:
        size = path.stat().st_size
        limit = int(self.probe().get("max_upload_bytes", 0))
        if limit and size > limit:
            raise DeviceError(f"{self._where()}: {path.name} is {size / 2**20:.1f} MB, over the agent's upload limit "
                              f"of {limit / 2**20:.1f} MB (start it with a larger --max-upload-mb)")
        status, raw = self._request("PUT", f"/v1/blobs/{digest}", lambda: open(path, "rb"),
                                    {"Content-Length": str(size), "Content-Type": "application/octet-stream"},
                                    timeout=max(self.request_timeout, size / 2**20))  # >= 1 MB/s
        if status not in (200, 201):
            self._refused(status, raw, f"upload of {path.name}")
        self.uploaded.append(digest)

    def _backend(self, backend: str, can: str) -> None:
        availability = self.probe().get("backends", {}).get(backend)
        if not availability or not availability.get(can):
            why = (availability or {}).get("reason") or "backend not installed there"
            raise DeviceError(f"{self._where()} cannot {can.removeprefix('can_')} {backend}: {why}")

    def run(self, job: CheckJob) -> JobResult:
        self._backend(job.target.backend, "can_run")
        with tempfile.TemporaryDirectory(prefix="deploykit-ship-") as tmp:
            job_id = self._submit("/v1/jobs", bundle(job, Path(tmp)))
        result = JobResult.from_json(self._wait(job_id, job.target.name))
        result.notes.setdefault(DEVICE_NOTE, {"address": self.address, **self.probe().get("device", {})})
        return result

    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        """Lower ``canonical`` for ``target`` on the device (when only the device can: TensorRT
        engines are built where they run) and download the artifact beside ``dest``."""
        self._backend(target.backend, "can_lower")
        with tempfile.TemporaryDirectory(prefix="deploykit-ship-") as tmp:
            model, fp32 = f"model/{canonical.path.name}", f"model/fp32-{canonical.fp32_path.name}"
            request = {"kind": LOWER_KIND, "schema_version": SCHEMA_VERSION, "target": target_to_json(target),
                       "canonical": model, "fp32": fp32,
                       "example_shapes": {k: list(v) for k, v in (canonical.example_shapes or {}).items()} or None}
            (Path(tmp) / LOWER_FILE).write_text(json.dumps(request), encoding="utf-8")
            job_id = self._submit("/v1/lower", {LOWER_FILE: Path(tmp) / LOWER_FILE, model: canonical.path,
                                                fp32: canonical.fp32_path})
        art = self._wait(job_id, f"{target.name}: lowering")
        base = dest.parent
        try:
            files = {str(safe_name(name)): digest for name, digest in art["files"].items()}
            path = base / safe_name(art["path"])
        except (KeyError, AttributeError, ValueError) as exc:
            raise DeviceError(f"{self._where()}: {target.name}: a lowered artifact this client cannot place ({exc})") \
                from None
        for name, digest in files.items():
            self._download(str(digest), base / name)
        return Artifact(target.backend, path, tuple(base / name for name in files), dict(art.get("metadata", {})),
                        tuple(CheckResult.from_json(c) for c in art.get("checks", [])))

    def _download(self, digest: str, dest: Path) -> None:
        if not is_digest(digest):
            raise DeviceError(f"{self._where()}: answered {digest[:40]!r} for a file's sha256")
        status, raw = self._request("GET", f"/v1/blobs/{digest}", timeout=max(self.request_timeout, 600.0))
        if status != 200:
            self._refused(status, raw, f"download of {dest.name}")
        if hashlib.sha256(raw).hexdigest() != digest:
            raise DeviceError(f"{self._where()}: {dest.name} arrived damaged (its sha256 is not {digest[:12]}...)")
        with atomic_output(dest) as tmp:
            tmp.write_bytes(raw)

    def _submit(self, endpoint: str, files: Mapping[str, Path]) -> str:
        """POST the names and digests of ``files``; upload only those the agent says are missing
        (409) and post again: one round trip when it holds them all. The job's id."""
        digests = {name: sha256(path) for name, path in files.items()}
        body = json.dumps({"files": digests}).encode()
        headers = {"Content-Type": "application/json"}
        status, raw = self._request("POST", endpoint, lambda: body, headers)
        if status == 409:
            missing = set(_field(raw, "missing") or ())
            for name, path in files.items():
                if digests[name] in missing:
                    self._put(path, digests[name])
                    missing.discard(digests[name])
            status, raw = self._request("POST", endpoint, lambda: body, headers)
        if status != 202:
            self._refused(status, raw, f"POST {endpoint}")
        job_id = str(_field(raw, "id") or "")
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):
            raise DeviceError(f"{self._where()}: answered a job id {job_id[:40]!r} that is not one")
        return job_id

    def _wait(self, job_id: str, what: str) -> Any:
        """The job's result, long-polling until it is done or the device's timeout passes."""
        deadline = time.monotonic() + self.timeout
        while True:
            wait = max(0.0, min(20.0, deadline - time.monotonic()))
            state = self._json("GET", f"/v1/jobs/{job_id}?wait={wait:.1f}", timeout=wait + self.request_timeout)
            if state.get("state") == "done":
                return state["result"]
            if state.get("state") == "error":
                raise DeviceError(f"{self._where()}: {what}: {state.get('error') or 'failed'}")
            if time.monotonic() >= deadline:
                raise DeviceError(f"{self._where()}: {what}: no result within {self.timeout:g} s "
                                  f"(targets.toml [devices.{self.name}] timeout)")


def _field(raw: bytes, key: str) -> Any:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc.get(key) if isinstance(doc, dict) else None


def _reason(exc: object) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror or exc})"
    if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        return "connection lost"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DeviceRouter(DevicePlacing):
    """Each job on its target's device: ``local`` for this machine's, the device's
    :class:`AgentExecutor` for a device with an ``address`` (one per device, kept)."""

    def __init__(self, local: Executor, **agent_options: Any) -> None:
        self.local = local
        self.agent_options = agent_options
        self.agents: dict[str, AgentExecutor] = {}

    def agent(self, device: Device) -> AgentExecutor:
        if device.name not in self.agents:
            self.agents[device.name] = AgentExecutor.for_device(device, **self.agent_options)
        return self.agents[device.name]

    def accepts(self, target: Target, availability: Availability) -> str:
        return "" if target.device.address else self.local.accepts(target, availability)

    def run(self, job: CheckJob) -> JobResult:
        device = job.target.device
        return self.agent(device).run(job) if device.address else self.local.run(job)

    def lower(self, canonical: CanonicalModel, target: Target, dest: Path) -> Artifact:
        """Lower on the target's device (its agent), for a backend that cannot lower here."""
        if not target.device.address:
            raise DeviceError(f"{target.name}: device '{target.device.name}' has no agent to lower on")
        return self.agent(target.device).lower(canonical, target, dest)


def on_devices(executor: Executor) -> Executor:
    """``executor`` for this machine's targets and each remote device's agent for its own; an
    executor that places jobs on devices itself (a :class:`DeviceRouter`, Ray) as it is."""
    return executor if isinstance(executor, DevicePlacing) else DeviceRouter(executor)
