"""bench: `exportline bench` — every backend of a bundle over prefill / decode / generate,
warmed up, repeated, summarized as median and p90/p99 with the environment recorded
(harness.py; DESIGN.md §7). Reports: reports/bench.{json,md,png}; compare.py is the
`--baseline --fail-over` regression gate."""
