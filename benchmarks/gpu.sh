#!/usr/bin/env bash
# The GPU subset of the benchmarks, one invocation (as run on a lent NVIDIA H200; benchmarks/README.md "GPU").
#
#   SCG_DATA_DIR=/path/holding/mnist  bash benchmarks/gpu.sh OUTDIR
#
# Sized for a 10-minute lease: each part runs under its own time limit (seconds below), so a slow
# part cannot take the others with it;
# each writes its JSON into OUTDIR and its log into OUTDIR/log.txt. On a machine without
# a GPU the same commands measure the CPU (the scripts take whatever jax.devices() gives).
set -uo pipefail
out=${1:?usage: benchmarks/gpu.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/log.txt"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import jax, numpyro, optax; print('jax', jax.__version__, 'numpyro', numpyro.__version__,
             'optax', optax.__version__, jax.devices())"
} 2>&1 | tee -a "$log"

part() {  # part NAME SECONDS COMMAND...: one benchmark under its time limit, its output appended to the log
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$log"
}

# Certigrad's AEVB step (784-1000-1000-30, batch 250): scg against hand-written JAX and NumPyro
part aevb 110 "$py" benchmarks/aevb_mnist.py --systems scg,jax,numpyro,numpyro_meanfield --rounds 2 \
  --warmup 5 --steps 40 --json "$out/aevb_mnist_gpu.json"
# step time against batch size and width, scg against hand-written JAX
part scaling 100 "$py" benchmarks/scaling.py --quick --json "$out/scaling_gpu.json"
# loops: first call and steady step of the Gaussian and Bernoulli chains, scg against NumPyro and JAX
part scan 200 "$py" benchmarks/scan_chain.py --only first_call steady --T-values 1000 10000 --rounds 1 \
  --steady-rounds 5 --out "$out/scan_chain_gpu.json"
