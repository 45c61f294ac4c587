"""What the single-process timing scripts share: their command line and their JSON record."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch


def timing_arguments(doc: str, repeats: int = 7,
                     more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--threads (set for torch here), --repeats and --json, plus what ``more`` adds."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", default=None, help="also write the results here")
    if more is not None:
        more(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_json(path: str | None, result: dict) -> None:
    """The results as JSON at ``path``, when one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
