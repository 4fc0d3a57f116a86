"""Per-device benchmark matrices: models x targets x batch sizes x precisions.

``deploykit matrix SPEC.toml --out DIR`` (see docs/matrix.md): :mod:`.spec` reads the spec,
:mod:`.run` measures the cells (each model x target is one :class:`deploykit.jobs.CheckJob` on an
executor, timed in interleaved rounds by :mod:`deploykit.timing`; :mod:`.cache` keeps artifacts
by content, :class:`deploykit.outdir.OutDir` locks the folder and journals every finished cell
so a run resumes), :mod:`.render` writes the outputs; every run goes to the results history (:mod:`deploykit.history`).
"""

from deploykit.matrix.cell import Cell
from deploykit.matrix.run import MatrixOptions, MatrixResult, run_matrix
from deploykit.matrix.spec import MatrixSpec, load_spec

__all__ = ["Cell", "MatrixOptions", "MatrixResult", "MatrixSpec", "load_spec", "run_matrix"]
