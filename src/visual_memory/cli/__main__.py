"""`python -m visual_memory.cli` is `vismem`."""

from . import app

app(prog_name="vismem")
