"""The ``agent-service`` command (``service.cli.main:main``; ``python -m service.cli``).

The top of the tree: it may import any package, and ``service.devtools`` only inside the
functions behind ``run --embedded`` and ``demo``.
"""
