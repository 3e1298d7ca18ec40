"""Reading the YAML files users write (run configs, model settings) with one-line errors: PyYAML's
messages span several lines, and bad UTF-8 or deep nesting escape it as other exceptions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.jsonio import strict_decode


def read_yaml(path: str | os.PathLike, where: str | None = None) -> Any:
    """The parsed file (None when empty); `where` names it in errors (default: the path)."""
    import yaml

    path = Path(path)
    where = where or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LmforgeError(f"{where}: cannot read ({e.strerror or e})") from None
    text = strict_decode(data, where)
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = f" at line {e.problem_mark.line + 1} column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise LmforgeError(f"{where}: invalid YAML ({e.problem or e.context}{mark})") from None
    except yaml.YAMLError as e:
        raise LmforgeError(f"{where}: invalid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:
        raise LmforgeError(f"{where}: invalid YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as e:  # a value its constructor cannot make, e.g. an integer of 5000 digits
        raise LmforgeError(f"{where}: invalid YAML ({str(e).split(';')[0]})") from None
