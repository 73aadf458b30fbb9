"""A client of an OpenAI-compatible Batch API: upload a JSONL of requests (``POST /files``), make a
batch of it (``POST /batches``), read it (``GET /batches/{id}``), find it again by the name in its
metadata (``GET /batches``) and download its output (``GET /files/{id}/content``).

A batch is named in its metadata (``agent_batch``) so that a worker that died between the
provider's answer and the ledger's journal finds the batch it made instead of making a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
NAME_FIELD = "agent_batch"
_LIST_PAGES = 20  # how far back (in pages of 100) a lost submission is looked for


class BatchAPIError(Exception):
    """The Batch API answered with an error or something that is not a batch."""


@dataclass(frozen=True, slots=True)
class RemoteBatch:
    id: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    name: str

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


def request_line(custom_id: str, url: str, body: dict[str, Any]) -> str:
    """One line of a batch's input file."""
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}, separators=(",", ":"))


def read_output(text: str) -> dict[str, dict[str, Any]]:
    """A batch's output (or error) file by custom id: ``{"status": int, "body": {...}}`` or
    ``{"status": 0, "error": ...}``. A line that cannot be read is left out (its call goes online)."""
    out: dict[str, dict[str, Any]] = {}
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            continue
        response = line.get("response")
        if isinstance(response, dict) and isinstance(response.get("body"), dict):
            out[line["custom_id"]] = {"status": int(response.get("status_code") or 0), "body": response["body"]}
        else:
            out[line["custom_id"]] = {"status": 0, "error": line.get("error")}
    return out


def _batch(data: Any) -> RemoteBatch:
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        raise BatchAPIError(f"not a batch: {str(data)[:200]}")
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return RemoteBatch(data["id"], str(data.get("status", "")), data.get("output_file_id"),
                       data.get("error_file_id"), str((metadata or {}).get(NAME_FIELD, "")))


class BatchAPI:
    """One endpoint's Batch API (``base_url`` as the chat client's: ``.../v1``)."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float = 60.0) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._client().request(method, f"{self._base}{path}", **kwargs) as response:
            body = await response.read()
            if response.status >= 300:
                raise BatchAPIError(f"{method} {path}: {response.status} {body[:300]!r}")
            return json.loads(body)

    async def upload(self, name: str, lines: list[str]) -> str:
        """Upload a batch input file; its id."""
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", ("\n".join(lines) + "\n").encode(), filename=f"{name}.jsonl",
                       content_type="application/jsonl")
        data = await self._json("POST", "/files", data=form)
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise BatchAPIError(f"not a file: {str(data)[:200]}")
        return str(data["id"])

    async def create(self, file_id: str, endpoint: str, name: str, window: str = "24h") -> RemoteBatch:
        return _batch(await self._json("POST", "/batches", json={
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": window,
            "metadata": {NAME_FIELD: name}}))

    async def get(self, batch_id: str) -> RemoteBatch:
        return _batch(await self._json("GET", f"/batches/{batch_id}"))

    async def find(self, name: str) -> RemoteBatch | None:
        """The batch made with ``name``, newest first, within the last pages; None when none is."""
        after: str | None = None
        for _ in range(_LIST_PAGES):
            params = {"limit": "100", **({"after": after} if after else {})}
            page = await self._json("GET", "/batches", params=params)
            items = page.get("data") if isinstance(page, dict) else None
            if not isinstance(items, list) or not items:
                return None
            for item in items:
                batch = _batch(item)
                if batch.name == name:
                    return batch
            if not page.get("has_more"):
                return None
            after = str(items[-1].get("id"))
        return None

    async def content(self, file_id: str) -> str:
        async with self._client().get(f"{self._base}/files/{file_id}/content") as response:
            body = await response.read()
            if response.status >= 300:
                raise BatchAPIError(f"GET /files/{file_id}/content: {response.status} {body[:300]!r}")
            return body.decode()
