"""Command lines of recipes (examples, container files, the README), parsed by the real commands.

``parse`` hands a command line to the click command that would run it (``dask scheduler``,
``dask worker`` and its ``--preload tdask.worker`` options, ``dask cuda worker`` where dask-cuda
is installed, the hello world's client), so a recipe with a flag that does not exist, or an
operator that ``--tdask-operator`` would refuse, fails here instead of on a cluster.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import click

from tdask.host.preload import parse_operator_option
from tdask.operator import OperatorConfig

# (leading words of a command line, module, attribute): the click command that runs it
COMMANDS = [
    (("dask", "scheduler"), "distributed.cli.dask_scheduler", "main"),
    (("dask", "worker"), "distributed.cli.dask_worker", "main"),
    (("dask", "cuda", "worker"), "dask_cuda.cli", "worker"),
    (("python", "-m", "tdask.hello_world.client"), "tdask.hello_world.client", "main"),
    (("python", "-m", "distributed.cli.dask_worker"), "distributed.cli.dask_worker", "main"),
]


def program(argv: Sequence[str]) -> tuple[str, ...]:
    """The leading words naming the command (``("dask", "worker")``), with any ``.../python`` as ``python``."""
    words = tuple("python" if w.rsplit("/", 1)[-1].startswith("python") else w for w in argv)
    for lead, _, _ in COMMANDS:
        if words[: len(lead)] == lead:
            return lead
    raise ValueError(f"not a command these recipes use: {list(argv)[:4]}")


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """The command's parameters as its click command reads them; ``operators`` for a tdask preload.

    Raises ``click.ClickException`` (a flag that does not exist, a bad operator) or, for
    ``dask cuda worker`` without dask-cuda installed, ``ModuleNotFoundError``.
    """
    lead = program(argv)
    module, attribute = next((m, a) for lead_, m, a in COMMANDS if lead_ == lead)
    command: click.Command = getattr(importlib.import_module(module), attribute)
    ctx = command.make_context(" ".join(lead), list(argv[len(lead) :]))
    params = dict(ctx.params)
    params["program"] = lead
    if "tdask.worker" in (params.get("preload") or ()):
        # dask worker already checked these with the preload's own click command; read them too.
        args = list(params.get("preload_argv") or ())
        texts = [args[i + 1] for i, a in enumerate(args) if a == "--tdask-operator"]
        params["operators"] = [c for text in texts for c in parse_operator_option(text)]
    return params


def operator_names(params: dict[str, Any]) -> list[str]:
    operators: list[OperatorConfig] = params.get("operators", [])
    return [c.name for c in operators]
