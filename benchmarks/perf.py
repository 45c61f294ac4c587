"""The performance suite: standard and fine-grained shapes (uniform and skewed
routing, forward and forward+backward), decode bandwidth, activation memory,
each against the dense ideal and transformers' blocks. Prints tables and writes
JSON; the same as ``moekit bench``.

    python benchmarks/perf.py                       # CPU fp32
    python benchmarks/perf.py --dtype bfloat16 --repeats 5
"""

import sys

from moekit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
