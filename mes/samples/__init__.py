"""Sample data shipped inside the ``mes`` package, read through :mod:`importlib.resources`.

``plant.yaml`` is the sample plant (a bakery) that ``mes demo`` and ``mes dev`` load; it is
package data, so an installed wheel has it wherever it runs from. Copy it as a start for
your own plant file.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

PLANT_FILE_NAME = "plant.yaml"


def plant_resource() -> Traversable:
    """The sample plant as a package resource."""
    return resources.files(__name__).joinpath(PLANT_FILE_NAME)


def plant_text() -> str:
    """The sample plant's YAML text."""
    return plant_resource().read_text(encoding="utf-8")


def plant_file() -> contextlib.AbstractContextManager[Path]:
    """A file-system path to the sample plant while the context lasts.

    The path is the installed file itself, or a temporary copy when the package is not on
    the file system (a zip import).
    """
    return resources.as_file(plant_resource())
