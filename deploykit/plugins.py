"""Plugin manager and backend registry.

Built-in backends and third-party ones load the same way: an entry point in the ``deploykit``
group naming a module with ``deploykit_register_backends``. No global manager: each
:class:`Registry` owns its own ``pluggy.PluginManager`` (tests build their own).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import pluggy

from deploykit import hookspecs
from deploykit.backend import Backend, Capability, Option
from deploykit.errors import ConfigError, PluginError
from deploykit.results import METRICS
from deploykit.targets import Target, TargetsFile

ENTRY_POINT_GROUP = "deploykit"
#: Comma-separated entry-point names to skip, like pytest's ``-p no:name``.
DISABLE_ENV = "DEPLOYKIT_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str = ""
    version: str = ""
    backends: list[str] = field(default_factory=list)


class Registry:
    """Backends by name, filled by the plugins' ``deploykit_register_backends`` hooks."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("deploykit")
        self.pm.add_hookspecs(hookspecs)
        self.backends: dict[str, type[Backend]] = {}
        self.plugins: dict[str, PluginInfo] = {}
        self._owner: dict[str, str] = {}

    # -- loading -------------------------------------------------------------------------
    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            if ep.name in disabled or ep.name in self.plugins:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # any import failure must name the plugin
                dist = ep.dist.name if ep.dist else "?"
                raise PluginError(
                    f"plugin '{ep.name}' (distribution {dist}, {ep.value}) failed to import: "
                    f"{type(exc).__name__}: {exc}; fix or uninstall it, or set {DISABLE_ENV}={ep.name}"
                ) from exc
            info = PluginInfo(ep.name, ep.value, ep.dist.name if ep.dist else "",
                              ep.dist.version if ep.dist else "")
            self.add_plugin(module, info)

    def add_plugin(self, plugin: Any, info: PluginInfo | None = None) -> None:
        """Register one plugin object (module or instance) and collect its backends."""
        info = info or PluginInfo(getattr(plugin, "__name__", repr(plugin)), getattr(plugin, "__name__", ""))
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()  # a misspelt hook name fails here, not silently
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(f"plugin '{info.name}' is invalid: {exc}") from None
        self.plugins[info.name] = info
        # call this plugin's hook alone, through pluggy (the others registered theirs already)
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        self.pm.subset_hook_caller("deploykit_register_backends", others)(
            register=lambda cls: self._register_backend(cls, info))

    def remove_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        info = self.plugins.pop(name)
        for backend in info.backends:
            self.backends.pop(backend, None)
            self._owner.pop(backend, None)

    def _register_backend(self, cls: type, info: PluginInfo) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise PluginError(f"plugin '{info.name}' registered {cls!r}, which is not a deploykit.backend.Backend subclass")
        if not cls.name:
            raise PluginError(f"plugin '{info.name}' registered {cls.__name__} with an empty name")
        if cls.name in self.backends:
            raise PluginError(
                f"backend name '{cls.name}' registered twice: by plugin '{self._owner[cls.name]}' "
                f"and by plugin '{info.name}'; uninstall one or set {DISABLE_ENV}"
            )
        if cls.fp32_runner is not Backend.fp32_runner and Capability.FP32_RUNNER not in cls.capabilities:
            raise PluginError(f"plugin '{info.name}': {cls.__name__} defines fp32_runner but does not declare it: "
                              f"add Capability.FP32_RUNNER to its capabilities")
        if cls.layer_runner is not Backend.layer_runner and Capability.LAYER_RUNNER not in cls.capabilities:
            raise PluginError(f"plugin '{info.name}': {cls.__name__} defines layer_runner but does not declare it: "
                              f"add Capability.LAYER_RUNNER to its capabilities")
        self.backends[cls.name] = cls
        self._owner[cls.name] = info.name
        info.backends.append(cls.name)

    # -- lookup --------------------------------------------------------------------------
    def get(self, name: str) -> Backend:
        try:
            return self.backends[name]()
        except KeyError:
            known = ", ".join(sorted(self.backends)) or "none"
            raise ConfigError(f"unknown backend '{name}' (registered: {known}); see 'deploykit backends'") from None

    def owner(self, backend: str) -> str:
        return self._owner.get(backend, "")

    def names(self) -> Iterable[str]:
        return sorted(self.backends)

    # -- targets -------------------------------------------------------------------------
    def resolve(self, targets: TargetsFile, names: Sequence[str]) -> list[Target]:
        """Command-line target names -> targets whose backend, options and thresholds are checked.

        A name is an entry of ``[targets]``; a bare backend name works when no entry has it.
        """
        out = []
        for name in dict.fromkeys(names):  # a target given twice is built once
            if name in targets.raw_targets:
                out.append(self.check_target(targets, targets.target(name)))
            elif name in self.backends:
                out.append(self.check_target(targets, targets.target(name, {"backend": name})))
            else:
                entries = ", ".join(sorted(targets.raw_targets)) or "none"
                backends = ", ".join(self.names()) or "none"
                raise ConfigError(
                    f"unknown target '{name}': not an entry of {targets.path or 'targets.toml'} "
                    f"(entries: {entries}) nor a backend (backends: {backends})"
                )
        return out

    def all_targets(self, targets: TargetsFile) -> list[Target]:
        """Every ``[targets]`` entry, checked."""
        return [self.check_target(targets, targets.target(name)) for name in targets.raw_targets]

    def check_target(self, targets: TargetsFile, target: Target) -> Target:
        """``target`` with its backend known, its options validated (defaults filled in, then the
        backend's own ``validate_options``) and its threshold names known to it."""
        table = f"targets.{target.name}"
        if not target.backend:
            raise ConfigError(f"{targets.where(table, 'backend')} is missing: name one of {', '.join(self.names())}")
        if target.backend not in self.backends:
            raise ConfigError(
                f"{targets.where(table, 'backend')}: unknown backend '{target.backend}' "
                f"(registered: {', '.join(self.names()) or 'none'}); see 'deploykit backends'"
            )
        backend = self.backends[target.backend]
        where = targets.where(f"{table}.options")
        options = validate_options(target.options, backend.options, where)
        try:
            backend.validate_options(options)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        thresholds = validate_thresholds(target.thresholds, tuple(METRICS) + tuple(backend.metrics),
                                         targets.where(f"{table}.thresholds"))
        return dataclasses.replace(target, options=options, thresholds=thresholds)


