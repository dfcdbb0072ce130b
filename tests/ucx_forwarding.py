"""Run by tests/test_gpu_ucx.py in a process of its own: a ``ucxx://`` deployment, forwarding by reference.

UCX keeps a process-wide context (and listeners on every interface) after the deployment closes;
in a child process it ends with it, so the test process never starts UCX. One deployment serves
every size asked for (``SIZES``: comma-separated element counts), in turn; prints one JSON line
with each size's sums and what each worker's store counted during that size's rounds.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from tdask import Deployment, OperatorConfig, RemoteOperator
from tests.conftest import store_stats
from tests.operators import Consumer, Forward, Producer


def main(sizes: list[int], rounds: int) -> None:
    operators = [
        OperatorConfig(name="forward", implementation=Forward),
        OperatorConfig(name="producer", implementation=Producer),
        OperatorConfig(name="consumer", implementation=Consumer),
    ]
    with Deployment(operators, protocol="ucxx", dashboard_address=None) as dep:
        runs = {}
        before = store_stats(dep.client)
        for n in sizes:
            sums = []
            for round_ in range(rounds):
                response = RemoteOperator("forward", client=dep.client).infer(
                    inputs={"start": np.array([float(round_)])}, parameters={"n": n}
                )
                sums.append(float(response.outputs["sum"][0]))
            after = store_stats(dep.client)
            counted = {w: {k: v - before.get(w, {}).get(k, 0) for k, v in s.items()} for w, s in after.items()}
            runs[str(n)] = {"sums": sums, "stats": counted}
            before = after
        result = {
            "scheduler": dep.scheduler_address,
            "workers": sorted(dep.client.scheduler_info()["workers"]),
            "runs": runs,
        }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1].split(",")], int(sys.argv[2]))
