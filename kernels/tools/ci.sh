#!/usr/bin/env bash
# The kernels' CI stage: NVIDIA's own compilers, from the Python packages NVIDIA publishes
# (cached between runs), prove that every kernel compiles.
#   1. NVRTC regenerates the PTX of every kernels/cuda/*.cu; it must equal what is committed
#      (--regen writes it instead, for a developer who changed a kernel);
#   2. ptxas assembles it for sm_80, sm_86, sm_89 and sm_90 and prints each kernel's registers,
#      spills, shared memory and largest block; any spill or resource over a limit fails.
# Nothing here is needed to build or use strata: users need only the NVIDIA driver.
set -euo pipefail
cd "$(dirname "$0")/../.."

cache="${STRATA_CUDA_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/strata/cuda-12.9}"
root="$cache/root/nvidia"
if [[ ! -x "$root/cuda_nvcc/bin/ptxas" || ! -e "$root/cuda_nvrtc/lib/libnvrtc.so.12" || ! -e "$root/cuda_runtime/include/cuda_fp16.h" ]]; then
  echo "fetching NVRTC 12.9.86, the CUDA 12.9 headers and ptxas into $cache"
  mkdir -p "$cache/wheels" "$cache/root"
  python3 -m pip download --quiet --no-deps --dest "$cache/wheels" \
    nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86
  for w in "$cache"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cache/root"; done
  chmod +x "$root/cuda_nvcc/bin/ptxas"
fi

cargo build --release -p strata-kernels --bin strata-ptx
ptx=target/release/strata-ptx
mode=--check
[[ "${1:-}" == "--regen" ]] && mode=
LD_LIBRARY_PATH="$root/cuda_nvrtc/lib" "$ptx" gen --include "$root/cuda_runtime/include" $mode
"$ptx" ptxas --ptxas "$root/cuda_nvcc/bin/ptxas" --archs sm_80,sm_86,sm_89,sm_90
