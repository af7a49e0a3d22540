"""The container registry: which Format a layout table's `container = "NAME"` names.

A container is a module (or a package, for a big one such as gguf/) of this folder that defines FORMAT (a
convert.containers.contract.Format). Nothing lists the containers: adding one is adding its module and a table
that names it. Tables are data and know no code; callers ask this registry for a table's container.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

from convert.common.errors import ConvertError

if TYPE_CHECKING:
    from convert.containers.contract import Format
    from convert.model.tables import LayoutTable


@cache
def container_names() -> tuple[str, ...]:
    """Every module or package of this folder that defines FORMAT, by name."""
    names = []
    for module in pkgutil.iter_modules(__path__):
        if hasattr(importlib.import_module(f"{__name__}.{module.name}"), "FORMAT"):
            names.append(module.name)
    return tuple(sorted(names))


def container(name: str) -> Format:
    if name not in container_names():
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}").FORMAT


def format_of(table: LayoutTable) -> Format:
    """The Format of the container table names; a table naming none is one line naming the table's file."""
    if table.container not in container_names():
        raise ConvertError(
            f"layout.container: {table.container!r} is not one of {', '.join(container_names())} "
            "(the containers of convert/containers/)",
            file=table.path or table.name,
        )
    return container(table.container)
