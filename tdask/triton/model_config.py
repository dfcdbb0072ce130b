"""A model's Triton config: read from its repository, with a load-time override merged in.

Triton *replaces* a model's config with the one sent at load time, so "override only
``instance_group`` and ``parameters``" means sending the repository's whole ``config.pbtxt``
with those keys changed. Configs are handled in Triton's JSON form (what ``load_model`` takes),
checked against Triton's ``ModelConfig`` protobuf schema before the server sees them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ModelConfigError",
    "build_model_config",
    "check_model_directory",
    "explain_load_failure",
    "merge_model_config",
    "read_model_config",
]


class ModelConfigError(ValueError):
    """A repository's ``config.pbtxt`` does not parse as a Triton ``ModelConfig``."""


def _parameters_override(value: Any) -> dict[str, Any]:
    """Accept ``{"key": "v"}`` shorthand for Triton's ``{"key": {"string_value": "v"}}``."""
    if not isinstance(value, Mapping):
        raise TypeError(f"config override 'parameters' must be a mapping, got {type(value).__name__}")
    result: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, Mapping):
            result[key] = dict(item)
        elif isinstance(item, bool):
            result[key] = {"string_value": "true" if item else "false"}
        else:
            result[key] = {"string_value": str(item)}
    return result


def merge_model_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge a config override into a model config (both in Triton's JSON form).

    Mappings merge key by key (so ``parameters`` keeps the keys not overridden); lists and
    scalars are replaced (so ``instance_group`` is exactly the override's). ``parameters``
    values may be plain strings, numbers or booleans (``{"delay": 0.001}`` for
    ``{"delay": {"string_value": "0.001"}}``).

    Parameters
    ----------
    base
        The model's config, e.g. from :func:`read_model_config`.
    override
        The keys to change.

    Returns
    -------
    dict
        A new config; neither argument is modified.

    Raises
    ------
    TypeError
        ``override["parameters"]`` is not a mapping.
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if key == "parameters":
            value = _parameters_override(value)
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_model_config(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_model_config(repositories: Sequence[Path], model: str) -> dict[str, Any]:
    """Read ``<model>/config.pbtxt`` from the first repository that has it, in Triton's JSON form.

    Parameters
    ----------
    repositories
        The model repositories, searched in order.
    model
        The model's directory name.

    Returns
    -------
    dict
        The config; ``{}`` when no repository has a ``config.pbtxt`` for ``model`` (Triton then
        builds one from the model itself).

    Raises
    ------
    ModelConfigError
        The file does not parse as a Triton ``ModelConfig``.
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    paths = [Path(repo) / model / "config.pbtxt" for repo in repositories]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return {}
    try:
        message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelConfigError(f"cannot parse {path}: {exc}") from exc
    config: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return config


def build_model_config(repositories: Sequence[Path], model: str, override: Mapping[str, Any]) -> dict[str, Any]:
    """Build the config to load ``model`` with: the repository's, with ``override`` merged in.

    The result is checked against Triton's ``ModelConfig`` schema here, so a misspelt key
    fails with a clear message before the server sees it.

    Parameters
    ----------
    repositories
        The model repositories, searched in order.
    model
        The model's directory name; also the config's ``name`` unless it has one.
    override
        Triton JSON config keys to change (see :func:`merge_model_config`).

    Returns
    -------
    dict
        The config to send with ``load_model``.

    Raises
    ------
    ModelConfigError
        The repository's ``config.pbtxt`` does not parse.
    ValueError
        The merged config is not a valid ``ModelConfig`` (e.g. a misspelt key).
    """
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    merged = merge_model_config(read_model_config(repositories, model), override)
    merged.setdefault("name", model)
    try:
        json_format.ParseDict(merged, model_config_pb2.ModelConfig())
    except json_format.ParseError as exc:
        raise ValueError(f"invalid config override for model {model!r}: {exc}") from exc
    return merged


#: Triton's own line about a model directory it could not read (model_repository_manager.cc).
_POLL_FAILED = re.compile(r"Poll failed for model directory '(?P<model>[^']*)': (?P<reason>.*?)\"?\s*$")


def check_model_directory(repositories: Sequence[Path], model: str) -> str | None:
    """Say, in Triton's words, why ``model``'s directory cannot load; ``None`` when nothing is found.

    Checks what Triton reports only as "failed to poll from model repository" (its details go
    to the process's stderr or its log): ``config.pbtxt`` against Triton's ``ModelConfig``
    schema (the protobuf parser's own message, with line and column), the config's ``name``
    against the directory's, and, for the python backend, the model file of the version Triton
    would load (without it Triton 2.51's load waits for ever on the stub).

    Parameters
    ----------
    repositories
        The model repositories, searched in order.
    model
        The model's directory name.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    directory = next((Path(repo) / model for repo in repositories if (Path(repo) / model).is_dir()), None)
    if directory is None:
        return None  # not a local directory: Triton says what it finds
    path = directory / "config.pbtxt"
    if not path.is_file():
        return None  # Triton builds a config from the model itself
    try:
        message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        return f"failed to read text proto from {path}: {exc}"
    if message.name and message.name != model:
        return f"unexpected directory name '{model}' for model '{message.name}', directory name must equal model name"
    if message.backend == "python":
        versions = sorted((int(p.name), p) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
        if versions:
            file = versions[-1][1] / (message.default_model_filename or "model.py")
            if not file.is_file():
                return f"Python model file not found in '{file}'"
    return None


def explain_load_failure(repositories: Sequence[Path], model: str, log_text: str = "") -> str:
    """What Triton said about ``model`` that its load error leaves out: its log line, then the directory's check.

    Parameters
    ----------
    repositories
        The model repositories, searched in order.
    model
        The model's directory name.
    log_text
        This server's Triton log (its lines "Poll failed for model directory ..." are Triton's
        own reason).

    Returns
    -------
    str
        ``""`` when neither says anything.
    """
    reasons: list[str] = []
    for line in log_text.splitlines():
        found = _POLL_FAILED.search(line)
        if found and found["model"] == model:
            reasons = [found["reason"]]  # the last attempt's
    checked = check_model_directory(repositories, model)
    if checked and not any(checked in reason for reason in reasons):
        if reasons and checked.startswith(reasons[0]):
            reasons = [checked]  # the same, with the parser's line and column
        else:
            reasons.append(checked)
    return "; ".join(reasons)
