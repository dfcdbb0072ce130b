"""The hello world on a SLURM cluster: a dask-jobqueue ``SLURMCluster`` whose workers preload tdask.

    python examples/slurm.py --print [--gpu]           # the batch script each worker job runs
    python examples/slurm.py --jobs 2 [--queue Q ...]  # submit 2 jobs, run requests, cancel them

Each job is one worker hosting the whole hello world (``encoder``, ``decoder`` and
``encoder_decoder``, one Triton server for both models), so the pipeline scales by jobs:
``cluster.scale(jobs=n)``. The scheduler runs here (the login node) in this process; the jobs
run ``python -m distributed.cli.dask_worker ... --preload tdask.worker --tdask-operator ...``
with this Python, so tdask must be installed where the compute nodes see it (a shared file
system, as dask-jobqueue assumes), and the models are those of this installation. Needs
``pip install 'tdask[examples]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from typing import Any

from tdask.hello_world import MODEL_REPOSITORY, PythonGroup, TritonGroup, hello_world_operators


def worker_operators(gpu: bool = False) -> list[dict[str, Any]]:
    """The three operators every worker job hosts, as ``--tdask-operator`` takes them."""
    kind = "GPU" if gpu else "CPU"
    configs = hello_world_operators(
        encoders=TritonGroup(workers=1, max_inflight=4, instances=1, kind=kind),
        decoders=TritonGroup(workers=1, max_inflight=4, instances=1, kind=kind),
        encoder_decoders=PythonGroup(workers=1, max_inflight=8),
        model_repository=MODEL_REPOSITORY,
    )
    return [{k: v for k, v in dataclasses.asdict(c).items() if v is not None} for c, _ in configs]


def cluster_options(*, queue: str | None = None, account: str | None = None, gpu: bool = False) -> dict[str, Any]:
    """``SLURMCluster`` keyword arguments: one worker process per job, preloading tdask."""
    return {
        "queue": queue,
        "account": account,
        "cores": 4,  # one Dask thread per core; Triton's own threads share them
        "memory": "16GB",
        "processes": 1,
        "walltime": "01:00:00",
        "job_name": "tdask-hello-world",
        "job_extra_directives": ["--gres=gpu:1"] if gpu else [],
        # The job script is a shell script: the JSON must reach dask worker as one argument.
        "worker_extra_args": [
            "--preload",
            "tdask.worker",
            "--tdask-operator",
            shlex.quote(json.dumps(worker_operators(gpu))),
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the job script instead of submitting jobs")
    parser.add_argument("--gpu", action="store_true", help="one GPU per job (--gres=gpu:1), KIND_GPU model instances")
    parser.add_argument("--queue", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--scheduler-host", default=None, help="the interface's address the jobs reach this node on")
    args = parser.parse_args()

    from dask_jobqueue import SLURMCluster

    scheduler_options = {"host": args.scheduler_host} if args.scheduler_host else {}
    if args.scheduler_host:
        scheduler_options["dashboard_address"] = f"{args.scheduler_host}:0"
    options = cluster_options(queue=args.queue, account=args.account, gpu=args.gpu)
    with SLURMCluster(**options, scheduler_options=scheduler_options) as cluster:
        if args.print:
            print(cluster.job_script())
            return
        import numpy as np
        from distributed import Client

        from tdask import RemoteOperator

        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            pipeline = RemoteOperator("encoder_decoder", client=client)
            rng = np.random.default_rng(0)
            correct = 0
            for _ in range(args.requests):
                data = rng.integers(-(2**62), 2**62, 1000, dtype=np.int64)
                # The first calls wait (tdask.request.unavailable-timeout) while the jobs queue and start.
                output = pipeline.infer(inputs={"input": data}, timeout=600).outputs["output"]
                correct += int(np.array_equal(output, data))
            print(f"Correct: {correct}/{args.requests}")


if __name__ == "__main__":
    main()
