#!/usr/bin/env bash
# Disassembles the call sites of benches/call.rs, without and with fat LTO:
#   site_*  one call outside any loop (what a call in a service compiles to)
#   loop_*  the measured loops (the GOT load, if any, is hoisted out)
# Usage: benches/disasm.sh [function...]   (from anywhere; builds what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."
fns=("$@")
[ ${#fns[@]} -gt 0 ] || fns=(site_direct site_unpatched site_patched site_atomic_ptr site_atomic_ptr_calling_crate loop_direct loop_unpatched loop_patched loop_atomic_ptr loop_atomic_ptr_calling_crate)
for profile in bench bench-lto; do
  exe=$(cargo bench --profile "$profile" --bench call --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p')
  echo "=== profile $profile: $exe"
  dump=$(objdump -d --no-show-raw-insn -C "$exe")
  for f in "${fns[@]}"; do
    awk -v f="<call::$f>:" '$2 == f {p=1} p && /^$/ {p=0; print ""} p' <<<"$dump" | grep -v 'int3$'
  done
done
