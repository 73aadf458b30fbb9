"""The composition root: builds every part from one :class:`~service.core.settings.Settings` and
runs the consumer and the HTTP app in one event loop.
"""
