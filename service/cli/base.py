"""What every command of the CLI shares: its name and how it says a server did not answer."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from service.core.settings import Settings

PROG = "agent-service"
Handler = Callable[[Settings, argparse.Namespace], int]


class Unreachable(Exception):
    """Redis or the broker did not answer: one line on stderr, exit code 2."""
