"""Encoder settings, measured: JPEG progressive, chroma subsampling, optimize;
WebP method and quality. On the corpus's JPEG photos, resized by dynimg.

    .venv/bin/python bench/encoding.py

SSIM here is the mean of per-channel SSIM over R, G and B (so chroma loss counts),
against the resized image before encoding. Times are medians of 3 encodes.
"""

import io
import os
import statistics
import sys
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from measure import corpus_files, ssim  # noqa: E402


def colour_ssim(reference, candidate):
    return statistics.mean(ssim(a, b) for a, b in zip(reference.split(), candidate.split()))


def encode(image, fmt, **options):
    times = []
    for _ in range(3):
        buffer = io.BytesIO()
        started = time.perf_counter()
        image.save(buffer, fmt, **options)
        times.append(time.perf_counter() - started)
    data = buffer.getvalue()
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    return len(data), statistics.median(times) * 1000, decoded


def resized_photos(width):
    for path in corpus_files():
        image = Image.open(path)
        image.draft("RGB", (width, width))
        image = image.convert("RGB")
        yield image.resize((width, round(image.height * width / image.width)),
                           Image.Resampling.LANCZOS)


def table(title, header, rows):
    print(f"\n{title}\n\n| {' | '.join(header)} |\n|{'---|' * len(header)}")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def decode_ms(data):
    times = []
    for _ in range(3):
        started = time.perf_counter()
        Image.open(io.BytesIO(data)).load()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def progressive():
    """Bytes, and the time to encode here and to decode in the client, against baseline."""
    rows = []
    for width in (48, 64, 96, 128, 200, 400, 800, 1280):
        ratios, encode_times, decode_times = [], [], []
        for image in resized_photos(width):
            sizes, times, decodes = [], [], []
            for progressive_scan in (False, True):
                buffer = io.BytesIO()
                started = time.perf_counter()
                image.save(buffer, "JPEG", quality=80, optimize=True,
                           progressive=progressive_scan)
                times.append((time.perf_counter() - started) * 1000)
                sizes.append(len(buffer.getvalue()))
                decodes.append(decode_ms(buffer.getvalue()))
            ratios.append(sizes[1] / sizes[0])
            encode_times.append(times)
            decode_times.append(decodes)
        encode_ratio = statistics.median(p / b for b, p in encode_times)
        decode_ratio = statistics.median(p / b for b, p in decode_times)
        rows.append((str(width), f"{statistics.median(ratios):.3f}", f"{encode_ratio:.1f}x",
                     f"{decode_ratio:.1f}x"))
    table("JPEG q80 (optimized): progressive against baseline, median",
          ("width", "bytes ratio", "encode time", "decode time"), rows)


def subsampling():
    rows = []
    for quality in (70, 80, 85, 88, 90, 92, 95):
        gains, costs = [], []
        for image in resized_photos(800):
            small, _, low = encode(image, "JPEG", quality=quality, subsampling="4:2:0")
            big, _, high = encode(image, "JPEG", quality=quality, subsampling="4:4:4")
            gains.append(colour_ssim(image, high) - colour_ssim(image, low))
            costs.append(big / small - 1)
        rows.append((str(quality), f"{statistics.median(gains):+.4f}",
                     f"{statistics.median(costs):+.1%}"))
    table("JPEG at 800 px: what 4:4:4 buys over 4:2:0, median",
          ("quality", "SSIM gain", "bytes"), rows)


def optimize():
    rows = []
    for width in (360, 800, 1600):
        for progressive_scan in (False, True):
            saved, slower = [], []
            for image in resized_photos(width):
                plain, plain_ms, _ = encode(image, "JPEG", quality=80,
                                            progressive=progressive_scan)
                tuned, tuned_ms, _ = encode(image, "JPEG", quality=80,
                                            progressive=progressive_scan, optimize=True)
                saved.append(1 - tuned / plain)
                slower.append(tuned_ms - plain_ms)
            rows.append((str(width), "progressive" if progressive_scan else "baseline",
                         f"{statistics.median(saved):.1%}", f"{statistics.median(slower):+.1f}"))
    table("JPEG q80: optimize=True, median", ("width", "scan", "bytes saved", "ms added"), rows)


def webp():
    rows = []
    images = list(resized_photos(800))
    jpeg = [encode(image, "JPEG", quality=80, optimize=True, progressive=True)
            for image in images]
    jpeg_ssim = statistics.median(colour_ssim(i, d) for i, (_, _, d) in zip(images, jpeg))
    jpeg_bytes = statistics.median(size for size, _, _ in jpeg)
    rows.append(("JPEG q80", "", f"{jpeg_bytes:,.0f}",
                 f"{statistics.median(ms for _, ms, _ in jpeg):.1f}", f"{jpeg_ssim:.4f}"))
    for method in (0, 2, 4, 6):
        for quality in (75, 80, 85):
            results = [encode(image, "WEBP", quality=quality, method=method) for image in images]
            rows.append((f"WebP q{quality}", str(method),
                         f"{statistics.median(size for size, _, _ in results):,.0f}",
                         f"{statistics.median(ms for _, ms, _ in results):.1f}",
                         f"{statistics.median(colour_ssim(i, d) for i, (_, _, d) in zip(images, results)):.4f}"))
    table("800 px: WebP by method and quality against JPEG q80, median",
          ("encoding", "method", "bytes", "ms", "SSIM"), rows)


if __name__ == "__main__":
    print(f"{len(corpus_files())} photos, Pillow {Image.__version__}")
    progressive()
    subsampling()
    optimize()
    webp()
