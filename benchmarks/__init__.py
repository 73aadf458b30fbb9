"""Benchmarks of agent-service, run side by side on one machine: ``python -m benchmarks``."""
