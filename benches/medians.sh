#!/usr/bin/env bash
# Prints criterion's medians (not the `time:` slope estimate) for every
# benchmark, from target/criterion/<group>/<bench>/<baseline>/estimates.json,
# with each call case's ratio to `direct` and to `atomic_ptr_calling_crate`
# (an `AtomicPtr` call written in the calling crate) of the same group and run.
# Usage: benches/medians.sh [baseline]   (default: new, the last run)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 - "${1:-new}" <<'PY'
import json, pathlib, sys
base = sys.argv[1]
root = pathlib.Path("target/criterion")
rows = {}
for est in sorted(root.glob(f"**/{base}/estimates.json")):
    bench = est.parent.parent.relative_to(root)
    group = bench.parts[0]
    rows.setdefault(group, []).append(("/".join(bench.parts[1:]), json.load(open(est))["median"]["point_estimate"]))
def fmt(ns):
    for unit, f in (("ms", 1e6), ("µs", 1e3)):
        if ns >= f: return f"{ns / f:9.3f} {unit}"
    return f"{ns:9.3f} ns"
for group, items in rows.items():
    print(group)
    d = dict(items)
    direct, local = d.get("direct"), d.get("atomic_ptr_calling_crate")
    for name, ns in items:
        ratio = f"  {ns / direct:7.2f}x direct" if direct else ""
        if local:
            ratio += f"  {ns / local:7.3f}x atomic_ptr_calling_crate"
        print(f"  {name:<40} {fmt(ns)}{ratio}")
PY
