"""Benchmarks of each paper's components (registered on import by gradkit.harness.bench)."""
