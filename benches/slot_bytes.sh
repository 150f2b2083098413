#!/usr/bin/env bash
# Bytes a #[patchable] function adds to a binary.
#
# Method: gen-host-1 and gen-host-10000 (benches/gen) are the same program
# linked against a service of 1 and of 10,000 generated patchable functions
# (`fn fI(x: u64) -> u64 { x * C_I + I }`), release profile, no debug info.
# The difference of each allocated section's size, divided by 9,999, is what
# one patchable function costs there; `nm -S` then names the per-function
# symbols that make it up (for f5000).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --release --manifest-path benches/gen/Cargo.toml \
  --target-dir target/bench-gen -p gen-host-1 -p gen-host-10000
dir=target/bench-gen/release
small=$dir/gen-host-1
big=$dir/gen-host-10000
echo "file sizes: gen-host-1 $(stat -c %s $small) B, gen-host-10000 $(stat -c %s $big) B"
echo "per function: $(( ($(stat -c %s $big) - $(stat -c %s $small)) / 9999 )) B of file"
echo
echo "sections loaded at run time (size -A; not symbols, debug or comments), difference / 9999:"
sections() {
  size -A "$1" | awk 'NR>2 && NF==3 && $1 !~ /^(\.debug|\.comment|\.symtab|\.strtab|Total)/ {print $1, $2}' | sort
}
join <(sections $small) <(sections $big) |
  awk '{d=$3-$2; if (d != 0) {printf "  %-22s %10d -> %10d  %8.1f B/fn\n", $1, $2, $3, d/9999; t+=d}}
       END {printf "  %-22s %36.1f B/fn\n", "total", t/9999}'
echo
echo "symbols of one function (f5000), nm -S --size-sort (size in hex):"
nm -S --size-sort -C $big | grep -E '(\b|_)f5000\b' || true
