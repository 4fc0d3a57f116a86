"""Check jobs run locally vs on two device agents on this machine (two loopback ports standing
for two devices), optionally vs Ray: the same accuracy figures, latency within the noise, and
what the dispatch costs.

    python bench/agent_matrix.py [--models digits32,efficientnet] [--rounds 5] [--runs 50] [--ray]
    python bench/agent_matrix.py --matrix [--models digits32] [--repeats 3] [--ray]

``--matrix``: ``deploykit matrix`` itself (fp32 and int8 at batch 1 and 8, INT8 and FP32 timed in
interleaved rounds inside each job) run ``--repeats`` times in rotating order as: all cells on
this machine; the same cells on agent A and agent B; [the same on Ray]. Reported per cell: the
accuracy figures and whether they equal the local ones, p50 and INT8/FP32 speed-up per
configuration (medians over repeats), and each configuration's wall time.

For each model, one ``deploykit build`` (onnxruntime, batch sizes 1 and 8) gives the target's
check job; the same job then runs ``--rounds`` times on each executor, in rotating order within
every round (local, agent A, agent B[, Ray]) so the machine's load hits all alike. Reported:

- accuracy: the untimed checks (top-1 agreement, cosine, fidelity, accuracy, ...) of every run on
  every executor, and whether they are identical to the local ones;
- latency: per executor the median over rounds of the job's p50 at each batch size, the median
  ratio to the local p50 of the same round, and the spread of that ratio (min-max);
- wall time per job: local vs agent (first run: uploads; later runs: nothing sent) vs Ray, and
  the dispatch overhead (wall time minus the job's own load/accuracy/latency time).

Scratch goes to --dir (default /tmp/deploykit-agent-bench), never into the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "deploykit" / "samples"
TOKEN = "bench-agent-token-0123456789"
TIMED = {"latency_p50_ms", "latency_p99_ms", "throughput", "speedup", "memory_mb"}
PLUGINS_OFF = "openvino,tflite,coreml,tensorrt"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(folder: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "DEPLOYKIT_AGENT_TOKEN": TOKEN, "DEPLOYKIT_DISABLE_PLUGINS": PLUGINS_OFF}
    log = open(folder.with_suffix(".log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "deploykit.cli", "agent", "--port", str(port), "--folder",
                             str(folder)], env=env, stdout=log, stderr=log)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, address: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agent {address} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(address + "/v1/probe", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"agent {address} did not start in {timeout} s")


def model_files(name: str, work: Path) -> tuple[Path, Path, Path]:
    if name == "digits32":
        return SAMPLES / "digits32_cnn.onnx", SAMPLES / "digits32_calib.npz", SAMPLES / "digits32_eval.npz"
    if name == "efficientnet":
        from deploykit.testing import realnets

        calib, evaluation = realnets.write_cnn_data(work / "effnet-data", calib=128, eval=128)
        return realnets.efficientnet_lite0(), calib, evaluation
    raise SystemExit(f"unknown model {name!r}: digits32 or efficientnet")


def job_of(name: str, work: Path, runs: int, eval_samples: int):
    """Build ``name`` for onnxruntime here; the check job the build ran, pointing at the published files."""
    from deploykit.jobs import LocalExecutor
    from deploykit.pipeline import BuildOptions, build
    from deploykit.plugins import load_registry

    model, calib, evaluation = model_files(name, work)
    toml = work / f"{name}.toml"
    toml.write_text(f'[targets.ort]\nbackend = "onnxruntime"\nbatch_sizes = [1, 8]\nwarmup = 5\nruns = {runs}\n'
                    '[targets.ort.options]\nthreads = 1\n')
    jobs = []

    class Recording(LocalExecutor):
        def run(self, job):
            jobs.append(job)
            return super().run(job)

    registry = load_registry()
    opts = BuildOptions(targets=["ort"], out_dir=work / f"{name}-out", targets_file=toml, method="minmax",
                        calib=str(calib), eval=str(evaluation), eval_samples=eval_samples, baseline=False,
                        samples=128, compare_profiles=False)
    result = build(str(model), opts, registry, Recording(registry))
    (target,) = result.targets
    if target.artifact is None or not jobs:
        raise SystemExit(f"{name}: the build did not check its target: {target.status} {target.reason}")
    return dataclasses.replace(jobs[0], artifact=target.artifact, canonical_path=result.canonical.path,
                               fp32_path=result.canonical.fp32_path)


def untimed(result) -> dict[str, float | None]:
    return {c.name: c.value for c in result.checks if c.name not in TIMED}


def in_job_seconds(result) -> float:
    return sum(v for k, v in result.seconds.items() if k in ("load", "accuracy", "layers", "latency"))


def bench_matrix(args: argparse.Namespace, work: Path, agents: list[tuple[subprocess.Popen, str]]) -> dict:
    """The matrix on this machine, on two agents, [on Ray]: same cells, rotating order."""
    from deploykit.jobs import LocalExecutor
    from deploykit.matrix import MatrixOptions, load_spec, run_matrix
    from deploykit.remote import DeviceRouter

    os.environ["DEPLOYKIT_CACHE"] = str(work / "cache")  # artifacts lowered once, reused by every run
    os.environ["DK_BENCH_TOKEN"] = TOKEN
    toml = work / "matrix-targets.toml"
    text = "".join(f'[devices.{n}]\naddress = "{a}"\ntoken_env = "DK_BENCH_TOKEN"\n'
                   for n, (_, a) in zip(("a", "b"), agents))
    text += '[devices.edge]\nkind = "cpu"\n'
    for name, device in (("here", None), ("a", "a"), ("b", "b"), ("edge", "edge")):
        text += f'[targets.{name}]\nbackend = "onnxruntime"\n' + (f'device = "{device}"\n' if device else "")
        text += '[targets.' + name + '.options]\nthreads = 1\n'
    toml.write_text(text)
    models = ""
    for m in [m.strip() for m in args.models.split(",") if m.strip()]:
        model, calib, evaluation = model_files(m, work)
        models += f'[[models]]\nname = "{m}"\npath = "{model}"\ncalib = "{calib}"\neval = "{evaluation}"\n'
    configs = {"local": ["here"], "agents": ["a", "b"]}
    if args.ray:
        configs["ray"] = ["here", "edge"]
    specs = {}
    for config, targets in configs.items():
        path = work / f"matrix-{config}.toml"
        path.write_text(models + f'[matrix]\ntargets = {json.dumps(targets)}\nbatch_sizes = [1, 8]\n'
                        f'precisions = ["fp32", "int8"]\nrounds = {args.rounds}\neval_samples = {args.eval_samples}\n'
                        f'targets_file = "{toml}"\n')
        specs[config] = load_spec(path)
    executors: dict = {"local": None, "agents": DeviceRouter(LocalExecutor())}
    if args.ray:
        from deploykit.rayexec import RayExecutor

        executors["ray"] = RayExecutor(devices=["edge"], num_cpus=1)
    runs: dict[str, list] = {c: [] for c in configs}
    names = list(configs)
    for r in range(args.repeats):
        for config in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.monotonic()
            result = run_matrix(specs[config], MatrixOptions(work / f"mx-{config}-{r}-{os.getpid()}",
                                                            db=work / "history.sqlite", executor=executors[config]))
            runs[config].append(({c.key: c for c in result.cells}, time.monotonic() - t0))
            print(f"repeat {r + 1}: {config}: {len(result.cells)} cells in {runs[config][-1][1]:.1f} s, "
                  f"{len(result.errors)} errors")
    out: dict = {"configs": {}}
    print(f"\n{'cell':34} {'config':7} {'top-1 agr':>9} {'cosine':>9} {'same':>5} {'p50 ms':>9} {'vs local':>9} "
          f"{'speed-up':>9}")
    for key in sorted(runs["local"][0][0]):
        model, _, b, p = key.split("/")
        here = [cells[key] for cells, _ in runs["local"]]
        for config, targets in configs.items():
            for target in targets:
                k = f"{model}/{target}/{b}/{p}"
                cells = [c[k] for c, _ in runs[config]]
                same = all((c.top1_agreement, c.cosine, c.accuracy) == (here[0].top1_agreement, here[0].cosine,
                                                                        here[0].accuracy) for c in cells)
                p50 = statistics.median(c.p50_ms for c in cells if c.p50_ms)
                ratio = statistics.median(c.p50_ms / h.p50_ms for c, h in zip(cells, here) if c.p50_ms and h.p50_ms)
                speedups = [c.speedup for c in cells if c.speedup]
                out["configs"].setdefault(config, {})[k] = {"same_accuracy": same, "p50_ms": p50, "ratio": ratio,
                                                            "speedup": statistics.median(speedups) if speedups else None}
                print(f"{k:34} {config:7} {cells[0].top1_agreement or 0:9.4f} {cells[0].cosine or 0:9.6f} "
                      f"{'yes' if same else 'NO':>5} {p50:9.3f} {ratio:8.2f}x "
                      + (f"{statistics.median(speedups):8.2f}x" if speedups else "       -"))
    for config in configs:
        walls = [w for _, w in runs[config]]
        out["configs"].setdefault(config, {})["wall_s"] = walls
        print(f"{config}: wall per matrix run {statistics.median(walls):.1f} s (median of {len(walls)}: "
              f"{', '.join(f'{w:.1f}' for w in walls)}) for {len(runs[config][0][0])} cells")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits32,efficientnet")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per batch size in each job")
    ap.add_argument("--eval-samples", type=int, default=128)
    ap.add_argument("--ray", action="store_true", help="also run each job as a task on a local Ray instance")
    ap.add_argument("--matrix", action="store_true", help="run deploykit matrix itself (see above)")
    ap.add_argument("--repeats", type=int, default=3, help="with --matrix: runs of each configuration")
    ap.add_argument("--dir", default="/tmp/deploykit-agent-bench")
    ap.add_argument("--json", dest="json_out", help="write every figure to this file")
    args = ap.parse_args()
    os.environ["DEPLOYKIT_DISABLE_PLUGINS"] = PLUGINS_OFF  # this process, its agents and Ray's workers alike
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)

    from deploykit import progress
    from deploykit.jobs import LocalExecutor
    from deploykit.plugins import load_registry
    from deploykit.remote import AgentExecutor

    progress.set_enabled(False)
    agents = [start_agent(work / f"agent-{n}-{os.getpid()}") for n in ("a", "b")]
    try:
        for proc, address in agents:
            wait_ready(proc, address)
        if args.matrix:
            figures = {"load_average_start": os.getloadavg(), **bench_matrix(args, work, agents)}
            figures["load_average_end"] = os.getloadavg()
            print(f"\nload average: start {figures['load_average_start']}, end {figures['load_average_end']} "
                  f"({os.cpu_count()} cores)")
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(figures, indent=2, default=str))
            return
        executors: dict[str, object] = {"local": LocalExecutor(load_registry())}
        for (_, address), n in zip(agents, ("agent-a", "agent-b")):
            executors[n] = AgentExecutor(address, TOKEN, name=n)
        if args.ray:
            from deploykit.rayexec import RayExecutor

            t0 = time.monotonic()
            executors["ray"] = RayExecutor(num_cpus=1)
            print(f"ray: local instance started in {time.monotonic() - t0:.1f} s")
        figures = {"load_average_start": os.getloadavg(), "rounds": args.rounds, "runs": args.runs, "models": {}}
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            figures["models"][model] = bench_model(model, work, args, executors)
        figures["load_average_end"] = os.getloadavg()
        print(f"\nload average: start {figures['load_average_start']}, end {figures['load_average_end']} "
              f"({os.cpu_count()} cores)")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(figures, indent=2, default=str))
            print(f"wrote {args.json_out}")
    finally:
        for proc, _ in agents:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.ray:
            import ray

            ray.shutdown()


def bench_model(model: str, work: Path, args: argparse.Namespace, executors: dict) -> dict:
    t0 = time.monotonic()
    job = job_of(model, work, args.runs, args.eval_samples)
    print(f"\n== {model}: built in {time.monotonic() - t0:.1f} s; artifact {job.artifact.path.name} "
          f"({sum(f.stat().st_size for f in job.artifact.files) / 2**20:.2f} MB), {len(job.inputs)} eval batches")
    names = list(executors)
    runs: dict[str, list] = {n: [] for n in names}  # (result, wall seconds)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: nobody always goes first
        for n in order:
            t = time.monotonic()
            result = executors[n].run(job)
            runs[n].append((result, time.monotonic() - t))
    reference = untimed(runs["local"][0][0])
    out: dict = {"accuracy": reference, "executors": {}}
    batch_sizes = [e.stats.batch_size for e in runs["local"][0][0].latency]
    header = f"{'executor':10} {'accuracy':>9} " + " ".join(f"{'p50 b' + str(b) + ' ms':>12} {'ratio':>16}"
                                                           for b in batch_sizes) + \
             f" {'wall s (1st/rest)':>18} {'dispatch ms':>12}"
    print("accuracy (local, first run): " + ", ".join(f"{k} {v:.6g}" for k, v in reference.items()
                                                      if v is not None and k in ("top1_agreement", "cosine",
                                                                                 "fidelity_rel_l2", "accuracy")))
    print(header)
    for n in names:
        same = all(untimed(res) == reference for res, _ in runs[n])
        row = {"identical_accuracy": same, "p50_ms": {}, "ratio_to_local": {}, "ratio_spread": {}}
        cells = []
        for i, b in enumerate(batch_sizes):
            p50 = [res.latency[i].stats.p50_ms for res, _ in runs[n]]
            ratios = [res.latency[i].stats.p50_ms / loc.latency[i].stats.p50_ms
                      for (res, _), (loc, _) in zip(runs[n], runs["local"])]
            row["p50_ms"][b], row["ratio_to_local"][b] = statistics.median(p50), statistics.median(ratios)
            row["ratio_spread"][b] = (min(ratios), max(ratios))
            cells.append(f"{statistics.median(p50):12.3f} {statistics.median(ratios):6.2f}x "
                         f"[{min(ratios):.2f}-{max(ratios):.2f}]")
        walls = [w for _, w in runs[n]]
        dispatch = [w - in_job_seconds(res) for res, w in runs[n][1:]] or [walls[0] - in_job_seconds(runs[n][0][0])]
        row["wall_s"] = walls
        row["dispatch_ms_median"] = statistics.median(dispatch) * 1e3
        if hasattr(executors[n], "uploaded"):
            row["files_uploaded"] = len(executors[n].uploaded)
        out["executors"][n] = row
        print(f"{n:10} {'same' if same else 'DIFFERS':>9} " + " ".join(cells)
              + f" {walls[0]:8.2f}/{statistics.median(walls[1:] or walls):<8.2f} {row['dispatch_ms_median']:12.1f}")
    return out


if __name__ == "__main__":
    main()
