"""Named registries (perturbation types, loss terms and presets, evaluations) and the plugin hook.

A `Registry` is a read-only mapping name -> entry whose built-in entries are fixed when the
package is imported; `register` adds entries (a plugin's), `unregister` removes them again (never
a built-in one), `scoped()` restores the registry on exit (tests). Iteration order is built-ins
in their table order, then registrations in the order they were made.

Plugins: `load_plugins("mod.name:func,path/to/file.py")` imports each module (a dotted name, or a
.py file by path) and calls `func()` when given. `pertvl` loads the modules named by `--plugin`
and by the environment variable PERTVL_PLUGINS before it builds its parser, and exports the
combined list in PERTVL_PLUGINS, so processes it starts (torchrun ranks, `pertvl ablate`'s
trainings) load the same plugins. See docs/ARCHITECTURE.md, "Registries".
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["PLUGINS_ENV", "Registry", "export_plugins", "load_plugins", "normalize_spec", "plugin_specs"]

PLUGINS_ENV = "PERTVL_PLUGINS"

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """name -> entry; the built-in entries cannot be replaced or removed.

    Args:
        what: what an entry is, for error messages ("loss term").
        builtin: the built-in (name, entry) pairs, in table order.
    """

    def __init__(self, what: str, builtin: Iterable[tuple[str, T]] = ()) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        for name, entry in builtin:
            self.register(name, entry)
        self._builtin = tuple(self._items)

    # Mapping
    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; registered: {', '.join(self._items)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._items)})"

    @property
    def builtin(self) -> tuple[str, ...]:
        """The names the package defines itself, in table order."""
        return self._builtin

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add `entry` under `name`; returns it (usable as a decorator's tail).

        Raises:
            ValueError: an empty name, a built-in name, or a name taken (unless `replace`).
        """
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"{self.what} name must be a non-empty string without surrounding spaces, got {name!r}")
        if name in getattr(self, "_builtin", ()):
            raise ValueError(f"{self.what} {name!r} is built in and cannot be replaced")
        if name in self._items and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to replace it)")
        self._items[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove a registered (not built-in) entry; a name not registered is an error."""
        if name in self._builtin:
            raise ValueError(f"{self.what} {name!r} is built in and cannot be removed")
        if name not in self._items:
            raise KeyError(f"unknown {self.what} {name!r}")
        del self._items[name]

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Registrations made inside the block are undone on exit (tests)."""
        saved = dict(self._items)
        try:
            yield self
        finally:
            self._items = saved


def plugin_specs(*sources: str | Iterable[str] | None) -> list[str]:
    """Comma-separated or listed plugin specs, de-duplicated in first-seen order."""
    out: list[str] = []
    for source in sources:
        if not source:
            continue
        items = source.split(",") if isinstance(source, str) else [x for s in source for x in s.split(",")]
        for spec in (x.strip() for x in items):
            if spec and spec not in out:
                out.append(spec)
    return out


_LOADED: set[str] = set()


def normalize_spec(spec: str) -> str:
    """A .py path made absolute (the same file loads once, and child processes find it anywhere)."""
    module_ref, sep, func = spec.partition(":")
    if module_ref.endswith(".py"):
        module_ref = str(Path(module_ref).resolve())
    return module_ref + sep + func


def load_plugins(specs: str | Iterable[str] | None) -> list[str]:
    """Import each plugin `MODULE[:FUNCTION]` once per process; call FUNCTION() when given.

    MODULE is a dotted module name or a path to a .py file (imported under a name derived from
    the path). Returns the specs loaded by this call.

    Raises:
        ValueError: a module that cannot be imported or a function it lacks (naming the spec).
    """
    loaded = []
    for spec in map(normalize_spec, plugin_specs(specs)):
        if spec in _LOADED:
            continue
        module_ref, _, func = spec.partition(":")
        try:
            if module_ref.endswith(".py"):
                path = Path(module_ref).resolve()
                name = "pertvl_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path.with_suffix("")))
                module = sys.modules.get(name)
                if module is None:
                    loader_spec = importlib.util.spec_from_file_location(name, path)
                    if loader_spec is None or loader_spec.loader is None or not path.is_file():
                        raise ImportError(f"no Python file at {path}")
                    module = importlib.util.module_from_spec(loader_spec)
                    sys.modules[name] = module
                    try:
                        loader_spec.loader.exec_module(module)
                    except BaseException:
                        del sys.modules[name]
                        raise
            else:
                module = importlib.import_module(module_ref)
        except ImportError as e:
            raise ValueError(f"plugin {spec!r}: cannot import {module_ref!r}: {e}") from e
        if func:
            fn = getattr(module, func, None)
            if not callable(fn):
                raise ValueError(f"plugin {spec!r}: {module_ref!r} has no function {func!r}")
            fn()
        _LOADED.add(spec)
        loaded.append(spec)
    return loaded


def export_plugins(specs: Iterable[str]) -> None:
    """Put `specs` (with what is already there) in PERTVL_PLUGINS for child processes."""
    combined = [normalize_spec(s) for s in plugin_specs(os.environ.get(PLUGINS_ENV), list(specs))]
    if combined:
        os.environ[PLUGINS_ENV] = ",".join(combined)
