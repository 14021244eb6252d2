#!/usr/bin/env bash
# The one command for the day a GPU is lent: on a machine with an NVIDIA GPU and its driver,
# builds, runs every kernel test on the real device (and again on the simulator), then the
# kernel benchmark, printing one table. Meant to finish within 10 minutes.
#   kernels/tools/gpu-check.sh            # all of it
#   STRATA_GPU_CHECK_QUICK=1 ...          # smaller benchmark shapes
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

log "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null ||
  echo "nvidia-smi not found (the tests below still probe libcuda.so.1 themselves)"
lscpu | grep -E "Model name|^CPU\(s\)" || true

log "build"
cargo build --release -p strata-kernels --tests --examples

log "kernel tests on the GPU and the simulator (STRATA_TEST_CUDA=1)"
STRATA_TEST_CUDA=1 timeout 360 cargo test --release -p strata-kernels -- --test-threads=4

log "kernel benchmark"
quick=()
[[ "${STRATA_GPU_CHECK_QUICK:-0}" == 1 ]] && quick=(--quick)
timeout 180 cargo run --release -p strata-kernels --example kbench -- --device cuda "${quick[@]}"
log "done"
