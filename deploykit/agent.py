"""``deploykit agent``: runs check jobs on the device it is started on, over HTTP.

A device in targets.toml with an ``address`` sends its targets' :class:`deploykit.jobs.CheckJob`
here (:class:`deploykit.remote.AgentExecutor`); the agent runs them with the backends
installed on the device and answers the same :class:`deploykit.results.JobResult` as a local
run. The rules it keeps (docs/agent.md):

- **A token or no service.** Every call needs ``Authorization: Bearer TOKEN``, compared with
  :func:`hmac.compare_digest`; the agent refuses to start without a token of at least
  :data:`MIN_TOKEN` characters.
- **Bounded uploads.** A file larger than ``--max-upload-mb`` is refused with 413, on its
  declared length and again while it streams in; nothing of it is kept.
- **Content-addressed files.** Uploads are stored under their sha256 (checked on arrival): a
  file the agent holds is never sent again.
- **Nothing outside its folder.** Every name in a job is checked before anything is written
  (:func:`deploykit.remote.safe_name`); each job gets a fresh folder, removed afterwards.
- **One timing job at a time.** Jobs queue for one worker thread: timings never overlap.
- **Says what it can run.** ``GET /v1/probe``: backends with their versions, the device's
  fingerprint, the upload limit.

The API, under ``/v1/``: ``GET /v1/probe``; ``HEAD|PUT /v1/blobs/SHA256``; ``POST /v1/jobs``
(``{"files": {NAME: SHA256}}`` -> 202 ``{"id"}``); ``GET /v1/jobs/ID?wait=SECONDS``
(``{"state": queued|running|done|error, "result"|"error"}``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import onnx

from deploykit._version import __version__
from deploykit.canonical import CalibrationTable, CanonicalModel
from deploykit.errors import ConfigError, DeploykitError
from deploykit.fileio import sha256
from deploykit.jobs import ARRAYS_FILE, JOB_FILE, CheckJob, run_job, target_from_json
from deploykit.plugins import Registry, load_registry
from deploykit.remote import (
    API_VERSION,
    DEVICE_NOTE,
    LOWER_FILE,
    LOWER_KIND,
    check_job_json,
    check_names,
    fingerprint,
    inside,
    is_digest,
    lay_out,
    safe_name,
    write_files,
)
from deploykit.results import SCHEMA_VERSION, jsonable
from deploykit.targets import Device, Target

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

log = logging.getLogger("deploykit")

TOKEN_ENV = "DEPLOYKIT_AGENT_TOKEN"
MIN_TOKEN = 16
DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD_MB = 1024.0
MAX_JOB_REQUEST = 1 << 20  # the POST /v1/jobs body: names and digests only
MAX_WAIT = 60.0  # longest long-poll of GET /v1/jobs/ID
KEEP_FINISHED = 64  # finished jobs whose result can still be fetched
INSTALL_HINT = "pip install 'deploykit[agent]'"


def read_token(token_file: Path | None) -> str:
    """The token from ``token_file`` or ``$DEPLOYKIT_AGENT_TOKEN``; ConfigError when there is none
    or it is shorter than :data:`MIN_TOKEN` characters."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {token_file}: cannot read it ({exc})") from None
        where = f"--token-file {token_file}"
    else:
        token, where = os.environ.get(TOKEN_ENV, "").strip(), f"${TOKEN_ENV}"
    if not token:
        raise ConfigError(f"no agent token: set {TOKEN_ENV} or pass --token-file FILE (an agent never serves "
                          f"without one; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if len(token) < MIN_TOKEN:
        raise ConfigError(f"{where}: the token has {len(token)} characters; use at least {MIN_TOKEN} (e.g. "
                          f"python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def backends_here(registry: Registry) -> dict[str, dict[str, Any]]:
    """Each installed backend's availability on this device (``Backend.probe``)."""
    out = {}
    for name in sorted(registry.names()):
        try:
            availability = registry.get(name).probe(Target(name, name, Device("local", "cpu", "this device")))
            out[name] = availability.to_json()
        except Exception as exc:  # a probe must never take the agent down
            out[name] = {"can_lower": False, "can_run": False, "reason": f"{type(exc).__name__}: {exc}"}
    return out


@dataclass
class _Entry:
    id: str
    target: str
    state: str = "queued"  # queued | running | done | error
    result: dict[str, Any] | None = None
    error: str = ""
    submitted: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "target": self.target, "state": self.state}
        if self.result is not None:
            out["result"] = self.result
        if self.error:
            out["error"] = self.error
        return out


class Worker:
    """One thread running jobs in arrival order: one timing job at a time."""

    def __init__(self, registry: Registry, device: dict[str, Any], announce: Callable[[str], None]) -> None:
        self.registry = registry
        self.device = device
        self.announce = announce
        self.entries: dict[str, _Entry] = {}
        self._queue: queue.Queue[tuple[_Entry, Callable[[], dict[str, Any]], Path]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="deploykit-agent-worker", daemon=True)
        self._thread.start()

    def submit(self, job: CheckJob, folder: Path, job_id: str) -> _Entry:
        """Queue a check job; its result is the JobResult's JSON."""
        def work() -> dict[str, Any]:
            result = run_job(job, self.registry)
            result.notes[DEVICE_NOTE] = {**self.device, **self._device_info(job)}
            return result.to_json()

        return self.queue(f"{job.target.name}, {job.target.backend}", work, folder, job_id)

    def queue(self, label: str, work: Callable[[], dict[str, Any]], folder: Path, job_id: str) -> _Entry:
        """Queue ``work`` (run in ``folder``, removed afterwards); its result is what it returns."""
        entry = _Entry(job_id, label)
        with self._lock:
            self.entries[job_id] = entry
            finished = [e for e in self.entries.values() if e.done.is_set()]
            for old in sorted(finished, key=lambda e: e.submitted)[:max(0, len(finished) - KEEP_FINISHED)]:
                del self.entries[old.id]
        self._queue.put((entry, work, folder))
        return entry

    def pending(self) -> int:
        with self._lock:
            return sum(not e.done.is_set() for e in self.entries.values())

    def _device_info(self, job: CheckJob) -> dict[str, Any]:
        try:
            return dict(self.registry.get(job.target.backend).device_info(job.target))
        except Exception as exc:  # device facts are nice to have, never fatal
            return {"device_info_error": f"{type(exc).__name__}: {exc}"}

    def _loop(self) -> None:
        while True:
            entry, work, folder = self._queue.get()
            entry.state = "running"
            t0 = time.monotonic()
            try:
                entry.result, entry.state = work(), "done"
            except DeploykitError as exc:
                entry.error, entry.state = str(exc), "error"
            except Exception as exc:  # a plugin's bug fails this job, never the agent
                log.debug("job %s failed", entry.id, exc_info=True)
                entry.error, entry.state = f"{type(exc).__name__}: {exc}", "error"
            finally:
                shutil.rmtree(folder, ignore_errors=True)
                entry.done.set()
            self.announce(f"job {entry.id[:8]} ({entry.target}): {entry.state} in "
                          f"{time.monotonic() - t0:.1f} s" + (f": {entry.error}" if entry.error else ""))


def check_lower_request(raw: object, names: set[str]) -> dict[str, Any]:
    """A received ``lower.json``, or ValueError: its two model names safe and among the files."""
    if not isinstance(raw, dict) or raw.get("kind") != LOWER_KIND:
        raise ValueError(f"{LOWER_FILE} is not a lowering request")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{LOWER_FILE} has schema {raw.get('schema_version')}, this agent reads {SCHEMA_VERSION}")
    for key in ("canonical", "fp32"):
        if str(safe_name(raw.get(key))) not in names:
            raise ValueError(f"{LOWER_FILE} {key}: {str(raw.get(key))[:80]!r} is not one of the files sent")
    if not isinstance(raw.get("target"), dict):
        raise ValueError(f"{LOWER_FILE} has no target")
    return raw


def lower_here(folder: Path, request: dict[str, Any], registry: Registry, blobs: Path) -> dict[str, Any]:
    """Lower the canonical model laid out in ``folder`` with this device's backend; store the
    artifact's files in ``blobs`` (content-addressed) and describe it: path, files by sha256,
    metadata, the backend's verification checks."""
    target = target_from_json(request["target"])
    backend = registry.get(target.backend)
    path = folder / safe_name(request["canonical"])
    model = onnx.load(str(path))
    shapes = request.get("example_shapes")
    canonical = CanonicalModel(path, model, CalibrationTable.from_model(model), folder / safe_name(request["fp32"]),
                               {k: tuple(v) for k, v in shapes.items()} if shapes else None)
    out = folder / "out"
    artifact = backend.lower(canonical, target, out / f"{target.name}{backend.artifact_suffix}")
    files = {}
    for f in artifact.files or ([artifact.path] if artifact.path.is_file() else sorted(artifact.path.rglob("*"))):
        if not f.is_file() or not inside(f, out):
            continue
        digest = sha256(f)
        if not (blobs / digest).is_file():
            tmp = blobs / f".lowered-{uuid.uuid4().hex}"
            shutil.copyfile(f, tmp)
            os.replace(tmp, blobs / digest)
        files[f.resolve().relative_to(out.resolve()).as_posix()] = digest
    return {"path": artifact.path.resolve().relative_to(out.resolve()).as_posix(), "files": files,
            "metadata": jsonable(dict(artifact.metadata)), "checks": [c.to_json() for c in artifact.checks]}


def create_app(folder: Path, token: str, max_upload_bytes: int, registry: Registry | None = None,
               announce: Callable[[str], None] = lambda line: None) -> Starlette:
    """The agent's ASGI application (serve it with uvicorn; :func:`serve` does)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    if len(token) < MIN_TOKEN:
        raise ConfigError(f"the agent token must have at least {MIN_TOKEN} characters")
    registry = registry or load_registry()
    folder = folder.resolve()
    blobs, jobs = folder / "blobs", folder / "jobs"
    blobs.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(jobs, ignore_errors=True)  # folders of jobs a previous agent never finished
    jobs.mkdir()
    device = fingerprint()
    available = backends_here(registry)
    worker = Worker(registry, device, announce)

    class ResultJSON(JSONResponse):
        """JSON keeping NaN and infinity (Python's json reads them): a garbage metric stays NaN, as
        in a local run, instead of failing the response."""

        def render(self, content: Any) -> bytes:
            return json.dumps(content, allow_nan=True, separators=(",", ":")).encode()

    def error(status: int, message: str, **extra: Any) -> Response:
        return JSONResponse({"error": message, **extra}, status)

    async def probe(request: Request) -> Response:
        return JSONResponse({"api": API_VERSION, "schema_version": SCHEMA_VERSION, "deploykit": __version__,
                             "device": device, "backends": available, "max_upload_bytes": max_upload_bytes,
                             "jobs": worker.pending()})

    async def blob(request: Request) -> Response:
        digest = request.path_params["digest"]
        if not is_digest(digest):
            return error(400, "a blob is named by its sha256: 64 lowercase hex digits")
        dest = blobs / digest
        if request.method == "HEAD":
            return Response(status_code=200 if dest.is_file() else 404)
        if request.method == "GET":  # an artifact this agent lowered
            return FileResponse(dest) if dest.is_file() else error(404, "no such file")
        if dest.is_file():  # content-addressed: already here, nothing to store
            return JSONResponse({"digest": digest, "stored": False}, 200)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_upload_bytes):
            return error(413, f"upload of {declared} bytes refused: the limit is {max_upload_bytes} bytes "
                              f"(agent --max-upload-mb)")
        tmp = blobs / f".upload-{uuid.uuid4().hex}"
        h, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:  # a wrong or missing Content-Length: counted as it arrives
                        return error(413, f"upload refused past {max_upload_bytes} bytes (agent --max-upload-mb)")
                    h.update(chunk)
                    fh.write(chunk)
            if h.hexdigest() != digest:
                return error(400, f"the content's sha256 is {h.hexdigest()}, not the name it was sent under")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return JSONResponse({"digest": digest, "stored": True}, 201)

    async def uploaded_files(request: Request, what: str,
                             required: tuple[str, ...]) -> tuple[dict[str, str], bytes] | Response:
        """The request's ``{"files": {name: sha256}}`` (every blob already uploaded) and the body of
        its ``required[0]`` file, or the error response: nothing is written before this passes."""
        declared = request.headers.get("content-length", "")
        if not declared.isdigit() or int(declared) > MAX_JOB_REQUEST:
            return error(413, f"{what} is JSON of at most {MAX_JOB_REQUEST} bytes with a Content-Length")
        try:
            files = json.loads(await request.body())["files"]
            if not isinstance(files, dict) or not all(isinstance(d, str) and is_digest(d) for d in files.values()):
                raise ValueError("'files' must map each file name to its sha256")
            check_names(list(files), required=required)
        except (ValueError, KeyError, TypeError) as exc:
            return error(400, f"{what} refused, nothing written: {exc}")
        missing = sorted({d for d in files.values() if not (blobs / d).is_file()})
        if missing:
            return error(409, "upload these files first", missing=missing)
        return files, (blobs / files[required[0]]).read_bytes()

    def copies_of(files: dict[str, str]) -> dict[str, Callable[[Path], None]]:
        """{name: sha256} -> {name: a writer copying that blob to the path it is given}."""
        return {name: functools.partial(shutil.copyfile, blobs / digest) for name, digest in files.items()}

    async def submit(request: Request) -> Response:
        got = await uploaded_files(request, "a job request", (JOB_FILE, ARRAYS_FILE))
        if isinstance(got, Response):
            return got
        files, job_json = got
        try:
            check_job_json(json.loads(job_json.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"job refused, nothing written: {exc}")
        job_id = uuid.uuid4().hex
        job_dir = jobs / job_id

        def place() -> CheckJob:
            job_dir.mkdir()
            try:
                return lay_out(job_dir, copies_of(files))
            except BaseException:
                shutil.rmtree(job_dir, ignore_errors=True)
                raise

        try:
            job = await run_in_threadpool(place)
        except (ValueError, DeploykitError) as exc:
            return error(400, f"job refused: {exc}")
        worker.submit(job, job_dir, job_id)
        return JSONResponse({"id": job_id}, 202)

    async def lower(request: Request) -> Response:
        """Lower on this device (a backend only the device has, e.g. TensorRT): the canonical model
        in, the artifact's files into the blob store, their names and digests out."""
        got = await uploaded_files(request, "a lowering request", (LOWER_FILE,))
        if isinstance(got, Response):
            return got
        files, lower_json = got
        try:
            spec = check_lower_request(json.loads(lower_json.decode("utf-8")), set(files))
            if spec["target"].get("backend") not in available:
                raise ValueError(f"no backend {str(spec['target'].get('backend'))[:40]!r} on this device")
        except (ValueError, UnicodeDecodeError) as exc:
            return error(400, f"request refused, nothing written: {exc}")
        job_id = uuid.uuid4().hex
        job_dir = jobs / job_id

        def place() -> None:
            job_dir.mkdir()
            write_files(job_dir, copies_of(files))

        await run_in_threadpool(place)
        label = f"{spec['target'].get('name')}, lower with {spec['target'].get('backend')}"
        worker.queue(label, lambda: lower_here(job_dir, spec, registry, blobs), job_dir, job_id)
        return JSONResponse({"id": job_id}, 202)

    async def status(request: Request) -> Response:
        entry = worker.entries.get(request.path_params["job_id"])
        if entry is None:
            return error(404, "no such job (the agent may have restarted): submit it again")
        try:
            wait = min(MAX_WAIT, max(0.0, float(request.query_params.get("wait", "0"))))
        except ValueError:
            return error(400, "wait must be a number of seconds")
        if wait and not entry.done.is_set():
            await run_in_threadpool(entry.done.wait, wait)
        return ResultJSON(entry.to_json())

    app = Starlette(routes=[
        Route("/v1/probe", probe, methods=["GET"]),
        Route("/v1/blobs/{digest}", blob, methods=["HEAD", "PUT", "GET"]),
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/lower", lower, methods=["POST"]),
        Route("/v1/jobs/{job_id}", status, methods=["GET"]),
    ])
    app.add_middleware(_BearerAuth, token=token)  # around everything: no answer at all without the token
    app.state.backends = available
    return app


class _BearerAuth:
    """401 for any request whose ``Authorization`` is not ``Bearer TOKEN`` (constant-time)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                from starlette.responses import JSONResponse

                response = JSONResponse({"error": "missing or wrong token (Authorization: Bearer TOKEN)"}, 401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def serve(host: str, port: int, folder: Path, token: str, max_upload_mb: float, cert: Path | None = None,
          key: Path | None = None, announce: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM stop it)."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError(f"deploykit agent needs starlette and uvicorn: {INSTALL_HINT}") from None
    if (cert is None) != (key is None):
        raise ConfigError("TLS needs both --cert and --key")
    for path in (cert, key):
        if path is not None and not path.is_file():
            raise ConfigError(f"{path}: file not found")
    from deploykit import progress

    progress.set_enabled(False)  # jobs run in a worker thread: one line each, no live bars
    app = create_app(folder, token, int(max_upload_mb * 2**20), announce=announce)
    scheme = "https" if cert else "http"
    shown = f"[{host}]" if ":" in host else host
    runs = [name for name, a in app.state.backends.items() if a.get("can_run")]
    announce(f"deploykit agent {__version__}: serving {scheme}://{shown}:{port}/v1/ from {folder.resolve()}; "
             f"runs {', '.join(runs) or 'no backend (install one)'}; uploads up to {max_upload_mb:g} MB; "
             f"one timing job at a time")
    uvicorn.run(app, host=host, port=port, log_level="warning", ssl_certfile=str(cert) if cert else None,
                ssl_keyfile=str(key) if key else None, access_log=False,
                timeout_graceful_shutdown=5)  # a client's long-poll does not hold Ctrl-C up
