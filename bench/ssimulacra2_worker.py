"""Scores images with SSIMULACRA2 (the PyPI `ssimulacra2` package, numpy and scipy);
run in the bench venv, never in the runtime one.

    .venv-bench/bin/python bench/ssimulacra2_worker.py

Reads one pair a line on stdin, "REFERENCE DISTORTED" (two image files of the same
size), and answers with the score on stdout: 90 and up is excellent, 70 good, 50
fair, 30 poor.
"""

import sys

from ssimulacra2 import compute_ssimulacra2

for line in sys.stdin:
    reference, distorted = line.rstrip("\n").split(" ", 1)
    print(f"{compute_ssimulacra2(reference, distorted):.3f}", flush=True)
