"""Developer tooling shipped with the package: the fake model server, embedded servers, Apache
Kafka run from its jars, and the demo.

May import anything; the service itself never imports it (the CLI does, lazily, for
``run --embedded`` and ``demo``).
"""
