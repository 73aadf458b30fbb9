"""The HTTP app: health, readiness, metrics and the admin API, on the :class:`~service.api.protocol.Served` protocol.

Imports the pipeline and below, never the runtime that serves it.
"""
