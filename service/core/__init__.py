"""What every layer may use: the error tree, settings, metrics and tracing.

Imports nothing else of ``service``.
"""
