"""`vismem`: the command-line surface. Thin: every command calls `visual_memory`.

Commands live in one module per concern (core, ...); each registers on `app`.
"""

from .app import app
from . import core  # noqa: F401  (registers commands)

for _optional in ("edit", "evaluate", "encoders", "index", "serve", "demo"):
    try:
        __import__(f"{__name__}.{_optional}")
    except ModuleNotFoundError as _exc:  # a concern not installed or not written yet
        if _exc.name != f"{__name__}.{_optional}":
            raise

__all__ = ["app"]
