"""Plugin manager and backend registry.

Built-in backends and third-party ones load the same way: an entry point in the ``deploykit``
group naming a module with ``deploykit_register_backends``. No global manager: each
:class:`Registry` owns its own ``pluggy.PluginManager`` (tests build their own).
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from deploykit import hookspecs
from deploykit.backend import Backend
from deploykit.errors import ConfigError, PluginError

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
        hook = getattr(plugin, "deploykit_register_backends", None)
        if hook is not None:
            hook(register=lambda cls: self._register_backend(cls, info))

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


def load_registry() -> Registry:
    """A registry with every installed plugin loaded through its entry point."""
    registry = Registry()
    registry.load_entry_points()
    return registry
