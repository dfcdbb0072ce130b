"""BYTES (object) tensors end to end: the codec, a Python operator, the data plane and a Triton model."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tdask import Deployment, InvalidRequestError, OperatorConfig, RemoteOperator, protocol
from tests.conftest import assert_no_children

pytestmark = pytest.mark.timeout(240)

TEST_MODELS = os.path.join(os.path.dirname(__file__), "models")


def test_codec_is_tritons_length_prefixed_form_and_round_trips():
    array = np.array([[b"ab", "\u00e9"], [b"", b"\x00\xff"]], dtype=object)
    entry = protocol.encode_inline(array)
    # Triton's BYTES serialization: uint32 little-endian length, then the bytes; str as UTF-8.
    packed = b"\x02\x00\x00\x00ab\x02\x00\x00\x00\xc3\xa9\x00\x00\x00\x00\x02\x00\x00\x00\x00\xff"
    assert entry == {"bt": [[2, 2], packed]}
    decoded = protocol.decode_inline(entry)
    assert decoded.dtype == object and decoded.shape == (2, 2)
    assert decoded.tolist() == [[b"ab", "\u00e9".encode()], [b"", b"\x00\xff"]]
    assert protocol.decode_inline(protocol.encode_inline(np.empty((0, 3), dtype=object))).shape == (0, 3)
    with pytest.raises(ValueError, match="truncated"):
        protocol.unpack_bytes(b"\x05\x00\x00\x00ab", [1])
    with pytest.raises(ValueError, match="after its"):
        protocol.unpack_bytes(b"\x00\x00\x00\x00x", [1])


def test_object_tensors_of_other_things_are_refused_with_names():
    with pytest.raises(InvalidRequestError, match="holding a int") as info:
        protocol.check_inputs("op", "r1", {"x": np.array([b"a", 3], dtype=object)}, max_bytes=1 << 20)
    assert info.value.operator == "op" and info.value.request_id == "r1"


@pytest.fixture(scope="module")
def client():
    hops = {"first": "echo", "second": "echo"}
    operators = [
        (OperatorConfig(name="echo", implementation="tests.operators:Echo"), 1),
        (OperatorConfig(name="forward", implementation="tests.operators:Forward", parameters=hops), 1),
        (OperatorConfig(name="bytes_upper", implementation="triton", repository=TEST_MODELS), 1),
    ]
    with Deployment(operators, dashboard_address="127.0.0.1:0") as deployment:
        yield deployment.client
    assert_no_children()


@pytest.mark.cluster
@pytest.mark.parametrize("size", [3, 5_000])  # small, and over 64 KiB of element objects
def test_bytes_through_python_operators_and_a_hop(client, size):
    text = np.array([f"w{i}".encode() for i in range(size)], dtype=object)
    for name in ("echo", "forward"):
        out = RemoteOperator(name, client=client).infer(inputs={"text": text}).outputs["text"]
        assert out.dtype == object and out.tolist() == text.tolist()


@pytest.mark.cluster
def test_bytes_through_a_triton_model(client):
    text = np.array([b"hello", "w\u00f6rld", b""], dtype=object)
    out = RemoteOperator("bytes_upper", client=client).infer(inputs={"text": text}).outputs["upper"]
    assert out.dtype == object and out.tolist() == [b"HELLO", "W\u00f6RLD".encode(), b""]
