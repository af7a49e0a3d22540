"""The container registry: which Format a layout table's `container = "NAME"` names.

A container is a module (or a package, for a big one such as gguf/) of this folder that defines MARKERS, the file
names or globs of which a folder holds at least one when it is in this container's files, and FORMAT (a
convert.containers.contract.Format, whose markers are MARKERS). Nothing lists the containers: adding one is adding
its module and a table that names it. Tables are data and know no code; callers ask this registry for a table's
container.

Importing a container must stay light (no numpy, no gguf-py): a package defines FORMAT on first use (a module
__getattr__), so that detecting a folder's layout loads only the containers whose MARKERS it holds. verify of a
safetensors folder then hashes without a thread importing numpy beside it (convert/verify/folder.py).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

from convert.common.errors import ConvertError
from convert.containers.contract import marker_present

if TYPE_CHECKING:
    from pathlib import Path

    from convert.containers.contract import Format
    from convert.model.tables import LayoutTable


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


@cache
def container_names() -> tuple[str, ...]:
    """Every module or package of this folder that defines MARKERS, by name."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if hasattr(_module(m.name), "MARKERS")))


def container(name: str) -> Format:
    if name not in container_names():
        raise KeyError(name)
    return _module(name).FORMAT


def markers(name: str) -> tuple[str, ...]:
    """The files of which a folder in container name's files holds one, without loading its FORMAT."""
    if name not in container_names():
        raise KeyError(name)
    return _module(name).MARKERS


def may_hold(table: LayoutTable, folder: Path) -> bool:
    """Whether folder holds one of the markers of table's container: only then is its FORMAT asked to claim it."""
    _check_named(table)
    return any(marker_present(folder, marker) for marker in markers(table.container))


def format_of(table: LayoutTable) -> Format:
    """The Format of the container table names; a table naming none is one line naming the table's file."""
    _check_named(table)
    return container(table.container)


def _check_named(table: LayoutTable) -> None:
    if table.container not in container_names():
        raise ConvertError(
            f"layout.container: {table.container!r} is not one of {', '.join(container_names())} "
            "(the containers of convert/containers/)",
            file=table.path or table.name,
        )
