"""Benchmarks: scripts run as `python -m bench.<name>`; results are assembled into bench/RESULTS.md."""
