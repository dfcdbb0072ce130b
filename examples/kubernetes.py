"""The hello world on Kubernetes: a dask-kubernetes ``KubeCluster`` whose workers preload tdask.

    python examples/kubernetes.py --print [--gpu]        # the manifests, for kubectl apply -f -
    python examples/kubernetes.py [--gpu] [--requests N]  # start it, run requests, tear it down

The ``DaskCluster`` runs the scheduler and the ``encoder_decoder`` workers; the encoder and the
decoder are ``DaskWorkerGroup``s of their own, so each scales on its own (``cluster.scale(n,
worker_group="encoder")``). Every worker is ``dask worker --preload tdask.worker --tdask-operator
...`` (``dask cuda worker`` with ``--gpu``, one GPU per pod and ``KIND_GPU`` model instances),
from the images of ``container/``, which hold the hello world's models in ``/models``. Needs
``pip install 'tdask[examples]'`` here and the Dask Kubernetes operator in the cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from tdask.hello_world import PythonGroup, TritonGroup, hello_world_operators
from tdask.operator import OperatorConfig

MODELS = "/models"  # where the images of container/ put the hello world's models
WIRE_PORT = 8790  # one worker per pod: a fixed wire port, so that a NetworkPolicy can open it
#: The worker's HTTP server in dask-kubernetes' pods (its --dashboard-address 8788, port name).
WORKER_HTTP_PORT = "http-dashboard"


def worker_probes() -> dict[str, Any]:
    """A worker pod's probes, on the worker's own HTTP server.

    Readiness is tdask's ``/tdask/ready``: 200 only once every operator of the worker serves
    (503 while Triton loads, when a setup failed, while it drains), so a Service or a rollout
    waits for it. Liveness is Dask's ``/health``: the worker's event loop answers (a worker whose
    operator failed stays alive, not ready, its reason in ``/tdask/ready`` and ``tdask status``).
    """
    return {
        "readinessProbe": {
            "httpGet": {"path": "/tdask/ready", "port": WORKER_HTTP_PORT},
            "initialDelaySeconds": 5,
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": WORKER_HTTP_PORT},
            "initialDelaySeconds": 60,
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
    }


def worker_spec(config: OperatorConfig, *, image: str, replicas: int, gpu: bool) -> dict[str, Any]:
    """A worker pod spec hosting ``config`` (the ``worker`` of a DaskCluster or a DaskWorkerGroup)."""
    from dask_kubernetes.operator import make_worker_spec

    # The scheduler's address comes first: unknown to dask worker, --tdask-operator would otherwise
    # be taken for it. The Dask operator sets DASK_SCHEDULER_ADDRESS; Kubernetes expands $(...).
    command = ["dask", "cuda", "worker"] if gpu else ["dask", "worker"]
    command += ["$(DASK_SCHEDULER_ADDRESS)", "--nthreads", "1"]
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    command += ["--preload", "tdask.worker", "--tdask-operator", json.dumps(fields)]
    spec = make_worker_spec(
        image=image,
        n_workers=replicas,
        worker_command=command,  # a list: the JSON stays one argument
        env={"DASK_TDASK__WORKER__WIRE_PORT": str(WIRE_PORT)},
        resources={"limits": {"nvidia.com/gpu": 1}} if gpu else None,
    )
    container = _without_nulls(spec["spec"]["containers"][0])
    container["ports"].append({"name": "tdask-wire", "containerPort": WIRE_PORT, "protocol": "TCP"})
    container.update(worker_probes())
    return spec


def _without_nulls(container: dict[str, Any]) -> dict[str, Any]:
    for key in [key for key, value in container.items() if value is None]:
        del container[key]
    return container


def hello_world_specs(name: str, image: str, gpu: bool = False) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The ``DaskCluster`` resource and the worker spec of each worker group, by group name."""
    from dask_kubernetes.operator import make_cluster_spec

    kind = "GPU" if gpu else "CPU"
    encoder, decoder, encoder_decoder = (
        config
        for config, _ in hello_world_operators(
            encoders=TritonGroup(workers=1, max_inflight=4, instances=1, kind=kind),
            decoders=TritonGroup(workers=1, max_inflight=4, instances=1, kind=kind),
            encoder_decoders=PythonGroup(workers=1, max_inflight=8),
            model_repository=MODELS,
        )
    )
    cluster = make_cluster_spec(name=name, image=image)
    cluster["spec"]["worker"] = worker_spec(encoder_decoder, image=image, replicas=1, gpu=False)
    scheduler = _without_nulls(cluster["spec"]["scheduler"]["spec"]["containers"][0])
    scheduler["args"] = ["dask", "scheduler", "--host", "0.0.0.0"]  # the scheduler runs tdask's broker too
    groups = {
        "encoder": worker_spec(encoder, image=image, replicas=1, gpu=gpu),
        "decoder": worker_spec(decoder, image=image, replicas=1, gpu=gpu),
    }
    return cluster, groups


def manifests(name: str, image: str, gpu: bool = False) -> list[dict[str, Any]]:
    """Everything ``kubectl apply -f -`` needs: the DaskCluster, then one DaskWorkerGroup per group."""
    cluster, groups = hello_world_specs(name, image, gpu)
    return [cluster] + [
        {
            "apiVersion": "kubernetes.dask.org/v1",
            "kind": "DaskWorkerGroup",
            "metadata": {"name": f"{name}-{group}"},
            "spec": {"cluster": name, "worker": spec},
        }
        for group, spec in groups.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the manifests instead of creating them")
    parser.add_argument("--gpu", action="store_true", help="KIND_GPU instances on dask cuda workers")
    parser.add_argument("--name", default="tdask-hello-world")
    parser.add_argument("--image", default=None, help="default: tdask:cpu, or tdask:gpu with --gpu (container/)")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    image = args.image or ("tdask:gpu" if args.gpu else "tdask:cpu")
    if args.print:
        import yaml

        print(yaml.safe_dump_all(manifests(args.name, image, args.gpu), sort_keys=False))
        return

    import numpy as np
    from dask_kubernetes.operator import KubeCluster
    from distributed import Client

    from tdask import RemoteOperator

    cluster_spec, groups = hello_world_specs(args.name, image, args.gpu)
    with KubeCluster(custom_cluster_spec=cluster_spec) as cluster:
        for group, spec in groups.items():
            cluster.add_worker_group(group, custom_spec=spec)
        with Client(cluster) as client:
            pipeline = RemoteOperator("encoder_decoder", client=client)
            rng = np.random.default_rng(0)
            correct = 0
            for _ in range(args.requests):
                data = rng.integers(-(2**62), 2**62, 1000, dtype=np.int64)
                # The first calls wait (tdask.request.unavailable-timeout) while pods pull and start.
                output = pipeline.infer(inputs={"input": data}, timeout=600).outputs["output"]
                correct += int(np.array_equal(output, data))
            print(f"Correct: {correct}/{args.requests}")


if __name__ == "__main__":
    main()
