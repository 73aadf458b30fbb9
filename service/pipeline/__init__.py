"""One record from decode to a durable outcome: claim, the agent's steps, result or dead letter;
and reading and replaying the dead-letter topic.

Imports ``service.agents``, ``service.llm``, ``service.core``, ``consumers`` and ``dedup``.
"""
