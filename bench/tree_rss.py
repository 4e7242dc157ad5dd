"""Peak of the SUM of resident memory over a command's whole process tree.

`/usr/bin/time -v` reports ru_maxrss, the largest single process; a command that moves
work into child processes (verify's torch side) can look smaller that way than it is.
This samples every process of the tree (/proc/<pid>/task/*/children, recursively) every
`--interval` seconds, adds their VmRSS and keeps the largest sum, and the largest RSS each
process reached. Shared pages count once per process that maps them, so the sum is an
upper bound of what the tree held at once (never an undercount).

    python -m exportline.bench.tree_rss [--interval 0.02] [--json out.json] -- CMD ARGS...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def tree(pid: int) -> list[int]:
    """`pid` and every descendant alive now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo += [int(c) for c in task.read_text().split()]
            except OSError:  # the thread or process ended meanwhile
                pass
    return out


def rss_kib(pid: int) -> tuple[int, str]:
    """(VmRSS in KiB, command name); (0, "") once the process is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return 0, ""
    return int(fields.get("VmRSS", "0 kB").split()[0]), fields.get("Name", "").strip()


def sample(command: list[str], interval: float = 0.02) -> dict:
    """Run `command`; the peak tree sum, each process's peak, ru_maxrss, wall, exit status."""
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak_sum, peak_at, per_process = 0, 0.0, {}
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)  # this command's own rusage, not all children's
        if done:
            proc.returncode = os.waitstatus_to_exitcode(status)
            break
        total = 0
        for pid in tree(proc.pid):
            kib, name = rss_kib(pid)
            total += kib
            if kib > per_process.get(pid, (0, ""))[0]:
                per_process[pid] = (kib, name)
        if total > peak_sum:
            peak_sum, peak_at = total, time.perf_counter() - start
        time.sleep(interval)
    wall = time.perf_counter() - start
    return {
        "command": command, "exit": proc.returncode, "wall_s": round(wall, 2),
        "peak_tree_rss_gib": round(peak_sum / 2**20, 3), "peak_at_s": round(peak_at, 2),
        # the largest single process (what time -v says); started from a large process, at least that one's peak
        "ru_maxrss_gib": round(usage.ru_maxrss / 2**20, 3),
        "processes": [{"pid": pid, "name": name, "peak_rss_gib": round(kib / 2**20, 3)}
                      for pid, (kib, name) in sorted(per_process.items())],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between samples")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    result = sample(command, args.interval)
    text = json.dumps(result, indent=1)
    print(text, file=sys.stderr)
    if args.json:
        args.json.write_text(text + "\n")
    return result["exit"]


if __name__ == "__main__":
    sys.exit(main())
