"""``deploykit matrix``, ``deploykit results`` and ``deploykit compare`` (registered on the main
command group by :mod:`deploykit.cli`)."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click

from deploykit.errors import CheckFailed, ConfigError

DB_HELP = "Results database [default: $DEPLOYKIT_DB, else the user's data folder]."


def _split(text: str | None, cast: Any = str, flag: str = "") -> list[Any] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(cast(part))
        except ValueError:
            raise ConfigError(f"{flag}: '{part}' is not a {cast.__name__}") from None
    return out


@click.command()
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder: matrix.md, .csv, .json, .html, manifest.json and the run's journal.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=DB_HELP)
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Artifact cache [default: $DEPLOYKIT_CACHE, else ~/.cache/deploykit].")
@click.option("--targets", help="Override the spec's targets (comma-separated).")
@click.option("--batch-sizes", help="Override the spec's batch sizes, e.g. 1,8.")
@click.option("--precisions", help="Override the spec's precisions: fp32,fp16,int8.")
@click.option("--rounds", type=int, help="Interleaved timing rounds per cell [default: the spec's, else 5].")
@click.option("--allow-code", is_flag=True, help="Let the spec name module:function data sources (runs that code).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where the cells' check jobs run: local (this machine, and each remote device's agent) or ray "
                   "(a Ray task per model x target on the node declaring resource device:NAME; docs/agent.md).")
@click.option("--address", "ray_address", metavar="ADDR",
              help="With --executor ray: the cluster to join (e.g. HEAD:6379) [default: start a local instance].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout instead of the table.")
def matrix(spec_path: Path, out_dir: Path, db: Path | None, cache_dir: Path | None, targets: str | None,
           batch_sizes: str | None, precisions: str | None, rounds: int | None, allow_code: bool,
           executor: str, ray_address: str | None, as_json: bool) -> None:
    """Benchmark every model of SPEC.toml on every target, batch size and precision.

    \b
    Each cell: the lowered artifact (content-addressed: unchanged cells are never rebuilt),
    INT8 and the same runtime's FP32 timed in interleaved rounds (p50 = median of round
    medians, with its spread; p90, p99, throughput, memory), accuracy against FP32 and the
    labels, and the environment it ran in. A failing cell is recorded with its error and the
    rest go on; an interrupted matrix resumes into the same --out under the same run id.
    Every run is stored in the results history: see 'deploykit results' and 'deploykit compare'.
    Exit 1 when a cell errored.

    \b
    Example:
      deploykit matrix deploykit/samples/matrix.toml --out sample-out
    """
    from deploykit.matrix import render
    from deploykit.matrix.run import MatrixOptions, run_matrix
    from deploykit.matrix.spec import load_spec

    spec = load_spec(spec_path, allow_code).with_overrides(
        _split(targets, str, "--targets"), _split(batch_sizes, int, "--batch-sizes"),
        _split(precisions, str, "--precisions"), rounds)
    if ray_address and executor != "ray":
        raise ConfigError("--address needs --executor ray")
    checks_on = None
    if executor == "ray":
        from deploykit.matrix.run import targets_file_of
        from deploykit.rayexec import RayExecutor
        from deploykit.targets import load_targets

        # a local instance stands for this machine's devices: those of the targets file without an address
        path = targets_file_of(spec)
        here = [d.name for d in load_targets(path).devices.values() if not d.address] if path else []
        checks_on = RayExecutor(ray_address, devices=here)
    show = not as_json
    progress = _Progress(show)
    opts = MatrixOptions(out_dir=out_dir, db=db, cache_dir=cache_dir, executor=checks_on,
                         on_event=progress.event, on_cell=progress.cell)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = run_matrix(spec, opts)
        finally:
            progress.stop()
    meta = result.meta
    if as_json:
        click.echo(json.dumps(render.json_doc(result.cells, meta), indent=2, allow_nan=False, default=str))
    else:
        click.echo(render.terminal(result.cells, meta, plain=not sys.stdout.isatty()))
        click.echo(f"\nrun {result.run_id}: {meta['summary']}")
        click.echo(f"wrote {', '.join(str(p) for p in result.files)}; history: {result.db}")
    if result.errors:
        raise CheckFailed(f"{len(result.errors)} cell(s) errored (see {out_dir / 'matrix.md'})")


class _Progress:
    """One progress step over the cells (the build's steps nest under it: one live display per
    process), with a kept line per cell; plain lines with the ETA when stderr is not a terminal."""

    def __init__(self, enabled: bool) -> None:
        from deploykit import progress

        self.enabled = enabled
        self.live = enabled and progress.enabled()
        self.step: Any = None
        self.start = time.monotonic()

    def event(self, msg: str) -> None:
        if self.enabled:
            from deploykit import progress

            progress.echo(msg)

    def cell(self, cell: Any, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.live:
            from deploykit import progress

            if self.step is None:
                self.step = progress.step("matrix", total=total, unit="cells").__enter__()
            progress.echo(f"  {cell.key}: {cell.status}")
            self.step.update(done - self.step.completed)
        else:  # not a terminal: one line per cell, with the ETA
            elapsed = time.monotonic() - self.start
            eta = elapsed / max(done, 1) * (total - done)
            click.echo(f"[{done}/{total}] {cell.key}: {cell.status} (eta {eta:.0f} s)", err=True)

    def stop(self) -> None:
        if self.step is not None:
            self.step.__exit__(None, None, None)
            self.step = None


@click.command()
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=DB_HELP)
@click.option("--run", "run_id", type=int, help="Show one run's cells.")
@click.option("--limit", type=int, default=20, show_default=True, help="How many recent runs to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def results(db: Path | None, run_id: int | None, limit: int, as_json: bool) -> None:
    """List the stored runs (builds and matrices), newest first; --run N shows one run's cells."""
    from deploykit.history import History
    from deploykit.matrix import render
    from deploykit.matrix.cell import Cell

    _existing(db)
    with History(db) as h:
        if run_id is not None:
            run = h.run(run_id)
            cells = [Cell.from_json(c) for c in h.cells(run_id)]
            if as_json:
                click.echo(json.dumps({"run": run.to_json(), "cells": [c.to_json() for c in cells]}, indent=2))
            else:
                click.echo(f"run {run.id} ({run.kind}, {run.status}) started {run.started}: {run.source}")
                click.echo(render.terminal(cells, {"run_id": run.id, "env": run.env,
                                                   "load_average": run.env.get("load_average")},
                                           plain=not sys.stdout.isatty()))
            return
        runs = h.runs(limit=limit)
        if as_json:
            click.echo(json.dumps({"db": str(h.path), "runs": [r.to_json() for r in runs]}, indent=2))
            return
        click.echo(f"{h.path}: {len(runs)} run(s) shown")
        for r in runs:
            click.echo(f"  {r.id:>4}  {r.kind:<6} {r.status:<9} {r.started}  {r.cells:>3} cells"
                       f"{f', {r.errors} errors' if r.errors else ''}  {r.source}")


