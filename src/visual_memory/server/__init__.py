"""HTTP API and web UI over one memory: ``create_app(memory_path, token=...)``.

Run it with ``vismem serve MEMORY`` (uvicorn), or mount the app yourself.
Needs the ``server`` extra (fastapi, uvicorn, python-multipart).
"""

from .app import create_app

__all__ = ["create_app"]
