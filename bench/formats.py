"""AVIF encoder settings and the quality scale of each format, measured with
SSIMULACRA2 on the tuning photos (the delivery benchmark reports on others).

    .venv/bin/python bench/formats.py      (scores come from .venv-bench)

1. Each AVIF encoder and speed, one thread: CPU ms per encode and bytes against
   JPEG q80 at the same SSIMULACRA2 (interpolated along each encoder's own
   quality curve), medians over the photos at 400 and 800 px.
2. The quality scale: for each JPEG quality, the WebP and AVIF quality that scores
   the same on each photo and size; dynimg.QUALITY_EQUIVALENTS takes the upper
   quartile, so that three photos in four look at least as good as in JPEG.

    .venv/bin/python bench/formats.py --scale-only      (part 2 alone)
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
