"""The one door to a peer (tdask.transport.registry): which transport a session takes, decided there."""

from __future__ import annotations

import dask.config
import pytest

from tdask import transport
from tdask.transport.dask_comm import Session
from tdask.transport.wire import WireSession


def names(address: str, kind: transport.PeerKind = "worker") -> list[str]:
    return [backend.name for backend in transport.routes(address, kind)]


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_a_tcp_or_tls_worker_is_reached_over_the_wire_then_dasks_comm(scheme):
    assert names(f"{scheme}://127.0.0.1:1234") == ["wire", "dask"]
    assert transport.carries_data(f"{scheme}://127.0.0.1:1234")


@pytest.mark.parametrize("address", ["ucx://127.0.0.1:1234", "inproc://127.0.0.1/1/2"])
def test_other_schemes_take_dasks_comm_alone_and_no_data_shortcut(address):
    assert names(address) == ["dask"]
    assert not transport.carries_data(address)


def test_the_scheduler_is_reached_over_dasks_comm_whatever_its_scheme():
    assert names("tcp://127.0.0.1:8786", "scheduler") == ["dask"]
    assert names("tls://127.0.0.1:8786", "scheduler") == ["dask"]


def test_direct_transport_dask_turns_the_wire_off_everywhere():
    with dask.config.set({"tdask.request.direct-transport": "dask"}):
        assert names("tcp://127.0.0.1:1234") == ["dask"]
        assert not transport.carries_data("tcp://127.0.0.1:1234")
    assert names("tcp://127.0.0.1:1234") == ["wire", "dask"]  # the setting is read at each call


def test_each_backend_says_what_its_sessions_carry():
    assert transport.backends["wire"].carries_data is WireSession.carries_data is True
    assert transport.backends["dask"].carries_data is Session.carries_data is False
