"""The device agent (``deploykit agent``) and remote targets, with real agent processes on
loopback: two ports stand for two devices. Every test talks HTTP to a real server."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the agent needs starlette and uvicorn: pip install 'deploykit[agent]'")
pytest.importorskip("uvicorn", reason="the agent needs starlette and uvicorn: pip install 'deploykit[agent]'")

import deploykit  # noqa: E402
from deploykit.errors import ConfigError, DeviceError  # noqa: E402
from deploykit.jobs import LocalExecutor  # noqa: E402
from deploykit.pipeline import BuildOptions, build  # noqa: E402
from deploykit.remote import AgentExecutor, DeviceRouter, check_job_json, safe_name  # noqa: E402
from deploykit.targets import load_targets  # noqa: E402
from deploykit.testing.forked import Forked  # noqa: E402

SAMPLES = Path(deploykit.__file__).parent / "samples"
TOKEN = "agent-test-token-0123456789"
#: only onnxruntime in the agents: they start in seconds
ENV = {**os.environ, "DEPLOYKIT_DISABLE_PLUGINS": "openvino,tflite,coreml,tensorrt"}
TIMED = {"latency_p50_ms", "latency_p99_ms", "throughput", "speedup", "memory_mb"}
ESCAPES = ["../outside.txt", "/tmp/outside.txt", "a/../../outside.txt", "a\\..\\outside.txt", "./a/../x", "", "a//b"]


@dataclass
class Agent:
    port: int
    folder: Path
    log: Path
    proc: Forked | None = None
    max_upload_mb: float = 64.0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Agent:
        """``deploykit agent`` in a process of its own (forked from this one: no interpreter start-up)."""
        args = ["agent", "--port", str(self.port), "--folder", str(self.folder), "--max-upload-mb",
                str(self.max_upload_mb)]

        def agent() -> int:
            from deploykit.cli import main

            return main(args)

        self.proc = Forked(agent, env={**ENV, "DEPLOYKIT_AGENT_TOKEN": TOKEN}, stderr=self.log)
        return self

    def wait_ready(self, timeout: float = 120.0) -> Agent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                if _call("GET", self.address + "/v1/probe", token=TOKEN)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"agent on {self.address} did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(method: str, url: str, body: bytes | None = None, token: str | None = TOKEN,
          headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


@pytest.fixture(scope="module")
def agents(tmp_path_factory):
    """Two agent processes standing for two devices (started together: a few seconds)."""
    root = tmp_path_factory.mktemp("agents")
    started = [Agent(_free_port(), root / n, root / f"{n}.log").start() for n in ("a", "b")]
    try:
        yield {a.folder.name: a.wait_ready() for a in started}
    finally:
        for a in started:
            a.kill()


@contextlib.contextmanager
def _in_process(folder: Path, max_upload_bytes: int, **ssl: str):
    """An agent served by uvicorn in a thread of this process: the same application and server
    as ``deploykit agent``, without another process start-up."""
    import threading

    import uvicorn

    import deploykit_onnxruntime
    from deploykit.agent import create_app
    from deploykit.plugins import PluginInfo, Registry

    registry = Registry()
    registry.add_plugin(deploykit_onnxruntime, PluginInfo("onnxruntime", "deploykit_onnxruntime"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(folder, TOKEN, max_upload_bytes, registry), host="127.0.0.1",
                                           port=port, log_level="warning", **ssl))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield Agent(port, folder, folder / "log")
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """An agent with a 0.05 MB upload limit."""
    with _in_process(tmp_path_factory.mktemp("small"), int(0.05 * 2**20)) as agent:
        yield agent


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _targets(tmp_path: Path, devices: dict[str, str], token_env: str = "DK_TEST_AGENT_TOKEN",
             runs: dict[str, int] | None = None) -> Path:
    """targets.toml: ``local`` on this machine, ``<device>-ort`` on each remote device."""
    text = ""
    for name, address in devices.items():
        text += f'[devices.{name}]\naddress = "{address}"\ntoken_env = "{token_env}"\n'
    for name in ["local", *devices]:
        text += (f'[targets.{name}-ort]\nbackend = "onnxruntime"\nbatch_sizes = [1, 4]\nwarmup = 1\n'
                 f'runs = {(runs or {}).get(name, 5)}\n'
                 + (f'device = "{name}"\n' if name != "local" else "")
                 + f'[targets.{name}-ort.options]\nactivations = "int8"\n'
                 f'[targets.{name}-ort.thresholds]\nmin_top1_agreement = 0.9\n')
    path = tmp_path / "targets.toml"
    path.write_text(text)
    return path


def _build(tmp_path: Path, toml: Path, names: list[str], registry, out: str = "out", executor=None):
    opts = BuildOptions(targets=names, out_dir=tmp_path / out, targets_file=toml, method="minmax",
                        calib=str(SAMPLES / "digits_calib.npz"), eval=str(SAMPLES / "digits_eval.npz"),
                        eval_samples=128, baseline=False)
    return {t.target.name: t for t in build(str(SAMPLES / "digits_cnn.onnx"), opts, registry, executor).targets}


def _untimed(target) -> dict[str, tuple]:
    return {c.name: (c.status, c.value) for c in target.checks if c.name not in TIMED}


# ---------------------------------------------------------------------------------------
# the server's rules
# ---------------------------------------------------------------------------------------
def test_no_token_no_service(tmp_path, monkeypatch, capsys):
    from deploykit.agent import create_app, read_token
    from deploykit.cli import main

    monkeypatch.delenv("DEPLOYKIT_AGENT_TOKEN", raising=False)
    assert main(["agent", "--port", str(_free_port()), "--folder", str(tmp_path / "f")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deploykit: error: no agent token: set DEPLOYKIT_AGENT_TOKEN")
    assert not (tmp_path / "f").exists()  # refused before it touched anything
    monkeypatch.setenv("DEPLOYKIT_AGENT_TOKEN", "short-token")
    with pytest.raises(ConfigError, match="has 11 characters; use at least 16"):
        read_token(None)
    (tmp_path / "token").write_text("  file-token-0123456789\n")
    assert read_token(tmp_path / "token") == "file-token-0123456789"
    with pytest.raises(ConfigError, match="at least 16"):
        create_app(tmp_path / "f", "short", 100)
    assert not (tmp_path / "f").exists()


def test_wrong_or_missing_token_is_refused_and_nothing_is_stored(agents):
    a = agents["a"]
    before = _files(a.folder)
    digest = "0" * 64
    for token in (None, "wrong-token-0123456789", TOKEN + "x", "Bearer " + TOKEN):
        assert _call("GET", a.address + "/v1/probe", token=token)[0] == 401
        assert _call("HEAD", f"{a.address}/v1/blobs/{digest}", token=token)[0] == 401
        assert _call("PUT", f"{a.address}/v1/blobs/{digest}", b"x" * 100, token=token)[0] == 401
        assert _call("POST", a.address + "/v1/jobs", b'{"files": {}}', token=token)[0] == 401
        assert _call("GET", a.address + "/v1/nothing-here", token=token)[0] == 401  # no answer without it
    assert _files(a.folder) == before


def test_probe_says_what_the_device_can_run(agents):
    status, raw = _call("GET", agents["a"].address + "/v1/probe")
    probe = json.loads(raw)
    assert status == 200 and probe["api"] == 1
    assert probe["backends"]["onnxruntime"]["can_run"] and probe["backends"]["onnxruntime"]["versions"]["onnxruntime"]
    assert "openvino" not in probe["backends"]  # disabled in the test agents: says only what is installed
    assert probe["device"]["cores"] == os.cpu_count() and probe["device"]["hostname"] == socket.gethostname()
    assert probe["max_upload_bytes"] == 64 * 2**20


def test_oversized_upload_is_refused_with_413_and_nothing_is_kept(small):
    limit = int(0.05 * 2**20)
    body = os.urandom(limit + 1)
    import hashlib

    digest = hashlib.sha256(body).hexdigest()
    assert _call("PUT", f"{small.address}/v1/blobs/{digest}", body)[0] == 413  # on the declared length
    # no Content-Length (chunked): refused while it streams in
    conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)
    conn.putrequest("PUT", f"/v1/blobs/{digest}")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(body), 8192):
        piece = body[i:i + 8192]
        conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    conn.send(b"0\r\n\r\n")
    assert conn.getresponse().status == 413
    conn.close()
    assert _call("HEAD", f"{small.address}/v1/blobs/{digest}")[0] == 404
    assert _files(small.folder / "blobs") == []
    # within the limit: stored under its sha256, checked on arrival
    ok = body[:1000]
    assert _call("PUT", f"{small.address}/v1/blobs/{hashlib.sha256(ok).hexdigest()}", ok)[0] == 201
    assert _call("PUT", f"{small.address}/v1/blobs/{'1' * 64}", ok)[0] == 400  # content is not its name
    assert [p.name for p in _files(small.folder / "blobs")] == [hashlib.sha256(ok).hexdigest()]


@pytest.mark.parametrize("name", ESCAPES)
def test_a_file_name_leaving_the_agents_folder_is_refused_and_nothing_written(agents, name):
    a = agents["a"]
    job = b'{"kind": "deploykit.check_job"}'
    import hashlib

    assert _call("PUT", f"{a.address}/v1/blobs/{hashlib.sha256(job).hexdigest()}", job)[0] in (200, 201)
    before = _files(a.folder)
    files = {"job.json": hashlib.sha256(job).hexdigest(), "arrays.npz": hashlib.sha256(job).hexdigest(),
             name: hashlib.sha256(job).hexdigest()}
    status, raw = _call("POST", a.address + "/v1/jobs", json.dumps({"files": files}).encode(),
                        headers={"Content-Type": "application/json"})
    assert status == 400 and "nothing written" in json.loads(raw)["error"]
    assert _files(a.folder) == before
    assert not (a.folder.parent / "outside.txt").exists() and not Path("/tmp/outside.txt").exists()


def test_a_job_naming_a_path_outside_its_folder_is_refused(agents, tmp_path):
    """The names are fine but job.json points its model at files elsewhere on the device."""
    import hashlib

    a = agents["a"]
    for bad in ("../../../etc/passwd", "/etc/passwd", "model/../../x.onnx"):
        raw = {"kind": "deploykit.check_job", "canonical_path": bad, "fp32_path": "model/fp32.onnx",
               "artifact": {"path": "artifact/m.onnx", "files": ["artifact/m.onnx"]}}
        with pytest.raises(ValueError):
            check_job_json(raw)
        blob = json.dumps(raw).encode()
        digest = hashlib.sha256(blob).hexdigest()
        assert _call("PUT", f"{a.address}/v1/blobs/{digest}", blob)[0] in (200, 201)
        before = _files(a.folder)
        status, answer = _call("POST", a.address + "/v1/jobs",
                               json.dumps({"files": {"job.json": digest, "arrays.npz": digest}}).encode(),
                               headers={"Content-Type": "application/json"})
        assert status == 400 and "canonical_path" in json.loads(answer)["error"]
        assert _files(a.folder) == before and list((a.folder / "jobs").iterdir()) == []


def test_a_lowering_request_naming_files_it_did_not_send_is_refused(agents):
    import hashlib

    a = agents["a"]
    for canonical in ("../../etc/passwd", "/etc/passwd", "model/other.onnx"):
        raw = {"kind": "deploykit.lower_request", "schema_version": 1, "target": {"backend": "onnxruntime"},
               "canonical": canonical, "fp32": "model/fp32.onnx"}
        blob = json.dumps(raw).encode()
        digest = hashlib.sha256(blob).hexdigest()
        assert _call("PUT", f"{a.address}/v1/blobs/{digest}", blob)[0] in (200, 201)
        before = _files(a.folder)
        status, answer = _call("POST", a.address + "/v1/lower",
                               json.dumps({"files": {"lower.json": digest, "model/fp32.onnx": digest}}).encode(),
                               headers={"Content-Type": "application/json"})
        assert status == 400 and "nothing written" in json.loads(answer)["error"]
        assert _files(a.folder) == before and list((a.folder / "jobs").iterdir()) == []


def test_safe_names():
    assert str(safe_name("artifact/model.xml")) == "artifact/model.xml"
    for bad in ESCAPES + ["C:/x", "a/\x00b", None, "x" * 600]:
        with pytest.raises(ValueError):
            safe_name(bad)


# ---------------------------------------------------------------------------------------
# remote targets in targets.toml
# ---------------------------------------------------------------------------------------
def test_targets_toml_never_holds_a_token(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('[devices.d]\naddress = "http://d:1"\ntoken = "s3cret-s3cret-s3cret"\n')
    with pytest.raises(ConfigError, match=r"\[devices.d\] key 'token': never write the agent token"):
        load_targets(toml)
    toml.write_text('[devices.d]\naddress = "http://d:1"\ntoken_env = "s3cret s3cret"\n')
    with pytest.raises(ConfigError, match="not an environment variable name"):
        load_targets(toml)
    toml.write_text('[devices.d]\naddress = "ftp://d:1/x"\n')
    with pytest.raises(ConfigError, match="not an agent address"):
        load_targets(toml)
    toml.write_text('[devices.d]\naddress = "jetson.local:8765"\ntimeout = 60\n[devices.e]\nkind = "cpu"\n')
    tf = load_targets(toml)
    d, e = tf.devices["d"], tf.devices["e"]
    assert (d.address, d.token_env, d.timeout) == ("http://jetson.local:8765", "DEPLOYKIT_AGENT_TOKEN", 60.0)
    assert (e.address, e.token_env) == ("", "")


def test_remote_targets_give_the_local_accuracy_figures(agents, tmp_path, ort_registry, monkeypatch):
    """One build, three targets: this machine and two agents. Same figures; the second build
    sends no file again (everything is content-addressed)."""
    monkeypatch.setenv("DK_TEST_AGENT_TOKEN", TOKEN)
    toml = _targets(tmp_path, {"a": agents["a"].address, "b": agents["b"].address})
    router = DeviceRouter(LocalExecutor(ort_registry))
    got = _build(tmp_path, toml, ["local-ort", "a-ort", "b-ort"], ort_registry, executor=router)
    assert all(t.status == "ok" for t in got.values()), {n: t.reason for n, t in got.items()}
    local = _untimed(got["local-ort"])
    assert {"top1_agreement", "cosine", "fidelity_rel_l2", "accuracy"} <= set(local)
    assert _untimed(got["a-ort"]) == local and _untimed(got["b-ort"]) == local
    for name in ("a", "b"):
        t = got[f"{name}-ort"]
        assert [entry.stats.batch_size for entry in t.latency] == [1, 4] and t.latency[0].stats.p50_ms > 0
        assert t.device_info["hostname"] == socket.gethostname() and "onnxruntime" in t.device_info
        assert router.agents[name].uploaded  # the first build sent its files
    sent = {name: list(agent.uploaded) for name, agent in router.agents.items()}
    again = _build(tmp_path, toml, ["a-ort", "b-ort"], ort_registry, out="out2", executor=router)
    assert all(t.status == "ok" for t in again.values())
    assert {name: list(agent.uploaded) for name, agent in router.agents.items()} == sent  # nothing re-sent


def test_wrong_token_fails_that_target_only(agents, tmp_path, ort_registry, monkeypatch):
    monkeypatch.setenv("DK_TEST_AGENT_TOKEN", "not-the-token-0123456789")
    got = _build(tmp_path, _targets(tmp_path, {"a": agents["a"].address}), ["local-ort", "a-ort"], ort_registry)
    assert got["local-ort"].status == "ok"
    bad = got["a-ort"]
    assert bad.status == "error" and "refused the token (401)" in bad.reason and agents["a"].address in bad.reason
    assert bad.artifact is not None and bad.artifact.path.is_file()  # lowered here; only the checks failed


def test_no_token_in_the_environment_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("DK_TEST_AGENT_TOKEN", raising=False)
    device = load_targets(_targets(tmp_path, {"edge": "http://127.0.0.1:9"})).devices["edge"]
    with pytest.raises(DeviceError, match=r"device 'edge' \(http://127.0.0.1:9\): no agent token: set "
                                          r"\$DK_TEST_AGENT_TOKEN"):
        DeviceRouter(LocalExecutor()).agent(device)


def test_agent_executor_errors_are_one_line_naming_the_device(agents):
    executor = AgentExecutor(agents["a"].address, TOKEN, name="a")
    assert executor.probe()["backends"]["onnxruntime"]["can_run"]
    assert "TOKEN" not in repr(executor) and TOKEN not in repr(executor)
    gone = AgentExecutor(f"http://127.0.0.1:{_free_port()}", TOKEN, name="gone", retries=1, backoff=0.01)
    with pytest.raises(DeviceError, match=r"device 'gone' \(http://127.0.0.1:\d+\) unreachable: connection refused "
                                          r"\(after 2 attempts\)"):
        gone.probe()


def test_a_backend_that_cannot_lower_here_lowers_on_the_device(agents, tmp_path, ort_registry, monkeypatch):
    """As a TensorRT engine is built on the Jetson: the build machine's probe says it cannot
    lower (patched here: no TensorRT on any machine of this test), the agent lowers with its
    real backend, the artifact is downloaded into --out and checked on the device."""
    import deploykit_onnxruntime
    from deploykit.fileio import sha256
    from deploykit.results import Availability

    monkeypatch.setenv("DK_TEST_AGENT_TOKEN", TOKEN)
    real_probe = deploykit_onnxruntime.OnnxRuntimeBackend.probe

    def probe(self, target):  # this machine cannot lower for the remote device; the agent can
        return Availability.missing("no SDK for this device here") if target.device.address else real_probe(self,
                                                                                                             target)

    monkeypatch.setattr(deploykit_onnxruntime.OnnxRuntimeBackend, "probe", probe)
    toml = _targets(tmp_path, {"a": agents["a"].address})
    got = _build(tmp_path, toml, ["local-ort", "a-ort"], ort_registry)
    here, there = got["local-ort"], got["a-ort"]
    assert here.status == "ok" and there.status == "ok", there.reason
    assert there.metadata["lowered_on"] == f"a ({agents['a'].address})"
    assert there.artifact is not None and there.artifact.path.is_file()
    assert sha256(there.artifact.path) == sha256(here.artifact.path)  # the same lowering, done there
    assert _untimed(there) == _untimed(here)
    assert (tmp_path / "out" / "a-ort" / there.artifact.path.name).is_file()  # published into --out


def test_a_matrix_through_two_agents_gives_the_local_figures_and_a_dead_one_fails_its_cells_only(
        agents, tmp_path, monkeypatch):
    """deploykit matrix: each model x target is a check job; a remote device's go to its agent."""
    from deploykit.matrix import MatrixOptions, load_spec, run_matrix

    monkeypatch.setenv("DK_TEST_AGENT_TOKEN", TOKEN)
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path / "cache"))
    devices = {"a": agents["a"].address, "b": agents["b"].address, "gone": f"http://127.0.0.1:{_free_port()}"}
    toml = _targets(tmp_path, devices)
    spec_path = tmp_path / "matrix.toml"
    spec_path.write_text(f'[[models]]\nname = "digits"\npath = "{SAMPLES / "digits_cnn.onnx"}"\n'
                         f'calib = "{SAMPLES / "digits_calib.npz"}"\neval = "{SAMPLES / "digits_eval.npz"}"\n'
                         f'[matrix]\ntargets = ["local-ort", "a-ort", "b-ort", "gone-ort"]\nbatch_sizes = [1]\n'
                         f'precisions = ["fp32", "int8"]\nrounds = 2\nwarmup = 1\nmin_round_ms = 5\n'
                         f'eval_samples = 128\ntargets_file = "{toml}"\n')
    router = DeviceRouter(LocalExecutor(), retries=1, backoff=0.01)
    result = run_matrix(load_spec(spec_path), MatrixOptions(tmp_path / "out", db=tmp_path / "h.sqlite",
                                                            executor=router))
    cells = {c.key: c for c in result.cells}
    for p in ("fp32", "int8"):
        here = cells[f"digits/local-ort/b1/{p}"]
        assert here.status == "ok" and here.top1_agreement is not None
        for device in ("a", "b"):
            there = cells[f"digits/{device}-ort/b1/{p}"]
            assert there.status == "ok", there.error
            assert (there.top1_agreement, there.cosine, there.accuracy) == (here.top1_agreement, here.cosine,
                                                                            here.accuracy)
            assert there.p50_ms and there.speedup is not None
        gone = cells[f"digits/gone-ort/b1/{p}"]
        assert gone.status == "error" and "unreachable" in gone.error and devices["gone"] in gone.error
    assert len(result.errors) == 2  # the dead device's two cells, nothing else


