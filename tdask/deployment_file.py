"""A deployment declared in one YAML file: its loader and its checks (the schema: :mod:`tdask.deployment_spec`).

``tdask serve FILE.yaml`` and :meth:`tdask.Deployment.from_file` read it; ``tdask serve
--model-repository DIR`` builds the same spec from a Triton model repository (every model in it,
as ``tritonserver --model-repository`` serves them). A file looks like::

    cluster:                       # every field optional
      protocol: tcp                # tcp | tls | ucxx
      host: 127.0.0.1              # the address every process binds
      scheduler_port: 0            # 0: any free port
      scheduler_address: null      # join this running scheduler instead of starting one
      dashboard_address: 127.0.0.1:8787
      log_dir: tdask-logs          # relative paths are relative to this file
      log_level: WARNING
      startup_timeout_s: 180
      tls: {ca_file: ca.pem, cert: node.pem, key: node.key}   # or {temporary: true}
    operators:
      - name: encoder              # a model of a Triton repository
        implementation: triton
        repository: ../models
        workers: 2                 # worker processes hosting it
        max_inflight_requests: 4   # per worker
        resources: {GPU: 1}        # Dask resources of each of its workers
        autoscaling: {minimum: 1, maximum: 4, target_inflight_per_worker: 2, up_delay: 5s, down_delay: 60s}
      - implementation: triton     # no name: every model of the repository
        repository: ../more_models
      - name: encoder_decoder      # a Python class, by import path
        implementation: tdask.hello_world.operators:EncoderDecoder
        parameters: {}             # passed to its constructor
        colocate_with: encoder     # optional: on every encoder worker, not workers of its own
                                   # (its calls to encoder stay in process); no workers/autoscaling

Everything is validated before anything starts; every problem is reported as
``FILE:LINE: FIELD: message`` in one :class:`~tdask.exceptions.DeploymentFileError` (line numbers
come from the YAML node tree, so they point at the offending key), and unknown fields are refused
with the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from dask.utils import parse_timedelta

from tdask.deployment_spec import (
    LOG_LEVELS,
    PROTOCOLS,
    AutoscalingSpec,
    ClusterSpec,
    DeploymentSpec,
    OperatorSpec,
    TLSSpec,
)
from tdask.exceptions import DeploymentFileError
from tdask.operator import TRITON, OperatorConfig, routing_policy

Path_ = tuple[str | int, ...]

__all__ = [
    "AutoscalingSpec",
    "ClusterSpec",
    "DeploymentSpec",
    "OperatorSpec",
    "TLSSpec",
    "load_deployment_file",
    "loads_deployment",
    "repository_models",
    "spec_for_repository",
]

logger = logging.getLogger(__name__)

# -- loading ------------------------------------------------------------------------------------


def load_deployment_file(path: str | Path) -> DeploymentSpec:
    """Read and validate a deployment file.

    Parameters
    ----------
    path
        The YAML file. Relative paths inside it are relative to its directory.

    Raises
    ------
    DeploymentFileError
        The file cannot be read, is not YAML, or does not describe a valid deployment; every
        problem found is listed as ``FILE:LINE: FIELD: message``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeploymentFileError(
            f"{path}: cannot read the deployment file: {exc.strerror or exc}", file=str(path)
        ) from None
    return loads_deployment(text, source=str(path), base_dir=path.resolve().parent)


def loads_deployment(text: str, *, source: str = "<string>", base_dir: str | Path = ".") -> DeploymentSpec:
    """Validate a deployment given as YAML text (``source`` names it in errors)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        message = f"{source}:{line}: not valid YAML: {problem}"
        raise DeploymentFileError(message, file=source, line=line, field="", errors=[(line, "", problem)]) from None
    except yaml.YAMLError as exc:
        raise DeploymentFileError(f"{source}: not valid YAML: {exc}", file=source) from None
    lines: dict[Path_, int] = {}
    if node is not None:
        _index_lines(node, (), lines)
    return _Parser(source, Path(base_dir), lines).parse(data)


def spec_for_repository(
    repository: str | Path, *, workers: int = 1, max_inflight_requests: int = 1, cluster: ClusterSpec | None = None
) -> DeploymentSpec:
    """Every model of a Triton model repository, ``workers`` workers each (``tdask serve --model-repository``).

    Raises
    ------
    DeploymentFileError
        The repository is not a directory, or holds no model.
    """
    source = f"--model-repository {repository}"
    data = {
        "operators": [
            {
                "implementation": TRITON,
                "repository": str(Path(repository).resolve()),
                "workers": workers,
                "max_inflight_requests": max_inflight_requests,
            }
        ]
    }
    spec = _Parser(source, Path("."), {}).parse(data)
    if cluster is not None:
        spec.cluster = cluster
    return spec


def repository_models(repository: str | Path) -> list[str]:
    """The models of a Triton model repository: its subdirectories with a ``config.pbtxt`` or a version directory."""
    root = Path(repository)
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir()
        and not p.name.startswith((".", "_"))
        and ((p / "config.pbtxt").is_file() or any(v.is_dir() and v.name.isdigit() for v in p.iterdir()))
    )


def _index_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    """Map every key path of the YAML node tree to its line (a key's own line, 1-based)."""
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, str(key.value))
            lines[sub] = key.start_mark.line + 1
            _index_lines(value, sub, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, (*path, i), lines)


