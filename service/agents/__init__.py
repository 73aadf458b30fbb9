"""The agent model and the kinds: steps, agents, the registry, the built-in kinds and the task event.

Imports ``service.core`` and ``dedup.keys`` only.
"""
