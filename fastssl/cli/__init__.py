"""Command-line entry points (fastssl-prepare, -train, -eval, -bench, -report)."""
