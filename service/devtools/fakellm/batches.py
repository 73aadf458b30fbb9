"""The fake model's Batch API: ``POST /v1/files`` (a multipart JSONL upload), ``POST /v1/batches``,
``GET /v1/batches`` (by creation, newest first), ``GET /v1/batches/{id}``, ``POST
/v1/batches/{id}/cancel`` and ``GET /v1/files/{id}/content``.

Each request line is answered by the chat server's own answer (the same content a chat call gets,
and the same prompt cache: a line whose prompt starts as one seen before reports cached tokens in its
usage, as a provider's batch does), once the batch's delay has passed and a client reads it. Faults, for the batches made from now on
(``POST /_batch_faults`` or :meth:`FakeBatches.set_faults`): ``mode`` ``fail`` | ``expire`` |
``cancel`` (the batch ends so, without output), ``delay_s`` (it completes that long after it was
made: a slow batch), ``invalid`` (that many of its lines, the first ones, answer content that is not
valid for the schema), ``upload_delay_s`` (each upload is answered that long after it arrived: a large
file on a slow link). :meth:`FakeBatches.stats` counts the uploads, the batches made, by name, and the
lines answered, by custom id: a test checks that each batch was submitted once and each call answered
once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from service.devtools.fakellm.http import Receive, Scope, Send, dumps, error_body, header, read_body, respond

# a chat request body -> the completion's body (JSON bytes); the second: its answer invalid for the schema
Answer = Callable[[bytes, bool], bytes]
PATHS = ("/v1/files", "/v1/batches", "/files", "/batches")
MODES = (None, "fail", "expire", "cancel")


def _form_file(content_type: str, body: bytes) -> tuple[str, bytes] | None:
    """The (filename, bytes) of a multipart upload's ``file`` part."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        return None
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            payload = part.get_payload(decode=True)
            return str(part.get_filename() or "input.jsonl"), payload if isinstance(payload, bytes) else b""
    return None


