#!/usr/bin/env bash
# The one command for the day a GPU is lent: on a machine with an NVIDIA GPU and its driver,
# builds, runs every kernel test on the real device (and again on the simulator), the kernel
# benchmark, then strata end to end on the GPU against its own CPU backend (greedy text) and
# against its planner's predictions (and llama.cpp's llama-bench, when $LLAMA_BENCH names one
# built with CUDA): (a) all in VRAM, (b) VRAM at half the model, (c) attention on the CPU at
# a 16k context, (d) a MoE larger than the VRAM budget. Meant to finish within 10 minutes.
#   kernels/tools/gpu-check.sh            # all of it
#   STRATA_GPU_CHECK_QUICK=1 ...          # smaller benchmark shapes and runs
#   STRATA_GPU_CHECK_DEVICE=sim ...       # the end-to-end part on the simulated GPU (no
#                                         # driver needed; tiny generated models; a dry run)
#   LLAMA_BENCH=/path/to/llama-bench ...  # also llama.cpp on the same GPU and models
# Models: gemma3-270m and qwen2.5-coder-1.5b from the store when they are there (`strata
# pull` them first where there is a network), else generated ones of the same shapes.
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { printf '\n=== %s (%ss)\n' "$*" "$SECONDS"; }

log "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null ||
  echo "nvidia-smi not found (the tests below still probe libcuda.so.1 themselves)"
lscpu | grep -E "Model name|^CPU\(s\)" || true

dev=${STRATA_GPU_CHECK_DEVICE:-cuda}
quick=0
[[ "${STRATA_GPU_CHECK_QUICK:-0}" == 1 || $dev == sim ]] && quick=1

log "build"
cargo build --release -p strata-kernels --tests --examples
cargo build --release -p strata-cli

if [[ $dev == cuda ]]; then
  log "kernel tests on the GPU and the simulator (STRATA_TEST_CUDA=1)"
  STRATA_TEST_CUDA=1 timeout 360 cargo test --release -p strata-kernels -- --test-threads=4

  log "kernel benchmark"
  kq=()
  ((quick)) && kq=(--quick)
  timeout 180 cargo run --release -p strata-kernels --example kbench -- --device cuda "${kq[@]}"
fi

# --- end to end ---
S=target/release/strata
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=()
note() { summary+=("$*"); echo "$*"; }

# The models: the store's real ones where pulled; else generated ones (a byte vocabulary).
store=${STRATA_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/strata}/models
dense=()
if [[ $dev == sim ]]; then
  $S gen --arch gemma3 -o "$work/gemma3-tiny.gguf" >/dev/null
  dense=("$work/gemma3-tiny.gguf")
