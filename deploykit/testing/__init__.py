"""Helpers for plugin authors and deploykit's own tests: targets with defaults, small canonical
models (:mod:`deploykit.testing.fixtures`), and the backend conformance suite
(``deploykit.testing.conformance``)."""

from deploykit.testing.fixtures import (
    KINDS,
    canonical_from_onnx,
    eval_feeds,
    export_kind,
    exported_onnx,
    imported_by_plugins,
    make_canonical,
    make_target,
    skip_unless_installed,
)

__all__ = ["KINDS", "canonical_from_onnx", "eval_feeds", "export_kind", "exported_onnx", "imported_by_plugins", "make_canonical", "make_target",
           "skip_unless_installed"]
