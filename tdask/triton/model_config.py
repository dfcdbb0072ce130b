"""A model's Triton config: read from its repository, with a load-time override merged in.

Triton *replaces* a model's config with the one sent at load time, so "override only
``instance_group`` and ``parameters``" means sending the repository's whole ``config.pbtxt``
with those keys changed. Configs are handled in Triton's JSON form (what ``load_model`` takes),
checked against Triton's ``ModelConfig`` protobuf schema before the server sees them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ModelConfigError", "build_model_config", "merge_model_config", "read_model_config"]


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
