"""Counting executions and answers per request where they happen, for the soak and failover tests.

Worker side: an operator given an ``record_dir`` parameter appends one line per execution
event to ``<record_dir>/<pid>.log`` with one ``write`` (:func:`record`): ``S <id> ...`` when it
starts executing a request, ``E <id> ...`` just before it sends the request's answer. A line
written is in the file even if the worker is SIGKILLed the next instant, so the file of a killed
worker still says what it had started and not finished.

Client side: :class:`Answers` counts every response the client's request plane receives for a
request, including the ones nobody waits for any more (a second answer to a request already
answered reaches the plane's ``on_orphan``, never the caller).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def record(directory: str | None, event: str, request_id: str, detail: str = "") -> None:
    """Append ``<event> <request_id> <time.time()> <detail>`` to ``<directory>/<pid>.log``."""
    if not directory:
        return
    line = f"{event} {request_id} {time.time():.6f} {detail}\n".encode()
    fd = os.open(os.path.join(directory, f"{os.getpid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write: in the file before the answer leaves, whatever kills us next
    finally:
        os.close(fd)


@dataclass
class Event:
    pid: int
    kind: str  # "S": started executing, "E": about to send the answer
    request_id: str
    t: float  # time.time()
    detail: str


@dataclass
class Ledger:
    """Every execution event the operators recorded, from the files of all their processes."""

    events: list[Event] = field(default_factory=list)

    @classmethod
    def read(cls, directory: str | Path) -> Ledger:
        """Read the files of every process."""
        events = []
        for path in sorted(Path(directory).glob("*.log")):
            pid = int(path.stem)
            for line in path.read_text().splitlines():
                kind, request_id, t, *detail = line.split(" ", 3)
                events.append(Event(pid, kind, request_id, float(t), detail[0] if detail else ""))
        return cls(events)

    @staticmethod
    def executing(directory: str | Path, pid: int) -> dict[str, str]:
        """What ``pid`` executes now (id -> detail), by its own file (cheaper than :meth:`read`, for polling)."""
        started: dict[str, str] = {}
        try:
            text = (Path(directory) / f"{pid}.log").read_text()
        except FileNotFoundError:
            return started
        for line in text.splitlines():
            kind, request_id, _, detail = line.split(" ", 3)
            if kind == "S":
                started[request_id] = detail
            else:
                started.pop(request_id, None)
        return started

    def pids(self, kind: str, request_id: str) -> list[int]:
        return [e.pid for e in self.events if e.kind == kind and e.request_id == request_id]

    def per_id(self, kind: str) -> Counter[str]:
        return Counter(e.request_id for e in self.events if e.kind == kind)

    def in_flight(self, pid: int) -> dict[str, Event]:
        """Requests ``pid`` started executing and did not finish (no ``E`` after their ``S``)."""
        started: dict[str, Event] = {}
        for e in self.events:
            if e.pid != pid:
                continue
            if e.kind == "S":
                started[e.request_id] = e
            elif e.kind == "E":
                started.pop(e.request_id, None)
        return started


class Answers:
    """Every response a client receives, per request id (:meth:`install` on its request plane).

    :meth:`call` sends a request with ``RemoteOperator.stream`` and counts each response it
    yields; replies that reach the plane for a request nobody waits for any more (a duplicate
    answer) are counted in :attr:`orphans`.
    """

    def __init__(self) -> None:
        self.responses: Counter[str] = Counter()
        self.orphans: Counter[str] = Counter()

    def install(self, client: Any) -> Answers:
        from tdask.remote import _ClientEndpoint

        plane = _ClientEndpoint.of(client).plane
        previous = plane.on_orphan

        def orphan(reply: dict[str, Any]) -> None:
            self.orphans[reply["id"]] += 1
            if previous is not None:
                previous(reply)

        plane.on_orphan = orphan
        return self

    async def call(self, op: Any, request_id: str, **kwargs: Any) -> Any:
        """``op.infer(..., request_id=request_id)``, counting every response."""
        best = None
        async with op.stream(request_id=request_id, **kwargs) as call:
            async for response in call:
                self.responses[request_id] += 1
                if response.outputs or best is None or not response.final:
                    best = response
        return best

    def per_id(self, request_id: str) -> int:
        return self.responses[request_id] + self.orphans[request_id]


def check(
    ids: Iterable[str], answers: Answers, ledger: Ledger, killed: set[int], max_retries: int
) -> tuple[list[str], dict[str, Any]]:
    """What is wrong with the requests ``ids`` (empty: nothing), and the figures.

    - answers: exactly one response received per id (none missing, none twice);
    - executions: at least one started and one finished per id, at most ``1 + max_retries``
      started, and at most one finished on a process that was not killed (another finished
      execution means the request was served twice while its worker lived);
    - no execution of an id that was never sent.
    """
    ids = list(ids)
    wanted = set(ids)
    starts, ends = ledger.per_id("S"), ledger.per_id("E")
    live_ends = Counter(e.request_id for e in ledger.events if e.kind == "E" and e.pid not in killed)
    problems = []

    def some(label: str, bad: list[str], show: Any) -> None:
        if bad:
            problems.append(f"{len(bad)} {label}: " + ", ".join(f"{i} ({show(i)})" for i in bad[:5]))

    some("requests not answered", [i for i in ids if answers.per_id(i) == 0], lambda i: "no response")
    some(
        "requests answered more than once",
        [i for i in ids if answers.per_id(i) > 1],
        lambda i: f"{answers.responses[i]} responses, {answers.orphans[i]} more nobody waited for",
    )
    some("requests never executed", [i for i in ids if starts[i] == 0], lambda i: "no start")
    some("requests never executed to the end", [i for i in ids if ends[i] == 0], lambda i: "no finish")
    some(
        f"requests executed more than 1 + {max_retries} times",
        [i for i in ids if starts[i] > 1 + max_retries],
        lambda i: f"started on pids {ledger.pids('S', i)}",
    )
    some(
        "requests executed to the end twice by workers that lived",
        [i for i in ids if live_ends[i] > 1],
        lambda i: f"finished on pids {ledger.pids('E', i)}, killed {sorted(killed)}",
    )
    some("executions of requests never sent", sorted(set(starts) - wanted), lambda i: f"pids {ledger.pids('S', i)}")
    figures = {
        "executions_per_id": dict(sorted(Counter(starts[i] for i in ids).items())),
        "finished_executions_per_id": dict(sorted(Counter(ends[i] for i in ids).items())),
        "answers_per_id": dict(sorted(Counter(answers.per_id(i) for i in ids).items())),
        "re_executed": sum(1 for i in ids if starts[i] > 1),
    }
    return problems, figures
