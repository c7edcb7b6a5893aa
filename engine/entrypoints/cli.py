"""The `octavo` command line (subcommands are added by the surface issue)."""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="octavo", description="octavo inference engine")
    parser.add_argument("--version", action="version", version=_version())
    parser.parse_args(argv)
    parser.print_help()
    return 0


def _version() -> str:
    from octavo import __version__
    return f"octavo {__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
