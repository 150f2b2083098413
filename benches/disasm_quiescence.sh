#!/usr/bin/env bash
# Disassembles what benches/quiescence.rs measures: the loops of
# benches/quiescence_cases (loop_empty, loop_quiescent, loop_call), the
# patchable wrapper bench_svc::patched and its transition dispatcher.
# Usage: benches/disasm_quiescence.sh [profile]   (default: bench; or bench-lto)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-bench}
exe=$(cargo bench --profile "$profile" --bench quiescence --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p')
echo "=== profile $profile: $exe"
dump=$(objdump -d --no-show-raw-insn -C "$exe")
for f in quiescence::quiescence_cases::loop_empty quiescence::quiescence_cases::loop_quiescent \
         quiescence::quiescence_cases::loop_call bench_svc::patched bench_svc::__hotpatch_dispatch_patched; do
  awk -v f="<$f>:" '$2 == f {p=1} p && /^$/ {p=0; print ""} p' <<<"$dump" | grep -v 'int3$'
done
