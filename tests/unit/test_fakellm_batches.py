"""The fake model's Batch API, read through the service's Batch API client: lines answered as chat
calls are, each batch counted by name, and its faults (failed, expired, slow, invalid lines, slow uploads)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from service.llm.batch_api import BatchAPI, RemoteBatch, read_output, request_line

SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}},
          "required": ["label"], "additionalProperties": False}


def body(text: str) -> dict[str, Any]:
    return {"model": "fake", "messages": [{"role": "user", "content": text}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}


async def submit(api: BatchAPI, name: str, n: int) -> RemoteBatch:
    lines = [request_line(f"{name}/t{i}", "/v1/chat/completions", body(f"task {i}")) for i in range(n)]
    file_id = await api.upload(name, lines)
    return await api.create(file_id, "/v1/chat/completions", name)


async def until_ended(api: BatchAPI, batch_id: str) -> RemoteBatch:
    deadline = time.monotonic() + 60
    while True:
        batch = await api.get(batch_id)
        if batch.ended:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} never ended: {batch.status}"
        await asyncio.sleep(0.05)


def labels(text: str) -> dict[str, Any]:
    out = {}
    for custom_id, line in read_output(text).items():
        content = line["body"]["choices"][0]["message"]["content"]
        out[custom_id] = json.loads(content).get("label") if content.startswith("{") else content
    return out


def test_a_batch_answers_each_line_once_and_is_found_by_name(fake_llm: Any) -> None:
    async def run() -> None:
        api = BatchAPI(fake_llm.base_url, "k")
        try:
            made = await submit(api, "g:1", 3)
            assert made.name == "g:1" and not made.ended
            ended = await until_ended(api, made.id)
            assert ended.status == "completed" and ended.output_file_id
            answers = labels(await api.content(ended.output_file_id))
            assert set(answers) == {"g:1/t0", "g:1/t1", "g:1/t2"}
            assert all(label in ("a", "b") for label in answers.values())
            found = await api.find("g:1")
            assert found is not None and found.id == made.id
            assert await api.find("g:2") is None
        finally:
            await api.aclose()

    asyncio.run(run())
    stats = fake_llm.batches.stats()
    assert stats["created_by_name"] == {"g:1": 1}
    assert stats["answered_by_id"] == {"g:1/t0": 1, "g:1/t1": 1, "g:1/t2": 1}


@pytest.mark.parametrize(("mode", "status"), [("fail", "failed"), ("expire", "expired"), ("cancel", "cancelled")])
def test_a_faulty_batch_ends_without_output(fake_llm: Any, mode: str, status: str) -> None:
    fake_llm.batches.set_faults(mode=mode)

    async def run() -> RemoteBatch:
        api = BatchAPI(fake_llm.base_url, "k")
        try:
            return await until_ended(api, (await submit(api, "g:f", 2)).id)
        finally:
            await api.aclose()

    ended = asyncio.run(run())
    assert ended.status == status and ended.output_file_id is None
    assert fake_llm.batches.stats()["answered_by_id"] == {}


def test_a_slow_batch_is_in_progress_until_its_delay_and_invalid_lines_break_the_schema(fake_llm: Any) -> None:
    fake_llm.batches.set_faults(delay_s=0.5, invalid=1)

    async def run() -> tuple[str, dict[str, Any]]:
        api = BatchAPI(fake_llm.base_url, "k")
        try:
            made = await submit(api, "g:s", 2)
            first = (await api.get(made.id)).status
            ended = await until_ended(api, made.id)
            assert ended.output_file_id is not None
            return first, labels(await api.content(ended.output_file_id))
        finally:
            await api.aclose()

    first, answers = asyncio.run(run())
    assert first in ("validating", "in_progress")
    assert answers["g:s/t1"] in ("a", "b")
    assert answers["g:s/t0"] not in ("a", "b"), "the first line was to answer outside the schema"


def test_faults_are_refused_when_unknown(fake_llm: Any) -> None:
    with pytest.raises(ValueError):
        fake_llm.batches.set_faults(mode="explode")
    with pytest.raises(ValueError):
        fake_llm.batches.set_faults(upload_delay_s=-1)


def test_a_slow_upload_is_answered_after_its_delay_and_counted_once(fake_llm: Any) -> None:
    fake_llm.batches.set_faults(upload_delay_s=2.0)

    async def run() -> tuple[bool, int, str]:
        api = BatchAPI(fake_llm.base_url, "k")
        try:
            upload = asyncio.create_task(api.upload("slow", [request_line("c0", "/v1/chat/completions", body("x"))]))
            await asyncio.sleep(0.3)
            waiting, seen = not upload.done(), fake_llm.batches.stats()["uploads"]
            return waiting, seen, await upload
        finally:
            await api.aclose()

    waiting, seen, file_id = asyncio.run(run())
    assert waiting and seen == 0, "the upload was answered before its delay"
    assert file_id and fake_llm.batches.stats()["uploads"] == 1


def test_output_lines_that_cannot_be_read_are_left_out() -> None:
    text = '{"custom_id": "a", "response": {"status_code": 200, "body": {"x": 1}}}\nnot json\n' \
           '{"custom_id": "b", "response": null, "error": {"code": "e"}}\n[1]\n'
    assert read_output(text) == {"a": {"status": 200, "body": {"x": 1}}, "b": {"status": 0, "error": {"code": "e"}}}


def test_a_batchs_lines_report_the_prompt_prefix_they_share_as_cached(fake_llm: Any) -> None:
    """A provider reports cached prompt tokens in a batch's usage too: the lines after the first share
    the system prompt, which the first line put in the fake model's prompt cache."""
    system = {"role": "system", "content": "You sort parcels. " * 50}  # 900 characters: 225 tokens

    def line(i: int) -> dict[str, Any]:
        return request_line(f"g:c/t{i}", "/v1/chat/completions",
                            {**body(f"task {i}"), "messages": [system, {"role": "user", "content": f"task {i}"}]})

    async def run() -> dict[str, Any]:
        api = BatchAPI(fake_llm.base_url, "k")
        try:
            made = await api.create(await api.upload("g:c", [line(i) for i in range(3)]), "/v1/chat/completions", "g:c")
            ended = await until_ended(api, made.id)
            return read_output(await api.content(ended.output_file_id or ""))
        finally:
            await api.aclose()

    fake_llm.reset()
    out = asyncio.run(run())
    cached = {custom_id: answer["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
              for custom_id, answer in out.items()}
    assert cached == {"g:c/t0": 0, "g:c/t1": len(system["content"]) // 4, "g:c/t2": len(system["content"]) // 4}