else
  for m in gemma3-270m qwen2.5-coder-1.5b; do
    [[ -f $store/$m.gguf ]] && dense+=("$store/$m.gguf")
  done
  if ((${#dense[@]} == 0)); then
    $S gen --arch qwen2 --preset big --layers 4 -o "$work/qwen2-gen.gguf" >/dev/null
    dense=("$work/qwen2-gen.gguf")
  fi
fi
moe=$work/moe.gguf
if [[ $dev == sim ]]; then
  $S gen --arch qwen3moe -o "$moe" >/dev/null
else
  $S gen --arch qwen3moe --preset big --layers 6 -o "$moe" >/dev/null
fi

# Greedy text on the GPU against the CPU backend's: equal up to the first near tie (the
# tests prove that on the simulator; here the real GPU's arithmetic is checked).
n_tok=48
((quick)) && n_tok=16
greedy() { # model, flags…
  local m=$1
  shift
  $S run -m "$m" -p "The capital of France is" -n $n_tok --temp 0 --no-display-prompt \
    --log-disable "$@" 2>/dev/null
}
compare() { # label, model, GPU flags…
  local label=$1 m=$2
  shift 2
  local cpu gpu i
  cpu=$(greedy "$m" --device cpu)
  gpu=$(greedy "$m" --device "$dev" "$@")
  if [[ $cpu == "$gpu" ]]; then
    note "greedy $label ($(basename "$m")): identical to the CPU's ${#cpu} bytes"
  else
    for ((i = 0; i < ${#cpu} && i < ${#gpu}; i++)); do [[ ${cpu:i:1} == "${gpu:i:1}" ]] || break; done
    note "greedy $label ($(basename "$m")): same as the CPU's for $i of ${#cpu} bytes (check for a near tie there)"
  fi
}
size_of() { stat -c %s "$1"; }

log "greedy text: GPU against CPU"
for m in "${dense[@]}"; do
  half=$(($(size_of "$m") / 2))
  compare "(a) all in VRAM" "$m"
  compare "(b) VRAM at half the model" "$m" --vram-budget "$half"
  compare "(c) attention on the CPU" "$m" -nkvo
done
compare "(d) MoE over a VRAM budget" "$moe" --vram-budget $(($(size_of "$moe") / 3))

# Speed: strata bench per case, the planner's prediction for the same placement (from a
# profile calibrated on this machine), and llama-bench when given.
reps=3
pp=512 tg=128 depth=16384
((quick)) && { reps=1 pp=64 tg=16 depth=512; }
hw=$work/hw.toml
$S calibrate --quick -m "${dense[0]}" -o "$hw" >/dev/null 2>&1 || hw=
tg_of() { # bench's markdown → the generation row's mean t/s
  awk -F'|' -v t="tg$1" '$7 ~ t {split($8, a, " "); print a[1]; exit}'
}
pred_of() { # plan's decode line → its t/s
  sed -n 's/^decode at depth [0-9]*: \([0-9.]*\) t\/s.*/\1/p' | head -1
}
case_run() { # label, model, depth, strata flags… (-- llama-bench flags…)
  local label=$1 m=$2 d=$3
  shift 3
  local sflags=() lflags=()
  while (($#)) && [[ $1 != -- ]]; do sflags+=("$1"); shift; done
  (($#)) && { shift; lflags=("$@"); }
  local got pred="" llama=""
  got=$($S bench -m "$m" -p "$pp" -n "$tg" -r $reps -d "$d" --device "$dev" "${sflags[@]}" | tee /dev/stderr | tg_of "$tg")
  if [[ -n $hw && $dev == cuda ]]; then
    pred=$($S plan -m "$m" --hw "$hw" -d "$d" "${sflags[@]}" 2>/dev/null | pred_of)
  fi
  if [[ -n ${LLAMA_BENCH:-} ]]; then
    llama=$("$LLAMA_BENCH" -m "$m" -p "$pp" -n "$tg" -r $reps -d "$d" "${lflags[@]}" 2>/dev/null |
      awk -F'|' -v t="tg$tg" '$0 ~ t {for (i = NF; i > 0; i--) if ($i ~ /±/) {split($i, a, " "); print a[1]; exit}}')
  fi
  note "$(printf '%-34s %-22s tg%s: strata %8s t/s | plan %8s | llama.cpp %8s' \
    "$label" "$(basename "$m")" "$tg" "${got:-?}" "${pred:--}" "${llama:--}")"
  if [[ -n $pred && -n $got ]]; then
    note "$(awk -v p="$pred" -v g="$got" 'BEGIN {printf "    plan / measured = %.2f (goal: within 0.75..1.25)", p / g}')"
  fi
  if [[ -n $llama && -n $got ]]; then
    note "$(awk -v l="$llama" -v g="$got" 'BEGIN {printf "    strata / llama.cpp = %.2f", g / l}')"
  fi
}

log "speed: strata bench, strata plan, llama-bench"
for m in "${dense[@]}"; do
  half=$(($(size_of "$m") / 2))
  n_layer=$($S show "$m" 2>/dev/null | sed -n 's/.*block_count[^0-9]*\([0-9]*\).*/\1/p' | head -1)
  case_run "(a) all in VRAM (goal >= 1.0x)" "$m" 0 -- -ngl 99
  # The same without CUDA graphs: what capturing the decode step saves.
  STRATA_GPU_GRAPHS=0 LLAMA_BENCH= case_run "(a) without CUDA graphs" "$m" 0
  case_run "(b) VRAM at half (goal >= 1.5x)" "$m" 0 --vram-budget "$half" -- -ngl $((${n_layer:-2} / 2))
  case_run "(c) CPU attention at d$depth" "$m" "$depth" -nkvo -- -ngl 99 -nkvo 1
done
case_run "(d) MoE over VRAM" "$moe" 0 --vram-budget $(($(size_of "$moe") / 3)) -- -ngl 99 --n-cpu-moe 3

log "summary ($dev)"
printf '%s\n' "${summary[@]}"
log "done"
