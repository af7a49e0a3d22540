"""Containers and the byte-level codecs they share.

A container is a module here that defines FORMAT (a convert.formats.base.Format): a mapping table's
`container = "NAME"` names the module convert/formats/NAME.py. Nothing lists the containers: adding one is adding
its module (and a table that names it).
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from convert.formats.base import Format


@cache
def container_names() -> tuple[str, ...]:
    """Every module of this package that defines FORMAT, by name."""
    names = []
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg and hasattr(importlib.import_module(f"{__name__}.{module.name}"), "FORMAT"):
            names.append(module.name)
    return tuple(sorted(names))


def container(name: str) -> Format:
    if name not in container_names():
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}").FORMAT