def load_registry() -> Registry:
    """A registry with every installed plugin loaded through its entry point."""
    registry = Registry()
    registry.load_entry_points()
    return registry


def validate_options(raw: Mapping[str, Any], schema: Mapping[str, Option], where: str) -> dict[str, Any]:
    """``raw`` checked against a backend's option schema, with its defaults filled in."""
    out = {name: opt.default for name, opt in schema.items()}
    for key, value in raw.items():
        if key not in schema:
            allowed = ", ".join(sorted(schema)) or "none"
            raise ConfigError(f"{where}: unknown key '{key}' (this backend accepts: {allowed})")
        opt = schema[key]
        types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{where} key '{key}': expected {names}, got {value!r}")
        if opt.choices is not None and value not in opt.choices:
            raise ConfigError(f"{where} key '{key}': {value!r} is not one of {', '.join(map(str, opt.choices))}")
        out[key] = value
    return out


def validate_thresholds(raw: Mapping[str, Any], metrics: tuple[str, ...], where: str) -> dict[str, float]:
    """``min_<metric>`` / ``max_<metric>`` keys of known metrics, with numbers."""
    out = {}
    for key, value in raw.items():
        bound, _, metric = key.partition("_")
        if bound not in ("min", "max") or metric not in metrics:
            known = ", ".join(f"min_/max_{m}" for m in metrics)
            raise ConfigError(f"{where}: unknown key '{key}' (thresholds are {known})")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{where} key '{key}': expected a finite number, got {value!r}")
        out[key] = float(value)
    for key, lo in out.items():
        hi = out.get("max_" + key[4:]) if key.startswith("min_") else None
        if hi is not None and lo > hi:
            raise ConfigError(f"{where}: {key} = {lo:g} is above max_{key[4:]} = {hi:g}; no value can pass both")
    return out
