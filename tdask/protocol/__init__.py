"""The messages of tdask, defined once: op names, message shapes, the tensor codec and the checks.

Every process of a deployment (callers, workers, the scheduler's broker) speaks in small
msgpack-friendly dicts. This module is the only place that names their operations and builds
them; the transports (:mod:`tdask.transport.wire`, :mod:`tdask.transport.dask_comm`) carry
them without looking inside beyond :func:`check_message`.

Requests and responses::

    request   id, requester, operator ("name/version"), parameters, inputs, deadline (epoch s or
              None), attempt, max_retries, host_wait_s, rehost_wait_s
    response  id, requester, operator, worker, outputs, parameters, error (dict or None), final

Session messages (one-way, in both directions, batched by the transports):

============== ============================ ===========================================
op             fields                       from -> to
============== ============================ ===========================================
hello          wire, requester              caller -> worker (first frame of the wire)
submit         request                      caller -> broker or worker
cancel         request_ids                  caller -> broker or worker
credit         operator, n                  worker -> broker (free slots)
respond        responses                    worker -> broker
stats          stats, host                  worker -> broker (metrics: the cluster view, the dashboard)
requests       operator, requests           broker -> worker (leased requests)
withdraw       keys ([requester, id] pairs) broker -> worker (cancel leased requests)
requester-left requester                    broker -> worker (a client closed)
replies        replies                      broker or worker -> caller
refused        id                           worker -> caller (not hosted here any more)
data           call, action, ...            caller -> worker on the wire: fetch, put or release
                                            tensors of its store (tdask.data_plane.Shortcut)
data-reply     call, status, ...            worker -> caller: the answer (fetch: data)
============== ============================ ===========================================

Tensors in ``inputs``/``outputs`` are entries made by :func:`encode_tensors`: ``{"nd": [dtype,
shape, bytes]}`` for numpy arrays, ``{"bt": [shape, bytes]}`` for object arrays of bytes/str
(Triton's BYTES tensors, in Triton's own length-prefixed serialization: each element a
little-endian uint32 length then its bytes; they decode as an object array of ``bytes``, and
always travel inline), ``{"cu": [dtype, shape, bytes]}`` for small cupy arrays, ``{"ref":
descriptor}`` for a :class:`~tdask.data_plane.RemoteTensor`. Nothing else is decoded: tdask's
messages never unpickle what a peer sent (:func:`decode_inline`).
"""

# One package, two files: the messages (messages.py) and the tensors they carry (tensors.py);
# everything is imported from here.
from tdask.protocol.messages import (
    DataAction,
    Op,
    ProtocolError,
    RequestMsg,
    ResponseMsg,
    Rpc,
    cancel,
    check_message,
    check_request,
    check_shape,
    credit,
    data,
    data_reply,
    error_reply,
    hello,
    operator_key,
    refused,
    replies,
    request_msg,
    requester_left,
    requests,
    respond,
    response_msg,
    stats,
    submit,
    withdraw,
)
from tdask.protocol.tensors import (
    Place,
    check_inputs,
    check_outputs,
    check_parameters,
    check_response_parameters,
    decode_inline,
    decode_tensors,
    encode_inline,
    encode_tensors,
    is_array,
    pack_bytes,
    refs_in,
    tensors_in,
    unpack_bytes,
)

__all__ = [
    "DataAction",
    "Op",
    "Place",
    "ProtocolError",
    "RequestMsg",
    "ResponseMsg",
    "Rpc",
    "cancel",
    "check_inputs",
    "check_message",
    "check_outputs",
    "check_parameters",
    "check_request",
    "check_response_parameters",
    "check_shape",
    "credit",
    "data",
    "data_reply",
    "decode_inline",
    "decode_tensors",
    "encode_inline",
    "encode_tensors",
    "error_reply",
    "hello",
    "is_array",
    "operator_key",
    "pack_bytes",
    "refs_in",
    "refused",
    "replies",
    "request_msg",
    "requester_left",
    "requests",
    "respond",
    "response_msg",
    "stats",
    "submit",
    "tensors_in",
    "unpack_bytes",
    "withdraw",
]
