"""Run by tests/test_gpu_ucx.py in a process of its own: a ``ucxx://`` deployment, forwarding by reference.

UCX keeps a process-wide context (and listeners on every interface) after the deployment closes;
in a child process it ends with it, so the test process never starts UCX. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tdask import Deployment, OperatorConfig, RemoteOperator
from tests.conftest import store_stats
from tests.operators import Consumer, Forward, Producer


def main(n: int, rounds: int) -> None:
    operators = [
        OperatorConfig(name="forward", implementation=Forward),
        OperatorConfig(name="producer", implementation=Producer),
        OperatorConfig(name="consumer", implementation=Consumer),
    ]
    with Deployment(operators, protocol="ucxx", dashboard_address=None) as dep:
        sums = []
        for round_ in range(rounds):
            response = RemoteOperator("forward", client=dep.client).infer(
                inputs={"start": np.array([float(round_)])}, parameters={"n": n}
            )
            sums.append(float(response.outputs["sum"][0]))
        result = {
            "scheduler": dep.scheduler_address,
            "workers": sorted(dep.client.scheduler_info()["workers"]),
            "sums": sums,
            "stats": store_stats(dep.client),
        }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
