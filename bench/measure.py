"""Shared measuring tools for the benchmarks: luma SSIM and the corpus list."""

import csv
import os

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
