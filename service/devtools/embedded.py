"""``agent-service run`` with embedded servers for whatever the settings leave unconfigured.

``--embedded`` starts a broker and redis-server; a missing ``AGENT_LLM__BASE_URL`` starts the local
model. The CLI imports this module only on those paths; a configured deployment never loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.core.settings import Settings
from service.devtools import local
from service.runtime.wiring import serve


def run_embedded(settings: Settings, *, embedded: bool, data_dir: Path | None = None,
                 broker: str = "noida") -> None:
    """Start the embedded servers the settings need, serve until signalled, then stop them."""
    with local.Embedded(data_dir or local.default_data_dir()) as emb:
        if embedded:
            settings = start_embedded(settings, emb, broker=broker)
        base_url = settings.llm.base_url
        if base_url is None:
            server = emb.start("llm", local.start_local_model(emb.data_dir / "llm", gguf=settings.llm.local_gguf))
            base_url = f"http://{server.address}/v1"
            settings = with_local_model(settings)
        serve(settings, llm_base_url=base_url)


def with_local_model(settings: Settings) -> Settings:
    """The embedded model's name, window and tokenizer."""
    llm = settings.llm.model_copy(update={
        "model": "smollm2", "context_tokens": min(settings.llm.context_tokens, local.LOCAL_MODEL_CONTEXT),
        "response_format": "json_object",
        # its own vocabulary counts the prompts: exact, where bytes would count English 4x over its 2048
        "tokenizer_gguf": settings.llm.tokenizer_gguf or settings.llm.local_gguf or str(local.local_model_path()),
        # greedy unless set: sampling makes a 135M model drift from the document it should copy from
        # (the cost: a retry after an invalid answer asks again with the same odds of the same answer)
        "temperature": settings.llm.temperature if "temperature" in settings.llm.model_fields_set else 0.0,
    })
    return settings.model_copy(update={"llm": llm})


def start_embedded(settings: Settings, emb: Any, *, broker: str = "noida") -> Settings:
    """Start a local broker and redis-server and return settings that point at them."""
    b = emb.start("broker", local.start_broker(broker, emb.data_dir / broker))
    r = emb.start("redis", local.start_redis(emb.data_dir / "redis"))
    kafka = settings.kafka.model_copy(update={
        "bootstrap_servers": b.address,
        # noida-db never hands over cooperatively revoked partitions: use an eager protocol there
        "partition_assignment_strategy": "roundrobin" if broker == "noida" else settings.kafka.partition_assignment_strategy,
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 500,
    })
    redis = settings.redis.model_copy(update={"url": type(settings.redis.url)(f"redis://{r.address}/0")})
    return settings.model_copy(update={"kafka": kafka, "redis": redis})
