"""The results topic's encoding: the events as the ledger stores them (canonical JSON), or encoded
by a Schema Registry's serializer (:class:`~service.core.result_events.ResultWriter`)."""

from __future__ import annotations

from typing import Protocol


class ResultEncoder(Protocol):
    async def ready(self) -> None:
        """Encoding may begin (the first call may ask the registry); raises when it cannot."""

    def __call__(self, event: bytes) -> bytes:
        """The event encoded; asks nothing of anyone once :meth:`ready` returned."""


class Encoding:
    """What the outputs encode every results-topic record with (None: the JSON as it is)."""

    encoder: ResultEncoder | None = None

    async def ready_to_encode(self) -> None:
        """Before anything is sent or staged whose results event must be encoded: an encoder that
        cannot begin (the registry down) raises here, with nothing written."""
        if self.encoder is not None:
            await self.encoder.ready()

    def encoded(self, event: bytes) -> bytes:
        return event if self.encoder is None else self.encoder(event)