def test_an_agent_killed_mid_job_fails_its_target_the_rest_complete_and_a_rerun_finishes(agents, tmp_path,
                                                                                          ort_registry, monkeypatch):
    """Agent b is killed (SIGKILL) while it times b's job; last in this file, it restarts b."""
    import threading

    monkeypatch.setenv("DK_TEST_AGENT_TOKEN", TOKEN)
    a, b = agents["a"], agents["b"]
    devices = {"a": a.address, "b": b.address}
    toml = _targets(tmp_path, devices, runs={"b": 20000})  # b's job takes seconds, even on a quiet machine
    killed = threading.Event()

    def kill_b_mid_job() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status, raw = _call("GET", b.address + "/v1/probe")
            if status == 200 and json.loads(raw)["jobs"] >= 1:  # b's job is in
                time.sleep(0.1)
                b.kill()
                killed.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_b_mid_job, daemon=True)
    watcher.start()
    try:
        router = DeviceRouter(LocalExecutor(ort_registry), backoff=0.05)
        got = _build(tmp_path, toml, ["local-ort", "a-ort", "b-ort"], ort_registry, executor=router)
        watcher.join(10)
        assert killed.is_set()
        assert got["local-ort"].status == "ok" and got["a-ort"].status == "ok"
        dead = got["b-ort"]
        assert dead.status == "error" and "unreachable" in dead.reason and b.address in dead.reason
        assert dead.latency == [] and dead.artifact is not None and dead.artifact.path.is_file()
    finally:
        b.kill()
        b.start().wait_ready()  # the device is back: the same command finishes the job
    toml = _targets(tmp_path, devices)  # the same targets, timed briefly this time
    again = _build(tmp_path, toml, ["local-ort", "a-ort", "b-ort"], ort_registry, out="out2")
    assert all(t.status == "ok" for t in again.values())
    assert _untimed(again["b-ort"]) == _untimed(got["local-ort"])


def test_tls_with_a_certificate_the_client_trusts(tmp_path, monkeypatch):
    """--cert/--key serve https; the client verifies the certificate (SSL_CERT_FILE names the
    authority it trusts) and refuses one it does not trust, as unreachable, naming the reason."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    with _in_process(tmp_path / "tls", 2**20, ssl_certfile=str(cert), ssl_keyfile=str(key)) as agent:
        address = f"https://127.0.0.1:{agent.port}"
        untrusted = AgentExecutor(address, TOKEN, name="tls", retries=0)
        with pytest.raises(DeviceError, match=r"device 'tls' \(https://127.0.0.1:\d+\) unreachable: .*CERTIFICATE_VERIFY_FAILED"):
            untrusted.probe()
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert AgentExecutor(address, TOKEN, name="tls").probe()["api"] == 1
        with pytest.raises(DeviceError, match="refused the token"):
            AgentExecutor(address, "wrong-token-0123456789", name="tls").probe()
    from deploykit.agent import serve

    with pytest.raises(ConfigError, match="TLS needs both --cert and --key"):
        serve("127.0.0.1", _free_port(), tmp_path / "f", TOKEN, 1.0, cert=cert)
