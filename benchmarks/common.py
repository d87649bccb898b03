"""What the benchmark scripts share: the repository's folders on sys.path (a script is run from anywhere, the
library is not necessarily installed) and the argument that names the run they read."""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "platform"), os.path.join(ROOT, "jobs")]


def run_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the script's first docstring line, with --run-dir (a run with data/)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--run-dir", default="runs/bench",
                        help="a run with data/ (python jobs/prepare.py run.name=bench)")
    return parser