def _field_name(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Invalid(Exception):
    """One problem at one key path (collected; never escapes this module)."""

    def __init__(self, path: Path_, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class _Parser:
    """Turns the loaded YAML data into a :class:`DeploymentSpec`, collecting every problem."""

    def __init__(self, source: str, base_dir: Path, lines: dict[Path_, int]) -> None:
        self.source = source
        self.base_dir = base_dir
        self.lines = lines
        self.problems: list[tuple[Path_, str]] = []

    # -- entry ------------------------------------------------------------------------------

    def parse(self, data: Any) -> DeploymentSpec:
        spec = DeploymentSpec(source=self.source)
        if data is None:
            self._fail((), "the file is empty: it needs at least `operators:`")
        elif not isinstance(data, Mapping):
            self._fail((), f"expected a mapping with `operators:` (and `cluster:`), got {_kind(data)}")
        else:
            self._known((), data, ("cluster", "operators"))
            spec.cluster = self._guard((), lambda: self._cluster(data.get("cluster"))) or ClusterSpec()
            spec.operators = self._operators(data.get("operators"))
        self._raise()
        return spec

    def _raise(self) -> None:
        if not self.problems:
            return
        errors = []
        for path, message in self.problems:
            line = self._line(path)
            errors.append((line, _field_name(path), message))
        errors.sort(key=lambda e: e[0] or 0)  # in the file's order
        text = "\n".join(
            f"{self.source}:{line if line is not None else '?'}: {f'{fld}: ' if fld else ''}{msg}"
            for line, fld, msg in errors
        )
        first = errors[0]
        raise DeploymentFileError(text, file=self.source, line=first[0], field=first[1], errors=errors)

    def _line(self, path: Path_) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get(())

    def _fail(self, path: Path_, message: str) -> None:
        self.problems.append((path, message))

    def _guard(self, path: Path_, fn: Any) -> Any:
        try:
            return fn()
        except _Invalid as exc:
            self._fail(exc.path, exc.message)
            return None

    def _known(self, path: Path_, data: Mapping[str, Any], known: Sequence[str]) -> None:
        for key in data:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f"; did you mean `{close[0]}`?" if close else f"; known fields: {', '.join(known)}"
            self._fail((*path, str(key)), f"unknown field `{key}`{hint}")

    # -- typed values -----------------------------------------------------------------------

    def _int(self, path: Path_, value: Any, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(path, f"expected an integer >= {minimum}, got {_kind(value)} {value!r}")
        if value < minimum:
            raise _Invalid(path, f"must be >= {minimum}, got {value}")
        return value

    def _number(self, path: Path_, value: Any, *, positive: bool = True) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _Invalid(path, f"expected a number, got {_kind(value)} {value!r}")
        if positive and value <= 0:
            raise _Invalid(path, f"must be > 0, got {value}")
        return float(value)

    def _seconds(self, path: Path_, value: Any) -> float:
        if isinstance(value, str):
            try:
                seconds = parse_timedelta(value, default="seconds")
            except (ValueError, KeyError, TypeError):
                message = f"expected a duration (seconds, or e.g. '5s', '2 minutes'), got {value!r}"
                raise _Invalid(path, message) from None
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            raise _Invalid(path, f"expected a duration (seconds, or e.g. '5s'), got {_kind(value)} {value!r}")
        if seconds is None or seconds < 0:
            raise _Invalid(path, f"must be a duration >= 0, got {value!r}")
        return float(seconds)

    def _str(self, path: Path_, value: Any, *, choices: Sequence[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            raise _Invalid(path, f"expected a non-empty string, got {_kind(value)} {value!r}")
        if choices is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _Invalid(path, f"must be one of {', '.join(choices)}, got {value!r}{hint}")
        return value

    def _mapping(self, path: Path_, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"expected a mapping, got {_kind(value)} {value!r}")
        return value

    def _path(self, path: Path_, value: Any, *, directory: bool) -> str:
        text = self._str(path, value)
        resolved = (self.base_dir / Path(text).expanduser()).resolve()
        if directory and not resolved.is_dir():
            raise _Invalid(path, f"{text!r} is not a directory ({resolved})")
        if not directory and not resolved.is_file():
            raise _Invalid(path, f"{text!r} is not a file ({resolved})")
        return str(resolved)

    def _fields(self, path: Path_, data: Mapping[str, Any], parsers: Mapping[str, Any]) -> dict[str, Any]:
        """Parse each known field of ``data`` with its parser, collecting problems; unknown ones refused."""
        self._known(path, data, list(parsers))
        out = {}
        for key, parse in parsers.items():
            if key not in data:
                continue
            sub = (*path, key)
            try:
                out[key] = parse(sub, data[key])
            except _Invalid as exc:
                self._fail(exc.path, exc.message)
        return out

    # -- sections ---------------------------------------------------------------------------

    def _cluster(self, data: Any) -> ClusterSpec:
        path: Path_ = ("cluster",)
        if data is None:
            return ClusterSpec()
        data = self._mapping(path, data)
        values = self._fields(
            path,
            data,
            {
                "protocol": lambda p, v: self._str(p, v, choices=PROTOCOLS),
                "host": lambda p, v: self._str(p, v),
                "scheduler_port": lambda p, v: self._port(p, v),
                "scheduler_address": lambda p, v: self._address(p, v),
                "dashboard_address": lambda p, v: None if v is None else self._str(p, str(v)),
                "log_dir": lambda p, v: str((self.base_dir / self._str(p, v)).resolve()),
                "log_level": lambda p, v: self._str(p, str(v).upper(), choices=LOG_LEVELS),
                "startup_timeout_s": lambda p, v: self._number(p, v),
                "tls": lambda p, v: self._tls(p, v),
            },
        )
        if "log_dir" not in values:
            values["log_dir"] = str((self.base_dir / ClusterSpec.log_dir).resolve())
        cluster = ClusterSpec(**{k: v for k, v in values.items() if v is not None or k == "dashboard_address"})
        if cluster.tls is not None and cluster.protocol != "tls":
            message = f"TLS files are given but the protocol is {cluster.protocol!r}: set `protocol: tls`"
            self._fail((*path, "tls"), message)
        if cluster.protocol == "ucxx" and importlib.util.find_spec("distributed_ucxx") is None:
            self._fail((*path, "protocol"), "ucxx needs distributed-ucxx (pip install 'tdask[ucx]')")
        if cluster.scheduler_address and cluster.scheduler_port:
            self._fail((*path, "scheduler_port"), "a deployment that joins `scheduler_address` starts no scheduler")
        if cluster.scheduler_address and not cluster.scheduler_address.startswith(cluster.protocol + "://"):
            self._fail(
                (*path, "scheduler_address"),
                f"{cluster.scheduler_address!r} does not use the cluster's protocol {cluster.protocol!r}",
            )
        return cluster

    def _port(self, path: Path_, value: Any) -> int:
        port = self._int(path, value, 0)
        if port > 65535:
            raise _Invalid(path, f"must be a port number (0-65535), got {port}")
        return port

    def _address(self, path: Path_, value: Any) -> str | None:
        if value is None:
            return None
        text = self._str(path, value)
        if "://" not in text:
            raise _Invalid(path, f"expected a scheduler address such as 'tcp://HOST:8786', got {text!r}")
        return text

    def _tls(self, path: Path_, value: Any) -> TLSSpec:
        data = self._mapping(path, value)
        files = [f.name for f in dataclasses.fields(TLSSpec) if f.name != "temporary"]
        parsers: dict[str, Any] = {name: lambda p, v: self._path(p, v, directory=False) for name in files}
        parsers["temporary"] = lambda p, v: self._bool(p, v)
        tls = TLSSpec(**self._fields(path, data, parsers))
        if not tls.temporary:
            if not tls.ca_file:
                self._fail(path, "needs `ca_file` (and `cert`/`key`, or per role), or `temporary: true`")
            for role in ("scheduler", "worker", "client"):
                if not (getattr(tls, f"{role}_cert") or tls.cert):
                    self._fail(path, f"needs `cert` (or `{role}_cert`) for the {role}")
        return tls

    def _bool(self, path: Path_, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(path, f"expected true or false, got {_kind(value)} {value!r}")
        return value

    def _operators(self, data: Any) -> list[OperatorSpec]:
        path: Path_ = ("operators",)
        if data is None:
            self._fail(path if path in self.lines else (), "the deployment needs `operators:`, a list of operators")
            return []
        if not isinstance(data, list) or not data:
            self._fail(path, f"expected a non-empty list of operators, got {_kind(data)} {data!r}")
            return []
        out: list[OperatorSpec] = []
        seen: dict[str, Path_] = {}
        for i, item in enumerate(data):
            for op, op_path in self._operator((*path, i), item):
                key = f"{op.name}/{op.version}"
                if key in seen:
                    where = self._line(seen[key])
                    self._fail(op_path, f"operator {key} is listed twice (first on line {where})")
                    continue
                seen[key] = op_path
                out.append(op)
        hosts = {op.name for op in out if op.colocate_with is None}
        for op in out:
            if op.colocate_with is not None and op.colocate_with not in hosts:
                entry = seen[f"{op.name}/{op.version}"]
                guest = any(o.name == op.colocate_with for o in out)
                why = "is co-located itself" if guest else "is not an operator of this file"
                self._fail((*entry, "colocate_with"), f"{op.colocate_with!r} {why}: name an operator with workers")
        return out

    def _operator(self, path: Path_, item: Any) -> Iterator[tuple[OperatorSpec, Path_]]:
        if not isinstance(item, Mapping):
            self._fail(path, f"expected a mapping describing an operator, got {_kind(item)} {item!r}")
            return
        has_timeout = any(f.name == "execution_timeout_s" for f in dataclasses.fields(OperatorConfig))
        parsers: dict[str, Any] = {
            "name": lambda p, v: self._name(p, v),
            "implementation": lambda p, v: self._str(p, v),
            "repository": lambda p, v: None if v is None else self._path(p, v, directory=True),
            "version": lambda p, v: self._int(p, v, 1),
            "workers": lambda p, v: self._int(p, v, 0),
            "max_inflight_requests": lambda p, v: self._int(p, v, 1),
            "parameters": lambda p, v: dict(self._mapping(p, v)),
            "log_level": lambda p, v: self._str(p, str(v).upper(), choices=LOG_LEVELS),
            "routing": lambda p, v: self._routing(p, v),
            "execution_timeout_s": lambda p, v: self._timeout(p, v, has_timeout),
            "resources": lambda p, v: self._resources(p, v),
            "autoscaling": lambda p, v: self._autoscaling(p, v),
            "colocate_with": lambda p, v: self._name(p, v),
        }
        values = self._fields(path, item, parsers)
        if "colocate_with" in item:
            for field_ in ("workers", "autoscaling", "resources"):
                if field_ in item:
                    self._fail(
                        (*path, field_),
                        f"an operator with `colocate_with` runs on every worker of {item['colocate_with']!r}: "
                        f"give `{field_}` to that operator instead",
                    )
        if "implementation" not in item:
            self._fail(path, "missing field `implementation` ('triton', or a Python class as 'module:Class')")
            return
        impl = values.get("implementation")
        if impl is None:
            return
        line = self._line(path) or 0
        if impl == TRITON:
            yield from self._triton(path, item, values, line)
            return
        if ":" not in impl:
            message = f"expected 'triton' or a Python class as 'module:Class', got {impl!r}"
            self._fail((*path, "implementation"), message)
            return
        if values.get("name") is None:
            if "name" not in item:
                self._fail(path, "missing field `name` (the name callers use)")
            return
        self._check_importable((*path, "implementation"), impl, values.get("repository"))
        yield from self._checked(path, OperatorSpec(**values, line=line))

    def _triton(
        self, path: Path_, item: Mapping[str, Any], values: dict[str, Any], line: int
    ) -> Iterator[tuple[OperatorSpec, Path_]]:
        repository = values.get("repository")
        if repository is None:
            if "repository" not in item:
                self._fail(path, "a Triton operator needs `repository`, the model repository")
            return
        models = repository_models(repository)
        name = values.get("name")
        model = str((values.get("parameters") or {}).get("model", name)) if name is not None else None
        if name is None:
            if "name" in item:
                return  # its own problem is already reported
            if not models:
                self._fail((*path, "repository"), f"{repository} holds no Triton model (no */config.pbtxt)")
                return
            for model_name in models:
                spec = OperatorSpec(**{**values, "name": model_name}, line=line)
                if self._version_exists(path, repository, model_name, spec.version, quiet=True):
                    yield from self._checked(path, spec)
            return
        if model not in models:
            close = difflib.get_close_matches(str(model), models, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it has: {', '.join(models) or 'none'}"
            self._fail((*path, "name"), f"model {model!r} is not in the repository {repository}{hint}")
            return
        spec = OperatorSpec(**values, line=line)
        if self._version_exists(path, repository, str(model), spec.version, quiet=False):
            yield from self._checked(path, spec)

    def _version_exists(self, path: Path_, repository: str, model: str, version: int, *, quiet: bool) -> bool:
        versions = sorted(int(v.name) for v in (Path(repository) / model).iterdir() if v.is_dir() and v.name.isdigit())
        if version in versions or not versions:
            return True
        if not quiet or version != 1:
            self._fail(
                (*path, "version"),
                f"model {model!r} has no version {version} in {repository} (it has: {', '.join(map(str, versions))})",
            )
        return False

    def _checked(self, path: Path_, spec: OperatorSpec) -> Iterator[tuple[OperatorSpec, Path_]]:
        """Build the OperatorConfig once here, so that its own checks fail before anything starts."""
        try:
            spec.config()
        except (TypeError, ValueError) as exc:
            self._fail(path, str(exc))
            return
        if spec.autoscaling is not None:
            auto = spec.autoscaling
            if auto.target_inflight_per_worker is None:
                auto.target_inflight_per_worker = float(spec.max_inflight_requests)
            if not auto.minimum <= spec.workers <= auto.maximum:
                self._fail(
                    (*path, "workers"),
                    f"{spec.workers} workers is outside the autoscaling bounds {auto.minimum}..{auto.maximum}",
                )
                return
        elif spec.workers < 1:
            self._fail((*path, "workers"), "must be >= 1 (0 workers only with `autoscaling: {minimum: 0, ...}`)")
            return
        yield spec, path

    def _name(self, path: Path_, value: Any) -> str:
        name = self._str(path, value)
        if "/" in name:
            raise _Invalid(path, f"an operator name has no '/': {name!r}")
        return name

    def _routing(self, path: Path_, value: Any) -> Any:
        try:
            routing_policy(value, "?")
        except ValueError as exc:
            raise _Invalid(path, str(exc).replace("operator '?': ", "")) from None
        return value

    def _timeout(self, path: Path_, value: Any, supported: bool) -> float:
        if not supported:
            raise _Invalid(path, "this tdask's OperatorConfig has no execution timeout")
        seconds = self._seconds(path, value)
        if seconds <= 0:
            raise _Invalid(path, f"must be a duration > 0, got {value!r}")
        return seconds

    def _resources(self, path: Path_, value: Any) -> dict[str, float]:
        data = self._mapping(path, value)
        out = {}
        for name, amount in data.items():
            out[str(name)] = self._number((*path, str(name)), amount)
        return out

    def _autoscaling(self, path: Path_, value: Any) -> AutoscalingSpec:
        data = self._mapping(path, value)
        values = self._fields(
            path,
            data,
            {
                "minimum": lambda p, v: self._int(p, v, 0),
                "maximum": lambda p, v: self._int(p, v, 1),
                "target_inflight_per_worker": lambda p, v: self._number(p, v),
                "up_delay": lambda p, v: self._seconds(p, v),
                "down_delay": lambda p, v: self._seconds(p, v),
            },
        )
        if "maximum" not in data:
            raise _Invalid(path, "needs `maximum`, the most workers of the operator")
        auto = AutoscalingSpec(**{k: v for k, v in values.items() if v is not None})
        if auto.minimum > auto.maximum:
            raise _Invalid((*path, "minimum"), f"minimum {auto.minimum} is above maximum {auto.maximum}")
        return auto

    def _check_importable(self, path: Path_, implementation: str, repository: str | None) -> None:
        module = implementation.partition(":")[0]
        if repository is not None:
            base = Path(repository, *module.split("."))
            if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
                return
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            where = f" in {repository} or" if repository else ""
            self._fail(path, f"no module {module!r}{where} on the Python path")


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}.get(
        type(value), f"a {type(value).__name__}"
    )
