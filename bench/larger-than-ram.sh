#!/usr/bin/env bash
# Decode a model larger than RAM under a memory cgroup, strata streaming vs a plain mmap run.
#
#   bench/larger-than-ram.sh MODEL.gguf [LIMIT_GIB] [TOKENS]
#
# Needs root (cgroup v1 `memory.limit_in_bytes` or v2 `memory.max`; page cache is charged to
# the group) and drops the page cache before each run. Runs, in one go:
#   1. strata streaming (O_DIRECT io_uring; the budget follows the cgroup's limit),
#   2. strata --mmap (the page cache decides, as llama.cpp does),
#   3. llama.cpp's llama-cli on the same file when LLAMA_CLI points at one (built elsewhere).
# Each prints its own timing lines; strata adds bytes read, read GB/s and peak RSS.
set -euo pipefail
model=${1:?usage: $0 MODEL.gguf [LIMIT_GIB] [TOKENS]}
limit_gib=${2:-8}
tokens=${3:-4}
strata=${STRATA:-$(dirname "$0")/../target/release/strata}
prompt="The history of the city begins"

if [[ -d /sys/fs/cgroup/memory ]]; then
  cg=/sys/fs/cgroup/memory/strata-ltr
  mkdir -p "$cg"
  echo $((limit_gib << 30)) >"$cg/memory.limit_in_bytes"
else
  cg=/sys/fs/cgroup/strata-ltr
  mkdir -p "$cg"
  echo $((limit_gib << 30)) >"$cg/memory.max"
fi
trap 'rmdir "$cg" 2>/dev/null || true' EXIT

in_cgroup() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  bash -c 'echo $$ >"$0/cgroup.procs"; exec "$@"' "$cg" "$@"
}

echo "== $(basename "$model"): $(($(stat -c %s "$model") >> 20)) MiB, cgroup limit ${limit_gib} GiB, $tokens tokens"
echo "== strata, streaming"
in_cgroup /usr/bin/time -f "wall %e s, max RSS %M KB" \
  "$strata" run -m "$model" -p "$prompt" -n "$tokens" --temp 0 -c 256 --verbose 2>&1 | grep -E "strata_perf|wall|error"
echo "== strata --mmap"
in_cgroup /usr/bin/time -f "wall %e s, max RSS %M KB" \
  "$strata" run -m "$model" -p "$prompt" -n "$tokens" --temp 0 -c 256 --mmap --verbose 2>&1 | grep -E "strata_perf|wall|error"
if [[ -n "${LLAMA_CLI:-}" ]]; then
  echo "== llama.cpp (mmap)"
  in_cgroup /usr/bin/time -f "wall %e s, max RSS %M KB" \
    "$LLAMA_CLI" -m "$model" -p "$prompt" -n "$tokens" --temp 0 -c 256 -no-cnv 2>&1 |
    grep -E "eval time|load time|wall|error" || true
fi
