"""Summarise a py-spy ``--format raw`` profile: where the samples are, in percent.

    python tests/benchmarks/profile_summary.py PROFILE.txt [--top 25] [--thread MainThread]

Prints the functions with the most samples on top of the stack (self time) and the ones with the
most samples anywhere in the stack (inclusive time), as ``self_pct name`` / ``incl_pct name``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LOC = re.compile(r" \((?:[^()]*/)?([^/()]+):\d+\)$")


def frame_name(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (file.py)``."""
    return _LOC.sub(lambda m: f" ({m.group(1)})", frame.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("path")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", help="only stacks whose first frame mentions this text (py-spy --threads)")
    args = p.parse_args()
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(args.path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            if args.thread and args.thread not in frames[0]:
                continue
            n = int(count)
            total += n
            names = [frame_name(f) for f in frames if not f.startswith(("thread ", "process "))]
            if not names:
                continue
            own[names[-1]] += n
            for name in set(names):
                incl[name] += n
    if not total:
        raise SystemExit("no samples")
    print(f"samples: {total}")
    print("-- self time (top of stack)")
    for name, n in own.most_common(args.top):
        print(f"{100 * n / total:5.1f}% {name}")
    print("-- inclusive time (anywhere in the stack)")
    for name, n in incl.most_common(args.top):
        print(f"{100 * n / total:5.1f}% {name}")


if __name__ == "__main__":
    main()