@click.command()
@click.argument("run_a", type=int, required=False)
@click.argument("run_b", type=int, required=False)
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare(run_a: int | None, run_b: int | None, db: Path | None, as_json: bool) -> None:
    """Compare two stored runs [default: the last two matrix runs]; flag the regressions larger
    than the measured noise (latency, accuracy, errors) and exit 1 when any is flagged, so CI
    can gate on it.

    \b
    Each cell is a statistical test (its rounds' spread, the between-run spread across the
    cells and from the cell's earlier runs of the same matrix), corrected for the number of
    cells (Holm, family-wise 1%), and a change must exceed 10% (speed-up) or 25% (p50) to
    count. The 'noise:' line says what got worse inside the noise. docs/matrix.md explains it."""
    from deploykit.compare import HISTORY_RUNS, compare_cells, render
    from deploykit.history import History
    from deploykit.matrix.cell import Cell

    _existing(db)
    if (run_a is None) != (run_b is None):
        raise ConfigError("compare: give two run ids (RUN_A RUN_B) or none for the last two matrix runs")
    with History(db) as h:
        if run_a is None or run_b is None:
            runs = [r for r in h.runs(kind="matrix") if r.status == "complete"][:2]
            if len(runs) < 2:
                raise ConfigError(f"{h.path}: compare needs two finished matrix runs (found {len(runs)}); "
                                  f"see 'deploykit results'")
            run_a, run_b = runs[1].id, runs[0].id
        h.run(run_a)
        b = h.run(run_b)
        # earlier finished runs of the same matrix: each cell's own between-run spread
        earlier = [r.id for r in h.runs(kind=b.kind) if r.id < run_b and r.id != run_a and r.status == "complete"
                   and b.fingerprint and r.fingerprint == b.fingerprint][:HISTORY_RUNS]
        result = compare_cells([Cell.from_json(c) for c in h.cells(run_a)], [Cell.from_json(c) for c in h.cells(run_b)],
                               run_a, run_b, [[Cell.from_json(c) for c in h.cells(i)] for i in earlier])
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2, allow_nan=False, default=str))
    else:
        click.echo(render(result))
    if result.flagged:
        raise CheckFailed(f"{len(result.flagged)} regression(s) beyond the noise between run {run_a} and run {run_b}")


def _existing(db: Path | None) -> None:
    from deploykit.history import default_path

    path = db or default_path()
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no results database yet (run 'deploykit matrix' or 'deploykit build' first, "
                          f"or pass --db)")
