#!/usr/bin/env python3
"""Per-call cost of each function: callgrind_annotate of a run of N2 calls minus that of a run
of N1 calls, divided by N2 - N1 (bench/callgrind.sh). Start-up and shutdown cancel out, so
what is left is what one call costs, function by function.

Usage: callgrind_diff.py FILE_N1 N1 FILE_N2 N2 [--inclusive] [--top K]
"""

import re
import subprocess
import sys

LINE = re.compile(r"^\s*([0-9,]+)\s+(?:\([ 0-9.]+%\)\s+)?(.+?)\s*$")


def annotate(path, inclusive):
    """{function: Ir} from callgrind_annotate, every function (no threshold)."""
    args = ["callgrind_annotate", "--auto=no", "--threshold=100", f"--inclusive={'yes' if inclusive else 'no'}", path]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    costs = {}
    started = False
    for line in out.splitlines():
        if "file:function" in line:
            started = True
            continue
        if not started:
            continue
        m = LINE.match(line)
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = m.group(2)
        # The binary's path differs between runs only by nothing; keep the name as printed.
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def main():
    argv = sys.argv[1:]
    inclusive = "--inclusive" in argv
    top = 40
    if "--top" in argv:
        top = int(argv[argv.index("--top") + 1])
    f1, n1, f2, n2 = argv[0], int(argv[1]), argv[2], int(argv[3])
    a, b = annotate(f1, inclusive), annotate(f2, inclusive)
    per_call = {k: (b.get(k, 0) - a.get(k, 0)) / (n2 - n1) for k in set(a) | set(b)}
    rows = sorted(per_call.items(), key=lambda kv: -kv[1])[:top]
    kind = "inclusive" if inclusive else "exclusive"
    print(f"Ir per call ({kind}), ({n2} calls - {n1} calls) / {n2 - n1}")
    for name, ir in rows:
        # Long registry paths shortened to the crate's file.
        short = re.sub(r"/root/\.cargo/registry/src/[^/]+/", "", name)
        short = re.sub(r"/rustc/[0-9a-f]+/library/", "std:", short)
        short = re.sub(r" \[[^\]]+\]$", "", short)
        print(f"{ir:10.1f}  {short[:180]}")


if __name__ == "__main__":
    main()
