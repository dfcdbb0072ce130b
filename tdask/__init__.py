"""tdask: distributed inference pipelines on Dask, with Triton models and Python operators."""

from tdask import config  # noqa: F401  (first: installs tdask's dask.config defaults)
from tdask.data_plane import RemoteTensor
from tdask.deployment import Deployment
from tdask.exceptions import (
    ClientClosedError,
    DataPlaneError,
    InvalidRequestError,
    OperatorError,
    OperatorUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
    SchedulerLostError,
    TdaskError,
    WorkerLostError,
)
from tdask.host import OperatorHost
from tdask.operator import Operator, OperatorConfig, Request, ResponseSender
from tdask.remote import RemoteOperator, Response

__all__ = [
    "ClientClosedError",
    "DataPlaneError",
    "Deployment",
    "InvalidRequestError",
    "Operator",
    "OperatorConfig",
    "OperatorError",
    "OperatorHost",
    "OperatorUnavailableError",
    "RemoteOperator",
    "RemoteTensor",
    "Request",
    "RequestCancelledError",
    "RequestTimeoutError",
    "Response",
    "ResponseSender",
    "SchedulerLostError",
    "TdaskError",
    "WorkerLostError",
]

__version__ = "0.1.0"
