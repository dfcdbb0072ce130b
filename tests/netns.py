"""Hosts of their own for multi-host tests: network namespaces on a private bridge (Linux, root).

Every namespace here is anonymous: a holder process (``unshare --net sleep``) keeps it alive, and
it vanishes with the last process inside it, together with its veth pair and its iptables rules.
The bridge lives in a "switch" namespace of its own, so nothing is added to the machine's own
network namespace (no interface, no route, no firewall rule), and nothing is left behind even
when the test process is killed: every process started here gets ``PR_SET_PDEATHSIG``, so it
dies with the test process, and with it the namespaces.

Processes enter a host with ``nsenter --net=/proc/<holder>/ns/net``: same file system, same
Python, the host's own addresses (``10.87.0.<n>/24``, used nowhere else).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

SUBNET = "10.87.0"
_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int = signal.SIGKILL) -> None:
    """In the child, before exec: receive ``signum`` when the test process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum)


def _net_ns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why hosts cannot be made here (None: they can): Linux, root, the tools, and one trial."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    missing = [tool for tool in ("unshare", "nsenter", "ip", "iptables") if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (apt-get install util-linux iproute2 iptables)"
    try:
        with Network(["a"]) as net:
            net.iptables("a", "-L", "INPUT", "-n")
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        return f"cannot make a network namespace with a bridge, a veth pair and iptables here: {detail}"
    return None


class Network:
    """Hosts, each a network namespace with one address, on one bridge.

    Parameters
    ----------
    hosts
        Host names; host ``i`` gets the address ``10.87.0.<i + 1>``.
    """

    def __init__(self, hosts: Sequence[str]) -> None:
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(hosts)}
        self._holders: dict[str, subprocess.Popen[bytes]] = {}
        self._procs: list[subprocess.Popen[Any]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Network:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _holder(self, name: str) -> None:
        own = _net_ns("self")
        proc = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "infinity"], preexec_fn=_die_with_parent, stderr=subprocess.PIPE
        )
        self._holders[name] = proc
        deadline = time.monotonic() + 10
        while _net_ns(proc.pid) == own:  # unshare has not switched yet
            if proc.poll() is not None:
                raise RuntimeError(f"unshare --net failed: {proc.stderr.read().decode() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net did not make a namespace within 10 s")
            time.sleep(0.01)

    def _start(self) -> None:
        self._holder(" switch")
        self._in(" switch", "ip", "link", "add", "br0", "type", "bridge")
        self._in(" switch", "ip", "link", "set", "br0", "up")
        for i, (name, address) in enumerate(self.addresses.items()):
            self._holder(name)
            pid = str(self._holders[name].pid)
            self._in(" switch", "ip", "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0", "netns", pid)
            self._in(" switch", "ip", "link", "set", f"port{i}", "master", "br0", "up")
            self._in(name, "ip", "link", "set", "lo", "up")
            self._in(name, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            self._in(name, "ip", "link", "set", "eth0", "up")

    def close(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL after 30 s), then the namespaces."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for holder in self._holders.values():
            holder.kill()
            holder.wait()
            if holder.stderr is not None:
                holder.stderr.close()
        self._holders.clear()

    # -- inside a host -----------------------------------------------------------------------

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """``args`` run inside ``host``'s network namespace."""
        return ["nsenter", f"--net=/proc/{self._holders[host].pid}/ns/net", "--", *args]

    def _in(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, args), check=True, capture_output=True, text=True, timeout=30)

    def popen(self, host: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` inside ``host``; stopped by :meth:`close` (and when the test process dies)."""
        proc = subprocess.Popen(self.command(host, args), preexec_fn=lambda: _die_with_parent(signal.SIGTERM), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: str, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``args`` inside ``host`` to the end (it dies with the test process too)."""
        return subprocess.run(self.command(host, args), preexec_fn=lambda: _die_with_parent(signal.SIGTERM), **kwargs)

    def stop(self, *procs: subprocess.Popen[Any], timeout: float = 30) -> None:
        """SIGTERM ``procs`` together (SIGKILL after ``timeout``), wait for them and forget them."""
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc in self._procs:
                self._procs.remove(proc)

    def iptables(self, host: str, *args: str) -> str:
        """Run ``iptables ARGS`` inside ``host`` (its own tables: the machine's are untouched)."""
        return self._in(host, "iptables", "-w", *args).stdout

    def input_bytes_from(self, host: str, source: str) -> int:
        """Bytes ``host`` received from ``source`` (a counting rule, added by :meth:`count_from`)."""
        rules = self.iptables(host, "-S", "INPUT", "-v")
        match = re.search(rf"^-A INPUT -s {re.escape(self.addresses[source])}/32 -c \d+ (\d+)$", rules, re.M)
        if match is None:
            raise LookupError(f"no counting rule for {source} on {host}:\n{rules}")
        return int(match.group(1))

    def count_from(self, host: str, source: str) -> None:
        """Count the bytes ``host`` receives from ``source`` (a rule without a target: it only counts)."""
        self.iptables(host, "-A", "INPUT", "-s", self.addresses[source])
