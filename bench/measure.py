"""Shared measuring tools for the benchmarks: the corpus list, luma SSIM and
SSIMULACRA2."""

import csv
import os
import shutil
import subprocess
import tempfile

import numpy
from PIL import Image

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus_dir():
    return os.environ.get("DYNIMG_CORPUS") or os.path.join(PROJECT, "..", "shared", "corpus")


def corpus_files(kind="photo", formats=("JPEG",)):
    """Corpus files of one kind from MANIFEST.tsv, largest first."""
    with open(os.path.join(corpus_dir(), "MANIFEST.tsv"), encoding="utf-8") as manifest:
        rows = list(csv.DictReader(manifest, delimiter="\t"))
    chosen = [row for row in rows
              if row["kind"] == kind and row["format"].split()[0] in formats]
    chosen.sort(key=lambda row: -int(row["width"]) * int(row["height"]))
    return [os.path.join(corpus_dir(), row["file"]) for row in chosen]


def _box_mean(array, size):
    """Mean over size×size windows (valid region), with an integral image."""
    integral = numpy.pad(array, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    total = (integral[size:, size:] - integral[:-size, size:]
             - integral[size:, :-size] + integral[:-size, :-size])
    return total / (size * size)


def ssim(reference, candidate, window=8):
    """Mean SSIM of the luma of two images (the candidate is resized to the reference);
    a mode "F" image is taken as luma already (a float reference)."""
    if candidate.size != reference.size:
        candidate = candidate.resize(reference.size, Image.Resampling.LANCZOS)
    x, y = (numpy.asarray(image if image.mode == "F" else image.convert("L"),
                          dtype=numpy.float64) for image in (reference, candidate))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box_mean(x, window), _box_mean(y, window)
    vx = _box_mean(x * x, window) - mx * mx
    vy = _box_mean(y * y, window) - my * my
    cxy = _box_mean(x * y, window) - mx * my
    score = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(score.mean())


BENCH_PYTHON = os.path.join(PROJECT, ".venv-bench", "bin", "python")


class Scorer:
    """SSIMULACRA2 from worker processes in the bench venv (one a core), so that the
    runtime venv never holds numpy or scipy. `score(pairs)` takes (reference,
    candidate) Pillow images of one size each and returns their scores in order."""

    def __init__(self, workers=None):
        self.folder = tempfile.mkdtemp(prefix="dynimg-score-")
        self.workers = [subprocess.Popen(
            [BENCH_PYTHON, os.path.join(PROJECT, "bench", "ssimulacra2_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(workers or os.cpu_count() or 1)]
        self.written = 0

    def _file(self, image):
        self.written += 1
        path = os.path.join(self.folder, f"{self.written}.png")
        image.convert("RGB").save(path, compress_level=1)
        return path

    def score(self, pairs):
        pairs = list(pairs)
        if len(pairs) > 100:  # pipes hold a limited number of lines
            return self.score(pairs[:100]) + self.score(pairs[100:])
        lines = [f"{self._file(reference)} {self._file(candidate)}\n"
                 for reference, candidate in pairs]
        # every worker gets its share at once, then answers are read back in turn
        for index, line in enumerate(lines):
            worker = self.workers[index % len(self.workers)]
            worker.stdin.write(line)
        for worker in self.workers:
            worker.stdin.flush()
        scores = [float(self.workers[index % len(self.workers)].stdout.readline())
                  for index in range(len(lines))]
        for line in lines:
            for path in line.split():
                os.remove(path)
        return scores

    def close(self):
        for worker in self.workers:
            worker.stdin.close()
            worker.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
