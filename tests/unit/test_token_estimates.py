"""Token estimates never undercount: Chinese, Japanese and emoji text (about a token a character or
more) fill budgets and trip the oversize check as they fill the model's window; ASCII text stays at
most a token a byte."""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from service.agents.base import Agent, Step
from service.agents.registry import AgentRegistry
from service.core.errors import InvalidOutput
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.devtools.embedded import with_local_model
from service.devtools.local import local_model_path
from service.llm.tokens import prompt_counter, utf8_bytes
from service.pipeline.base import MESSAGE_OVERHEAD_TOKENS, ProcessorConfig, ToDeadLetter, estimate_tokens
from service.pipeline.history import SummaryOut, SummaryStep, budget_tokens, history_tokens, summary_room, to_fold
from service.pipeline.processor import TaskProcessor

# a real tokenizer gives about one token per character of these, and up to three for a rare one
CJK = "东京都の天気は晴れです。今日は会議があります。我们明天去北京开会，请准备季度报告。"
EMOJI = "👍🏽🎉👨‍👩‍👧‍👦🇳🇴"  # a skin tone, a family joined by zero-width joiners, a flag
ENGLISH = "The parcel arrived crushed and two cups were broken; please send a refund. "


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


@given(st.text())
def test_no_text_is_estimated_below_its_utf8_bytes(text: str) -> None:
    # a byte-level BPE token covers at least one byte, so the bytes bound any such tokenizer's count
    assert estimate_tokens(user(text), None) >= len(text.encode("utf-8"))


def test_cjk_and_emoji_count_at_least_a_token_a_character() -> None:
    for text in (CJK * 50, EMOJI * 50):
        assert estimate_tokens(user(text), None) >= 3 * len(text)  # three or four UTF-8 bytes each
    assert estimate_tokens(user(EMOJI), None) >= len(EMOJI.encode("utf-8"))


def test_ascii_stays_at_most_a_token_a_byte() -> None:
    text = ENGLISH * 60  # 4,500 characters: about 1,000 tokens to a GPT or Llama tokenizer
    estimate = estimate_tokens(user(text), None)
    assert len(text) <= estimate <= len(text) + MESSAGE_OVERHEAD_TOKENS
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    with_schema = estimate_tokens(user(text), schema)
    assert with_schema - estimate == len('{"type":"object","properties":{"label":{"type":"string"}}}')


class Text(BaseModel):
    text: str


class Say(Step):
    output_model = Text

    def messages(self, task_input: BaseModel, previous: Mapping[str, Any]) -> list[dict[str, Any]]:
        assert isinstance(task_input, Text)
        return [{"role": "system", "content": "Summarise."}, {"role": "user", "content": task_input.text}]


def request_size(text: str, context_tokens: int, max_output_tokens: int) -> int:
    config = ProcessorConfig(context_tokens=context_tokens, max_output_tokens=max_output_tokens)
    p = TaskProcessor.build(ledger=SimpleNamespace(), agents=AgentRegistry([Agent("say", Text, (Say(),))]),  # type: ignore[arg-type]
                            llm=SimpleNamespace(), outputs=SimpleNamespace(transactional=False),  # type: ignore[arg-type]
                            metrics=Metrics(), config=config, worker_id="w", model_name="m")
    _, _, needed = p.steps.calls.request_size(Say(), Text(text=text), {}, 0)
    return needed


@pytest.mark.parametrize("unit", [CJK, EMOJI])
def test_a_request_over_the_window_in_cjk_or_emoji_is_oversize(unit: str) -> None:
    # 7,300 characters and more: over 7,300 tokens, with the 1,024 of the answer over an 8,192 window
    text = unit * (7300 // len(unit) + 1)
    with pytest.raises(ToDeadLetter) as caught:
        request_size(text, 8192, 1024)
    assert caught.value.reason == "oversize"


def test_the_tokens_reserved_of_a_budget_cover_a_cjk_request() -> None:
    text = CJK * 20  # 820 characters, 820 tokens or more
    needed = request_size(text, 32768, 512)
    assert needed >= len(text) + 512  # what the tenant's budget reserves for the call


def test_a_cjk_history_over_its_budget_is_folded() -> None:
    budget = budget_tokens(0.5, 8192)  # 4,096 tokens
    # twelve turns of 410 characters: 4,920 tokens or more to any tokenizer
    turns = [{"task_id": f"t-{i}", "input": {"text": CJK * 10}, "result": {"answer": "好"},
              "at": "2026-01-01T00:00:00.000Z"} for i in range(12)]
    assert history_tokens(None, turns) >= 12 * len(CJK * 10)
    assert to_fold(None, turns, budget=budget, room=summary_room(budget, 512), keep_turns=None) > 0


# ------------------------------------------------------------------- the model's tokenizer, where known


def test_the_embedded_model_counts_with_its_own_vocabulary() -> None:
    llm = with_local_model(Settings()).llm
    assert llm.tokenizer_gguf == str(local_model_path())
    count = prompt_counter(llm)
    text = ENGLISH * 60
    tokens = count(text)
    assert 0 < tokens < len(text) // 3  # SmolLM2: about 4.5 characters a token of this text
    assert estimate_tokens(user(text), None, count=count) == tokens + MESSAGE_OVERHEAD_TOKENS
    assert count(CJK) >= len(CJK)  # a vocabulary of English text: a token or more a CJK character


def test_without_a_tokenizer_or_with_fallbacks_prompts_count_their_bytes() -> None:
    assert prompt_counter(Settings().llm) is utf8_bytes
    fallback = {"base_url": "http://f/v1", "api_key": "k", "model": "other"}
    llm = Settings(llm={"tokenizer_gguf": str(local_model_path()), "fallbacks": [fallback]}).llm
    assert prompt_counter(llm) is utf8_bytes  # another model may answer: its tokenizer is unknown


def test_an_english_request_that_fits_the_local_window_is_not_oversize_by_its_bytes() -> None:
    text = ENGLISH * 80  # 6,000 bytes; about 1,300 SmolLM2 tokens
    config = ProcessorConfig(context_tokens=2048, max_output_tokens=512,
                             count_tokens=prompt_counter(with_local_model(Settings()).llm))
    p = TaskProcessor.build(ledger=SimpleNamespace(), agents=AgentRegistry([Agent("say", Text, (Say(),))]),  # type: ignore[arg-type]
                            llm=SimpleNamespace(), outputs=SimpleNamespace(transactional=False),  # type: ignore[arg-type]
                            metrics=Metrics(), config=config, worker_id="w", model_name="m")
    _, _, needed = p.steps.calls.request_size(Say(), Text(text=text), {}, 0)
    assert needed <= 2048
    with pytest.raises(ToDeadLetter):
        request_size(text, 2048, 512)  # in bytes it would not fit


def test_a_summary_is_held_to_its_room_as_the_estimate_counts_it() -> None:
    step = SummaryStep(None, [], max_chars=12, room_tokens=12)
    assert step.schema(SummaryOut(summary="-"), {})["properties"]["summary"]["maxLength"] == 12
    step.check(SummaryOut(summary="-"), SummaryOut(summary="twelve chars"))  # 12 bytes: fits
    with pytest.raises(InvalidOutput, match="tokens"):
        step.check(SummaryOut(summary="-"), SummaryOut(summary="東京都の天気は晴れ"))  # 9 characters, 27 bytes
