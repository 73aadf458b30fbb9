"""The model client and its protection: one HTTP attempt per call, what a response means, the
circuit breaker, retry budget and rate limits shared through Redis.

Imports ``service.core`` and ``dedup`` only.
"""
