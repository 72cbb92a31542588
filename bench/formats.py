"""AVIF encoder settings and the quality scale of each format, measured with
SSIMULACRA2 on the tuning photos (the delivery benchmark reports on others).

    .venv/bin/python bench/formats.py      (scores come from .venv-bench)

1. Each AVIF encoder and speed, one thread: CPU ms per encode and bytes against
   JPEG q80 at the same SSIMULACRA2 (interpolated along each encoder's own
   quality curve), medians over the photos at 400 and 800 px.
2. The quality scale: for each JPEG quality, the WebP and AVIF quality that scores
   the same on each photo and size; dynimg.QUALITY_EQUIVALENTS takes the upper
   quartile, so that three photos in four look at least as good as in JPEG.
3. Speed settings by size (--speeds, alone): SVT-AV1 presets, encoder threads and
   WebP methods at 400, 800 and 1600 px, against the setting dynimg uses: CPU ms,
   wall ms (threads), bytes at equal SSIMULACRA2 and the score at the same
   quality setting, medians over the photos.

    .venv/bin/python bench/formats.py --scale-only      (part 2 alone)
    taskset -c 0,1 .venv/bin/python bench/formats.py --speeds     (part 3 alone)
"""

import io
import os
import statistics
import sys
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dynimg  # noqa: E402
from measure import Scorer, corpus_dir  # noqa: E402

#: Photos the settings are chosen on; bench/delivery.py reports on the others. The
#: encoder table takes the first three.
TUNING_PHOTOS = ("photo-large-1.jpg", "photo-medium-2.jpg", "photo-large-3.jpg",
                 "progressive.jpg", "photo-medium-1.jpg", "exif-orient-1.jpg")
ENCODER_PHOTOS = TUNING_PHOTOS[:3]
WIDTHS = (400, 800)
ENCODERS = [("svt", speed) for speed in (6, 7, 8, 9)] + [("aom", speed) for speed in (6, 8, 9)] \
    + [("rav1e", speed) for speed in (8, 10)]
GRID = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
JPEG_QUALITIES = (20, 30, 40, 50, 60, 70, 80, 90)
AVIF_OPTIONS = dict(zip(("codec", "speed"), dynimg.AVIF_ENCODER or ()), max_threads=1)


def photo(name, width):
    image = Image.open(os.path.join(corpus_dir(), name))
    image.draft("RGB", (width * 2, width * 2))
    image = image.convert("RGB")
    image.info = {}  # no source metadata in the encodes (the AVIF plugin would copy it)
    return image.resize((width, round(image.height * width / image.width)),
                        Image.Resampling.LANCZOS)


def encode(image, image_format, **options):
    buffer = io.BytesIO()
    started = time.process_time()
    image.save(buffer, image_format, **options)
    milliseconds = (time.process_time() - started) * 1000
    data = buffer.getvalue()
    return data, milliseconds, Image.open(io.BytesIO(data)).convert("RGB")


def along(curve, score, column):
    """`column` of a (score, ...) curve at this score, interpolated; None outside it."""
    curve = sorted(curve)
    for low, high in zip(curve, curve[1:]):
        if low[0] <= score <= high[0] and high[0] > low[0]:
            weight = (score - low[0]) / (high[0] - low[0])
            return low[column] + (high[column] - low[column]) * weight
    return None


def encoders(scorer, references):
    print("| AVIF encoder, speed | width | CPU ms (median) | bytes vs JPEG q80 at equal score |")
    print("|---|---:|---:|---:|")
    for width in WIDTHS:
        jpeg = {}
        for name, reference in references[width][:len(ENCODER_PHOTOS)]:
            data, _, decoded = encode(reference, "JPEG", quality=80, optimize=True,
                                      progressive=True)
            jpeg[name] = (scorer.score([(reference, decoded)])[0], len(data))
        for codec, speed in ENCODERS:
            times, ratios = [], []
            for name, reference in references[width][:len(ENCODER_PHOTOS)]:
                encoded = [encode(reference, "AVIF", quality=quality, speed=speed, codec=codec,
                                  max_threads=1) for quality in GRID[2:8]]
                scores = scorer.score([(reference, decoded) for _, _, decoded in encoded])
                curve = [(score, len(data)) for score, (data, _, _) in zip(scores, encoded)]
                size = along(curve, jpeg[name][0], 1)
                if size:
                    ratios.append(size / jpeg[name][1])
                times += [milliseconds for _, milliseconds, _ in encoded]
            print(f"| {codec} {speed} | {width} | {statistics.median(times):.0f} | "
                  f"{statistics.median(ratios):.2f} |", flush=True)


SPEED_WIDTHS = (400, 800, 1600)
SPEED_PHOTOS = ("photo-large-1.jpg", "photo-large-2.jpg", "photo-large-3.jpg",
                "photo-medium-2.jpg")
