"""``agent-service run`` and ``agent-service demo``."""

from __future__ import annotations

import argparse
import sys

from service.agents.loading import AgentsNotLoaded, agents_from_settings
from service.core.settings import Settings


def run_command(settings: Settings, args: argparse.Namespace) -> int:
    from service.runtime.fleet import bind_to_supervisor, serve_fleet
    from service.runtime.wiring import StartupRefused, serve

    bind_to_supervisor()  # a worker of `run --workers N`: drain when the supervisor dies
    try:
        if args.workers > 1:
            if args.embedded or settings.llm.base_url is None:
                raise StartupRefused("--workers needs configured servers: AGENT_KAFKA__BOOTSTRAP_SERVERS, "
                                     "AGENT_REDIS__URL and AGENT_LLM__BASE_URL (start embedded ones with "
                                     "`run --embedded` once, or run the workers against your own)")
            serve_fleet(settings, args.workers, llm_base_url=settings.llm.base_url)
        elif args.embedded or settings.llm.base_url is None:
            from service.devtools.embedded import run_embedded

            check_agents(settings)  # before starting servers for a service that would not start

            run_embedded(settings, embedded=args.embedded, data_dir=args.data_dir, broker=args.broker)
        else:
            serve(settings, llm_base_url=settings.llm.base_url)
    except StartupRefused as exc:
        print(f"agent-service: refusing to start: {exc}", file=sys.stderr)
        return 2
    return 0


def check_agents(settings: Settings) -> None:
    from service.runtime.wiring import StartupRefused

    try:
        agents_from_settings(settings)
    except AgentsNotLoaded as exc:
        raise StartupRefused(f"agents not loaded: {exc}") from exc


def demo_command(settings: Settings, args: argparse.Namespace) -> int:
    from service.devtools.demo import main as demo_main

    return int(demo_main(settings, args))
