"""Hook specifications. Hooks register things; behaviour lives on Backend classes."""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("deploykit")
hookimpl = pluggy.HookimplMarker("deploykit")


@hookspec
def deploykit_register_backends(register: Callable[[type], None]) -> None:
    """Register backend classes.

    :param register: call ``register(BackendClass)`` once per backend. The class must subclass
        :class:`deploykit.backend.Backend` and set a unique ``name``.
    """