#: (label, format, options) of each setting tried; the first of a format is what
#: dynimg uses past SMALL_ANSWER_PIXELS
SPEED_SETTINGS = [("svt 8", "AVIF", {"codec": "svt", "speed": 8, "max_threads": 1})] + [
    (f"svt {speed}", "AVIF", {"codec": "svt", "speed": speed, "max_threads": 1})
    for speed in (4, 6, 7, 9, 10)] + [
    ("svt 8, 2 threads", "AVIF", {"codec": "svt", "speed": 8, "max_threads": 2}),
    ("aom 9", "AVIF", {"codec": "aom", "speed": 9, "max_threads": 1})] + [
    (f"webp method {method}", "WEBP", {"method": method}) for method in (4, 0, 1, 2, 3, 5, 6)]
SPEED_GRID = {"AVIF": (40, 50, 58, 64, 75, 88), "WEBP": (48, 61, 71, 81, 88, 93)}


def timed_encode(image, image_format, **options):
    """encode() with wall time as well: (data, CPU ms, wall ms, decoded)."""
    started = time.perf_counter()
    data, milliseconds, decoded = encode(image, image_format, **options)
    return data, milliseconds, (time.perf_counter() - started) * 1000, decoded


def speeds(scorer):
    """Part 3: each setting against the first one of its format, on each photo and
    width: bytes at the base's score at the base's usual quality (AVIF 75, WebP 88:
    JPEG 80 on dynimg's scale), and the score lost at that same quality."""
    print("| setting | width | CPU ms | wall ms | bytes at equal score | "
          "score at the same quality |")
    print("|---|---:|---:|---:|---:|---:|")
    for width in SPEED_WIDTHS:
        references = [photo(name, width) for name in SPEED_PHOTOS]
        base = {}
        for label, image_format, options in SPEED_SETTINGS:
            grid = SPEED_GRID[image_format]
            usual = grid[-2]
            cpu, wall, ratios, deltas = [], [], [], []
            for index, reference in enumerate(references):
                encoded = [timed_encode(reference, image_format, quality=quality, **options)
                           for quality in grid]
                scores = scorer.score([(reference, decoded) for *_, decoded in encoded])
                curve = [(score, len(data)) for score, (data, *_) in zip(scores, encoded)]
                at_usual = scores[grid.index(usual)]
                key = (image_format, index)
                if key not in base:
                    base[key] = (at_usual, len(encoded[grid.index(usual)][0]))
                size = along(curve, base[key][0], 1)
                if size:
                    ratios.append(size / base[key][1])
                deltas.append(at_usual - base[key][0])
                cpu.append(encoded[grid.index(usual)][1])
                wall.append(encoded[grid.index(usual)][2])
            print(f"| {label} | {width} | {statistics.median(cpu):.0f} | "
                  f"{statistics.median(wall):.0f} | "
                  f"{statistics.median(ratios) if ratios else float('nan'):.3f} | "
                  f"{statistics.median(deltas):+.2f} |", flush=True)


def quality_scale(scorer, references):
    curves = {}  # format -> list of (photo curve: [(score, quality)])
    jpeg_scores = {quality: [] for quality in JPEG_QUALITIES}
    for width in WIDTHS:
        for _, reference in references[width]:
            for image_format, options in (("JPEG", {"optimize": True}),
                                          ("WEBP", {"method": dynimg.WEBP_METHOD}),
                                          ("AVIF", AVIF_OPTIONS)):
                grid = JPEG_QUALITIES if image_format == "JPEG" else GRID
                encoded = [encode(reference, image_format, quality=quality, **options)
                           for quality in grid]
                scores = scorer.score([(reference, decoded) for _, _, decoded in encoded])
                if image_format == "JPEG":
                    for quality, score in zip(grid, scores):
                        jpeg_scores[quality].append(score)
                curves.setdefault(image_format, []).append(list(zip(scores, grid)))
    print("\n| JPEG quality | SSIMULACRA2 (median) | WebP quality (median, upper quartile) "
          "| AVIF quality (median, upper quartile) |")
    print("|---:|---:|---:|---:|")
    for quality in JPEG_QUALITIES:
        row = [quality, statistics.median(jpeg_scores[quality])]
        for image_format in ("WEBP", "AVIF"):
            # each photo's JPEG score, found on the same photo's curve in this format
            matches = [along(curve, score, 1) for curve, score
                       in zip(curves[image_format], jpeg_scores[quality])]
            matches = [match for match in matches if match is not None]
            row.append(f"{statistics.median(matches):.0f}, "
                       f"**{statistics.quantiles(matches, n=4)[2]:.0f}**"
                       if len(matches) > 1 else "-")
        print("| {} | {:.1f} | {} | {} |".format(*row), flush=True)


def main():
    if not dynimg.AVIF_ENCODER:
        sys.exit("the AVIF plugin is not installed (make with AVIF=yes)")
    if "--speeds" in sys.argv:
        scorer = Scorer()
        try:
            speeds(scorer)
        finally:
            scorer.close()
        return
    references = {width: [(name, photo(name, width)) for name in TUNING_PHOTOS]
                  for width in WIDTHS}
    scorer = Scorer()
    try:
        print(f"tuning photos: {', '.join(TUNING_PHOTOS)} (encoders: the first three)\n")
        if "--scale-only" not in sys.argv:
            encoders(scorer, references)
        quality_scale(scorer, references)
    finally:
        scorer.close()


if __name__ == "__main__":
    main()
