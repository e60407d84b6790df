# Sourced by launch/slurm/tinkerd.sbatch and tinkerd-hetjob.sbatch (not run on its own): the parameters both take,
# and tinkerd_exec, which writes the hostfile for the worker nodes and execs the launcher on this node (the batch
# host, where the controller and the API run).
#
# Environment variables (all optional):
#   TINKERD_SLOTS_PER_NODE    trainer ranks per worker node, e.g. its GPUs (default 1)
#   TINKERD_ENGINES_PER_NODE  sampling engines per worker node (default 1)
#   TINKERD_STATE_DIR         state dir, the same path on every node (default: $TINKERD_WORKDIR/tinkerd-state)
#   TINKERD_WORKDIR           this repository's checkout, the same path on every node (default: the submit dir;
#                             the sbatch script sets it, as it sources this file from there)
#   TINKERD_PYTHON            the interpreter with tinkerd installed, on every node (default: python3)
#   TINKERD_PORT              the API's port on the batch host (default 8000)
#   TINKERD_ADVERTISE_ADDR    the batch host's address the others reach (default: what its name resolves to)
#   TINKERD_IFNAME            network interface for gloo/NCCL (sets GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)
#   TINKERD_ARGS              more launch/cluster.py flags (--model, --device, --api-keys-file, ...)

: "${TINKERD_PYTHON:=python3}"
: "${TINKERD_STATE_DIR:=$TINKERD_WORKDIR/tinkerd-state}"
: "${TINKERD_SLOTS_PER_NODE:=1}"
: "${TINKERD_ENGINES_PER_NODE:=1}"
: "${TINKERD_PORT:=8000}"

# tinkerd_exec NODELIST [LAUNCHER FLAG...]: trainer ranks and engines on the nodes of NODELIST (SLURM's compressed
# form, e.g. gpu[1-4]), the controller and the API here; the flags go to launch/cluster.py before TINKERD_ARGS.
tinkerd_exec() {
    local nodelist=$1 nodes here addr hostfile node
    shift
    nodes=$(scontrol show hostnames "$nodelist")
    here=${SLURMD_NODENAME:-$(hostname)}
    # an address of this node that is not loopback (Debian maps its own name to 127.0.1.1)
    addr=${TINKERD_ADVERTISE_ADDR:-$(getent ahostsv4 "$here" | awk '$1 !~ /^127\./ {print $1; exit}')}
    [ -n "$addr" ] || addr=$(hostname -I | awk '{print $1}')

    hostfile="$TINKERD_STATE_DIR/run/hostfile.$SLURM_JOB_ID"
    mkdir -p "$(dirname "$hostfile")"
    for node in $nodes; do
        echo "$node slots=$TINKERD_SLOTS_PER_NODE engines=$TINKERD_ENGINES_PER_NODE"
    done > "$hostfile"
    echo "tinkerd: job $SLURM_JOB_ID: trainer ranks and engines on $(tr '\n' ' ' <<<"$nodes"); controller and" \
         "API on $here ($addr), API port $TINKERD_PORT; hostfile $hostfile; logs in $TINKERD_STATE_DIR/logs"

    cd "$TINKERD_WORKDIR"
    # exec: scancel's SIGTERM reaches the launcher itself, which stops every step before SLURM kills what is left
    # shellcheck disable=SC2086  # TINKERD_ARGS is a list of flags
    exec "$TINKERD_PYTHON" -m launch.cluster --hostfile "$hostfile" --spawner srun \
        --advertise-addr "$addr" --host "$addr" --port "$TINKERD_PORT" --state-dir "$TINKERD_STATE_DIR" \
        --remote-python "$TINKERD_PYTHON" --remote-workdir "$TINKERD_WORKDIR" \
        ${TINKERD_IFNAME:+--gloo-ifname "$TINKERD_IFNAME"} "$@" ${TINKERD_ARGS:-}
}
