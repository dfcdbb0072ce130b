#!/usr/bin/env bash
# The hello world on a Dask cluster started by hand, as the README's recipe says: `dask scheduler`,
# one `dask worker --preload tdask.worker --tdask-operator ...` per operator, then the client.
# Everything it started is stopped when it ends, fails or is interrupted.
#
#   bash examples/hand_started_cluster.sh                     # on 127.0.0.1:8786, 10 requests
#   HOST=10.0.0.5 PORT=8786 bash examples/hand_started_cluster.sh --requests-per-client 1000
#
# Arguments go to the client (python -m tdask.hello_world.client --help). On several machines,
# run the scheduler line on one and each worker line on any, with --host set to that machine.
set -euo pipefail
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8786}
DASHBOARD_PORT=${DASHBOARD_PORT:-8787}
LOGS=${LOGS:-$(mktemp -d -t tdask-hand-started.XXXXXX)}
# The workers may still be starting Triton when the client starts: let it wait for them.
export DASK_TDASK__REQUEST__UNAVAILABLE_TIMEOUT=${DASK_TDASK__REQUEST__UNAVAILABLE_TIMEOUT:-120s}
trap 'kill $(jobs -p) 2>/dev/null || true; wait' EXIT
echo "logs: $LOGS"

dask scheduler --host $HOST --port $PORT --dashboard-address $HOST:$DASHBOARD_PORT >"$LOGS/scheduler.log" 2>&1 &
MODELS=$(python -c "import tdask.hello_world as h; print(h.MODEL_REPOSITORY)")
dask worker tcp://$HOST:$PORT --host $HOST --dashboard-address $HOST:0 --nthreads 1 --name encoder.0 --preload tdask.worker \
  --tdask-operator "{\"name\": \"encoder\", \"implementation\": \"triton\", \"repository\": \"$MODELS\"}" >"$LOGS/encoder.0.log" 2>&1 &
dask worker tcp://$HOST:$PORT --host $HOST --dashboard-address $HOST:0 --nthreads 1 --name decoder.0 --preload tdask.worker \
  --tdask-operator "{\"name\": \"decoder\", \"implementation\": \"triton\", \"repository\": \"$MODELS\"}" >"$LOGS/decoder.0.log" 2>&1 &
dask worker tcp://$HOST:$PORT --host $HOST --dashboard-address $HOST:0 --nthreads 1 --name encoder_decoder.0 --preload tdask.worker \
  --tdask-operator '{"name": "encoder_decoder", "implementation": "tdask.hello_world.operators:EncoderDecoder"}' >"$LOGS/encoder_decoder.0.log" 2>&1 &
python -m tdask.hello_world.client --scheduler-address tcp://$HOST:$PORT --wait-for encoder,decoder,encoder_decoder \
  --requests-per-client 10 "$@"
