"""bench/tree_rss.py: the peak of the summed RSS over a process tree, which ru_maxrss misses."""

from __future__ import annotations

import sys
import textwrap

from exportline.bench.tree_rss import sample


def test_the_tree_sum_sees_a_parent_and_child_holding_memory_at_once():
    # parent holds 150 MB, then starts a child that holds 200 MB: the tree held 350 MB at once,
    # while the largest single process (what /usr/bin/time -v reports) held 200 MB
    child = "import time; b = bytearray(200 << 20); time.sleep(1.0)"
    parent = textwrap.dedent(f"""
        import subprocess, sys
        held = bytearray(150 << 20)
        subprocess.run([sys.executable, "-c", {child!r}], check=True)
    """)
    result = sample([sys.executable, "-c", parent], interval=0.02)
    assert result["exit"] == 0
    assert result["peak_tree_rss_gib"] * 1024 >= 340
    peaks = sorted(p["peak_rss_gib"] * 1024 for p in result["processes"])
    assert len(peaks) == 2 and 145 <= peaks[0] < 195 and 195 <= peaks[1] < 300  # each process alone
    # ru_maxrss is a lower bound only: a child started from a large process (pytest, here)
    # inherits that process's high-water mark at exec
    assert result["ru_maxrss_gib"] * 1024 >= 195
