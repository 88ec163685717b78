"""Re-vote a finished run from its members' saved logits, without training: `python -m ensemble.revote`.

    python -m ensemble.revote --run runs/quickstart --method weighted

Rewrites the run's submission.csv, report.json and report.html with the new vote (ensemble/results.py).
"""

from __future__ import annotations

import argparse
import sys

from ensemble.config import VOTE_METHODS, ConfigError
from ensemble.hold import OutputDirHold
from ensemble.report import summary_table
from ensemble.results import load_run, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.revote", description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run's output directory (or URI)")
    parser.add_argument("--method", required=True, choices=VOTE_METHODS)
    args = parser.parse_args(argv)
    try:
        run = load_run(args.run)
        with OutputDirHold(run.storage):  # it rewrites the run's results: not while a run writes them
            report = write_results(run, method=args.method)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_table(report))
    print(f"re-voted {len(report['members'])} members with {args.method!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
