"""``python -m dedup.lifecycles [--check] DOCUMENT``: draw the lifecycle tables into DOCUMENT."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dedup.lifecycles.render import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dedup.lifecycles", description=__doc__)
    parser.add_argument("document", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when out of date")
    args = parser.parse_args(argv)
    before = args.document.read_text()
    after = render(before)
    if after == before:
        return 0
    if args.check:
        print(f"{args.document} is out of date: run python -m dedup.lifecycles {args.document}", file=sys.stderr)
        return 1
    args.document.write_text(after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
