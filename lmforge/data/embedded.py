"""The embedded default corpus: the Python standard library source of the running interpreter.

Real text and code on every machine, with no download.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Third-party code and byte-compiled caches are not the standard library.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = True) -> list[Path]:
    """Every `.py` file of the standard library, sorted (the order is the corpus order)."""
    root = stdlib_dir()
    excluded = set(_EXCLUDED_DIRS)
    if not include_tests:
        excluded |= {"test", "tests", "idle_test"}
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if not excluded.intersection(rel[:-1]) and path.is_file():
            files.append(path)
    return sorted(files)
