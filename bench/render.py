"""Per-image render time and quality: dynimg against libvips and naive Pillow-SIMD.

    make bench        (or: .venv/bin/python bench/render.py, after `make bench-env`)

The five largest JPEG photos of the corpus (8-20 Mpx, three progressive), fitted
inside 400x400 and 1280x1280, JPEG q80, one core, medians of interleaved rounds,
geometric mean over the photos. SSIM is luma SSIM (8x8 windows) against a float
LANCZOS resize of the full decode. libvips runs in its own venv (.venv-bench),
so nothing of it touches the runtime venv.
"""

import io
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import dynimg  # noqa: E402
from measure import corpus_files, ssim  # noqa: E402

BENCH_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-bench", "bin", "python")
BOXES = (400, 1280)
ROUNDS = 9


def photos():
    return [path for path in corpus_files()
            if Image.open(path).width * Image.open(path).height >= 7_000_000][:5]


def naive(data, box):
    """What a first attempt does: full decode, one LANCZOS resize, encode."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image.thumbnail((box, box), Image.Resampling.LANCZOS, reducing_gap=None)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return (time.perf_counter() - started) * 1000, result


def reference(path, size):
    luma = Image.open(path).convert("L").convert("F")
    return luma.resize(size, Image.Resampling.LANCZOS)


def score(path, output):
    image = Image.open(io.BytesIO(output)).convert("L")
    ref = reference(path, image.size)
    return ssim(ref, image)


def geomean(values):
    return math.exp(statistics.mean(math.log(v) for v in values))


class Libvips:
    """The persistent libvips worker in the bench venv."""

    def __init__(self):
        self.process = subprocess.Popen([BENCH_PYTHON, os.path.join(HERE, "vips_worker.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def render(self, box, path, output_path):
        self.process.stdin.write(f"{box} {path} {output_path}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def main():
    config = dynimg.load_config()
    dynimg.limit_pillow()
    dynimg.tune_malloc()  # as the server process does
    transforms = dynimg.LRU(dynimg.TRANSFORM_CACHE_SIZE)  # as an app keeps them
    files = photos()
    data = {path: open(path, "rb").read() for path in files}
    results = {}
    libvips = Libvips()
    with tempfile.TemporaryDirectory() as folder:
        for box in BOXES:
            spec = dynimg.parse_spec(dynimg.Request(path="/x.jpg",
                                                    query=f"width={box}&height={box}&q=80"),
                                     config)
            times = {name: {path: [] for path in files} for name in ("dynimg", "naive", "libvips")}
            outputs = {}
            for _ in range(ROUNDS):
                for path in files:  # the three paths back to back on each image
                    ms, rendered = timed(dynimg.render, data[path], spec, config, transforms)
                    times["dynimg"][path].append(ms)
                    outputs[("dynimg", path)] = rendered.data
                    ms, output = timed(naive, data[path], box)
                    times["naive"][path].append(ms)
                    outputs[("naive", path)] = output
                    output_path = os.path.join(folder, os.path.basename(path) + ".jpg")
                    times["libvips"][path].append(libvips.render(box, path, output_path))
                    with open(output_path, "rb") as file:
                        outputs[("libvips", path)] = file.read()
            for name in times:
                results[(name, box)] = (
                    geomean([statistics.median(times[name][path]) for path in files]),
                    statistics.mean(score(path, outputs[(name, path)]) for path in files))
    libvips.close()
    print(f"{len(files)} photos ({', '.join(os.path.basename(p) for p in files)}), "
          f"{ROUNDS} interleaved rounds, one core, JPEG q80\n")
    print("| path | box | geomean ms | ratio to libvips | SSIM (luma) | SSIM minus libvips |")
    print("|---|---:|---:|---:|---:|---:|")
    for box in BOXES:
        vips_ms, vips_ssim = results[("libvips", box)]
        for name in ("naive", "libvips", "dynimg"):
            ms, quality = results[(name, box)]
            print(f"| {name} | {box} | {ms:.0f} | {ms / vips_ms:.2f} | {quality:.4f} | "
                  f"{quality - vips_ssim:+.4f} |")


if __name__ == "__main__":
    main()
