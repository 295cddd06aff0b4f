"""
Run the atheris fuzzers for a bounded time, keeping their corpus:

    python -m tests.support.fuzz.run server --seconds 60
    python -m tests.support.fuzz.run decoder --seconds 60

The corpus lives in tests/support/fuzz/corpus/<target>/ (seeded from real exchanges
by tests/support/fuzz/seeds.py); atheris adds the inputs that reach new code there.
"""

from __future__ import annotations

import argparse
import os
import sys

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=["server", "decoder"])
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=0, help="stop after this many inputs")
    args = parser.parse_args()
    import atheris

    with atheris.instrument_imports(include=["imgresume"]):
        from tests.support.fuzz import targets
    target = targets.server_session if args.target == "server" else targets.decode_all
    corpus = os.path.join(CORPUS, args.target)
    os.makedirs(corpus, exist_ok=True)
    argv = [sys.argv[0], corpus, f"-max_total_time={args.seconds}", "-max_len=65536",
            "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]
    if args.runs:
        argv.append(f"-runs={args.runs}")
    atheris.Setup(argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
