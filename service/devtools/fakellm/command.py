"""``python -m service.devtools.fakellm``: serve the fake model in the foreground until stopped."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from service.devtools.fakellm.server import FakeLLM
from service.devtools.fakellm.serving import serve_until_stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.devtools.fakellm",
        description="Serve a fault-injecting OpenAI-compatible chat-completions API until stopped.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--latency-s", type=float, default=0.0, help="wait before every answer")
    parser.add_argument("--seed", type=int, default=None, help="make the answers reproducible")
    parser.add_argument("--idempotent", action="store_true", help="replay answers for repeated Idempotency-Keys")
    parser.add_argument("--tool-rounds", type=int, default=1,
                        help="assistant tool-call rounds before the final answer, when tools are offered")
    parser.add_argument("--tool-calls-per-round", type=int, default=1, help="tool calls in each tool-call answer")
    parser.add_argument("--max-concurrency", type=int, default=0,
                        help="requests answered at once; one more gets a 429 (0: no limit)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")

    fake = FakeLLM(args.host, args.port, latency_s=args.latency_s, seed=args.seed, idempotent=args.idempotent,
                   tool_rounds=args.tool_rounds, tool_calls_per_round=args.tool_calls_per_round,
                   max_concurrency=args.max_concurrency)
    return serve_until_stopped(fake, "fakellm")
