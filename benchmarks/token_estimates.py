"""``python -m benchmarks.token_estimates``: what the token estimate says of one request of each
built-in kind (its first step that prompts the model), before (characters / 3) and now (UTF-8 bytes), next to the count of
the local model's own tokenizer (SmolLM2, from the GGUF the ``local-llm`` extra ships; its chat
template left out). A figure to read, not a test.
"""

from __future__ import annotations

import json
from typing import Any

from service.agents.base import Previous
from service.agents.delegation import DelegateStep
from service.agents.registry import default_agents
from service.agents.support import support_agent
from service.devtools.demo import SAMPLES, TICKETS, TREE
from service.devtools.local import local_model_path
from service.pipeline.base import estimate_tokens

DOCUMENT = ("Patient: Jane Roe, born 1980-04-02. Diagnosis: moderate plaque psoriasis. Requested: "
            "adalimumab 40 mg every other week; methotrexate tried for six months without response.")
INPUTS: dict[str, dict[str, Any]] = {
    "summarize_long": {"text": " ".join(["Kafka delivers each record at least once."] * 40), "max_words": 60},
    "prior_auth": {"document": DOCUMENT, "payer": "Acme Health", "drug": "adalimumab"},
    "review": TREE[0]["input"],
    **{k: TREE[0]["input"] for k in ("review_critique", "review_research", "review_summary")},
    # the same classify task in Japanese: where the estimate changes most
    "classify (ja)": {"text": "小包が潰れて届き、カップが二つ割れていました。", "labels": ["苦情", "称賛", "質問"]},
}


def before(messages: list[dict[str, Any]], schema: dict[str, Any] | None, tools: list[dict[str, Any]]) -> int:
    """The estimate this replaced: three characters a token."""
    chars = sum(len(m.get("content") or "") + 8 for m in messages)
    chars += sum(len(json.dumps(v, separators=(",", ":"), ensure_ascii=False)) for v in (schema, tools) if v)
    return chars // 3 + 1


def main() -> None:
    from llama_cpp import Llama  # the local-llm extra

    vocab = Llama(model_path=str(local_model_path()), vocab_only=True, verbose=False)

    def counted(messages: list[dict[str, Any]], schema: dict[str, Any] | None, tools: list[dict[str, Any]]) -> int:
        texts = [m.get("content") or "" for m in messages]
        texts += [json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in (schema, tools) if v]
        return sum(len(vocab.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts)

    registry = default_agents()
    registry.register(support_agent("http://tickets.invalid"))
    examples = {s["kind"]: s["input"] for s in [*SAMPLES, *TICKETS, *TREE]} | INPUTS
    del examples["review_panel"]  # its children are measured; its own step only sums their answers
    print(f"{'kind':<18}{'before':>8}{'now':>8}{'SmolLM2':>9}  now/SmolLM2")
    for name, raw in sorted(examples.items()):
        agent = registry.get(name.split(" ")[0])
        task_input = agent.parse_input(raw)
        step = next(s for s in agent.steps if not isinstance(s, DelegateStep))
        messages, schema = step.messages(task_input, Previous()), step.schema(task_input, Previous())
        tools = [t.spec() for t in step.tools]
        real = counted(messages, schema, tools)
        now = estimate_tokens(messages, schema, tools)
        print(f"{name:<18}{before(messages, schema, tools):>8}{now:>8}{real:>9}  {now / real:.2f}")


if __name__ == "__main__":
    main()