class FakeBatches:
    """The Batch API's state: files, batches, faults and counts (thread-safe)."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._files: dict[str, tuple[str, bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, Any] = {"mode": None, "delay_s": 0.0, "invalid": 0, "upload_delay_s": 0.0}
        self._uploads = 0
        self._created: Counter[str] = Counter()  # batches made, by the name in their metadata
        self._answered: Counter[str] = Counter()  # lines answered, by custom id

    def set_faults(self, mode: str | None = None, delay_s: float = 0.0, invalid: int = 0,
                   upload_delay_s: float = 0.0) -> None:
        if mode not in MODES or delay_s < 0 or invalid < 0 or upload_delay_s < 0:
            raise ValueError(f"batch faults: mode one of {MODES}, delay_s, invalid and upload_delay_s not negative")
        with self._lock:
            self._faults = {"mode": mode, "delay_s": float(delay_s), "invalid": int(invalid),
                            "upload_delay_s": float(upload_delay_s)}

    def reset(self) -> None:
        with self._lock:
            self._files.clear()
            self._batches.clear()
            self._created.clear()
            self._answered.clear()
            self._uploads = 0
            self._faults = {"mode": None, "delay_s": 0.0, "invalid": 0, "upload_delay_s": 0.0}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"uploads": self._uploads, "batches": len(self._batches), "created_by_name": dict(self._created),
                    "answered_by_id": dict(self._answered),
                    "statuses": dict(Counter(b["status"] for b in self._batches.values()))}

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope["path"]).removeprefix("/v1")
        method = str(scope["method"])
        body = await read_body(receive, send)
        if body is None:
            return
        parts = path.strip("/").split("/")
        if parts == ["files"] and method == "POST" and self._faults["upload_delay_s"]:
            await asyncio.sleep(self._faults["upload_delay_s"])
        try:
            status, payload = self._route(method, parts, body, header(scope, b"content-type") or "", scope)
        except (ValueError, KeyError, TypeError) as exc:
            await respond(send, 400, error_body(400, f"{method} {path}: {exc}"))
            return
        if isinstance(payload, bytes):
            await respond(send, status, payload)
        else:
            await respond(send, status, dumps(payload))

    def _route(self, method: str, parts: list[str], body: bytes, content_type: str,
               scope: Scope) -> tuple[int, Any]:
        if parts == ["files"] and method == "POST":
            return self._upload(content_type, body)
        if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and method == "GET":
            with self._lock:
                found = self._files.get(parts[1])
            return (200, found[1]) if found is not None else (404, error_body(404, f"no file {parts[1]}"))
        if parts == ["batches"] and method == "POST":
            return self._create(json.loads(body))
        if parts == ["batches"] and method == "GET":
            return 200, self._list(scope)
        if len(parts) == 2 and parts[0] == "batches" and method == "GET":
            return self._read(parts[1])
        if len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel" and method == "POST":
            with self._lock:
                batch = self._batches.get(parts[1])
                if batch is not None and batch["status"] not in ("completed", "failed", "expired"):
                    batch["status"] = "cancelled"
            return self._read(parts[1])
        return 404, error_body(404, f"no route for {method} /{'/'.join(parts)}")

    def _upload(self, content_type: str, body: bytes) -> tuple[int, Any]:
        found = _form_file(content_type, body)
        if found is None:
            raise ValueError("a multipart form with a file part is expected")
        file_id = self._new_id("file")
        with self._lock:
            self._files[file_id] = found
            self._uploads += 1
        return 200, {"id": file_id, "object": "file", "bytes": len(found[1]), "filename": found[0],
                     "purpose": "batch"}

    def _create(self, data: dict[str, Any]) -> tuple[int, Any]:
        file_id = str(data["input_file_id"])
        with self._lock:
            if file_id not in self._files:
                return 404, error_body(404, f"no file {file_id}")
            batch_id = self._new_id("batch")
            metadata = data.get("metadata") or {}
            self._batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": data.get("endpoint"), "input_file_id": file_id,
                "completion_window": data.get("completion_window", "24h"), "status": "validating",
                "output_file_id": None, "error_file_id": None, "created_at": time.time(), "metadata": metadata,
                "_faults": dict(self._faults), "_order": len(self._batches),
            }
            self._created[str(metadata.get("agent_batch", ""))] += 1
            return 200, self._public(self._batches[batch_id])  # validating: it moves on when read

    def _list(self, scope: Scope) -> dict[str, Any]:
        query = dict(p.split("=", 1) for p in bytes(scope.get("query_string", b"")).decode().split("&") if "=" in p)
        limit = int(query.get("limit", "20"))
        with self._lock:
            ordered = sorted(self._batches.values(), key=lambda b: -b["_order"])
        if "after" in query:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(query["after"]) + 1:] if query["after"] in ids else []
        page = [self._public(b) for b in ordered[:limit]]
        return {"object": "list", "data": page, "has_more": len(ordered) > limit}

    def _read(self, batch_id: str) -> tuple[int, Any]:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            return 404, error_body(404, f"no batch {batch_id}")
        self._advance(batch)
        return 200, self._public(batch)

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, batch: dict[str, Any]) -> None:
        """Move the batch on: in progress until its delay passed, then ended as its faults say."""
        with self._lock:
            if batch["status"] in ("completed", "failed", "expired", "cancelled", "finalizing"):
                return
            faults = batch["_faults"]
            if time.time() - batch["created_at"] < faults["delay_s"]:
                batch["status"] = "in_progress"
                return
            if faults["mode"] is not None:
                batch["status"] = {"fail": "failed", "expire": "expired", "cancel": "cancelled"}[faults["mode"]]
                return
            batch["status"] = "finalizing"  # answered outside the lock
            lines = self._files[batch["input_file_id"]][1].decode().splitlines()
        out = []
        for i, raw in enumerate(line for line in lines if line.strip()):
            request = json.loads(raw)
            body = json.dumps(request["body"]).encode()
            answered = json.loads(self._answer(body, i < faults["invalid"]))
            out.append(json.dumps({"id": f"line-{i}", "custom_id": request["custom_id"],
                                   "response": {"status_code": 200, "body": answered}, "error": None}))
        file_id = self._new_id("file")
        with self._lock:
            self._files[file_id] = ("output.jsonl", ("\n".join(out) + "\n").encode())
            self._answered.update(json.loads(line)["custom_id"] for line in out)
            batch["output_file_id"] = file_id
            batch["status"] = "completed"
