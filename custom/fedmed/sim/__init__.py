"""In-process federation for benchmarks and the red team, and the attacks it plays (the same site round hospitals run)."""
