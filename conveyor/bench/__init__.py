"""Benchmark harness: `conveyor bench serve` (load a running server, measure, report) and `conveyor bench plan`."""
