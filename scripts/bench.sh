#!/usr/bin/env bash
# Micro-benchmarks of the protocol core and the IPC data path, each against its
# baseline measured in the same run. Run on a quiet machine: nothing else building or
# testing on the cores. Writes bench-out/micro.json and prints a table.
#   scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench-out
cargo bench -p vshp --bench record --quiet -- --noplot 2>&1 | tee bench-out/vshp-record.txt
cargo bench -p vshp --bench handshake_responder --quiet -- --noplot 2>&1 | tee bench-out/vshp-responder.txt
cargo bench -p ipc-schema --bench socketpair --quiet -- --bench 2>&1 | tee bench-out/ipc-socketpair.txt
python3 - <<'PY'
import json, os, platform, subprocess, datetime
root = "target/criterion"
def ns(group, bench, param=None):
    path = os.path.join(root, group, bench, *( [str(param)] if param is not None else [] ), "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"]
def plain_len(n):  # IP_PACKET message: 3-byte header + n * (2 + 1400)
    return 3 + n * (2 + 1400)
rows, out = [], {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "cpu": subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()}
for n in (1, 16):
    v, r = ns("data_record", "vshp", n), ns("data_record", "raw_ring", n)
    gv, gr = plain_len(n) * 8 / v, plain_len(n) * 8 / r   # bits per ns = Gbit/s
    out[f"seal_open_{n}x1400"] = {"vshp_gbit_s": round(gv, 3), "raw_aead_gbit_s": round(gr, 3), "overhead_vs_raw": round(v / r - 1, 4)}
    rows.append((f"seal+open, IP_PACKET of {n} x 1400 B", f"{gv:.2f} Gbit/s", f"raw AEAD {gr:.2f} Gbit/s", f"overhead {100*(v/r-1):+.1f} %"))
for p in ("xx", "ik"):
    t = ns("handshake", p)
    out[f"handshake_{p}_per_s"] = round(1e9 / t)
    rows.append((f"handshake {p.upper()} (both sides, one core)", f"{1e9/t:,.0f} /s", "", ""))
    t = ns("handshake_responder", p)
    out[f"handshake_{p}_responder_per_s"] = round(1e9 / t)
    rows.append((f"handshake {p.upper()} (responder only, one core)", f"{1e9/t:,.0f} /s", "", ""))
for line in open("bench-out/ipc-socketpair.txt"):
    if line.strip():
        rows.append(("ipc: " + line.strip(), "", "", ""))
with open("bench-out/micro.json", "w") as f:
    json.dump(out, f, indent=2)
print()
for r in rows:
    print("  ".join(x.ljust(w) for x, w in zip(r, (44, 16, 24, 16))).rstrip())
PY
