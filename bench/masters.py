"""How a master should be made: its size and JPEG quality, against what answers
made from it lose and what they cost.

    .venv/bin/python bench/masters.py      (make bench runs it)

For each large corpus photo and each master (long side x quality), the answers a
page asks for (JPEG q80, 360-2048 px wide) are made from the source and from the
master; both are scored with SSIMULACRA2 against a float LANCZOS resize of the full
decode, at the answer's size. Prints the master's bytes and the time to make it,
the CPU ms of an answer from the source and from the master (one core, medians of
interleaved rounds), and the worst and median score lost to the master, per width.
"""

import io
import os
import statistics
import sys
import time

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import dynimg  # noqa: E402
from measure import Scorer, corpus_files  # noqa: E402

WIDTHS = (360, 640, 1080, 1600, 2048)
MASTERS = ((2048, 95), (2048, 90), (1600, 95))
ROUNDS = 3


def cpu_ms(function, *args):
    started = time.process_time()
    result = function(*args)
    return (time.process_time() - started) * 1000, result


def large_photos():
    return [path for path in corpus_files("photo", ("JPEG", "PNG", "TIFF"))
            if Image.open(path).width * Image.open(path).height >= dynimg.MASTER_MIN_PIXELS]


def master_of(data, config, side, quality):
    dynimg.MASTER_SIDE, dynimg.MASTER_QUALITY = side, quality
    image = dynimg.open_image(data, config)
    return dynimg.make_master(image, dynimg.facts_of(image), data, config, None)


def from_master(master, spec, config):
    image, facts = dynimg.open_master(master, config)
    return dynimg.render_opened(image, facts, master, spec, config, draft=False)


def upright(data, config):
    """The whole source decoded, upright, in sRGB: what every answer is scored against."""
    image = dynimg.open_image(data, config)
    job = dynimg.Job(None, dynimg.facts_of(image), None, dynimg.LRU(8), 0)
    image.load()
    return dynimg.to_srgb(dynimg.orient(image, job), job).convert("RGB")


def main():
    config = dynimg.load_config()
    dynimg.limit_pillow()
    dynimg.tune_malloc()
    scorer = Scorer()
    rows = []
    for path in large_photos():
        data = open(path, "rb").read()
        whole = upright(data, config)
        for side, quality in MASTERS:
            made_ms, master = cpu_ms(master_of, data, config, side, quality)
            for width in WIDTHS:
                spec = dynimg.parse_spec(dynimg.Request(path="/x", query=f"width={width}&q=80"),
                                         config)
                facts = dynimg.facts_of(dynimg.open_image(data, config))
                if not dynimg.master_serves(dynimg.plan_output(facts, spec, config),
                                            dynimg.master_size(facts)):
                    continue
                direct_ms, master_ms = [], []
                for _ in range(ROUNDS):
                    ms, direct = cpu_ms(dynimg.render, data, spec, config)
                    direct_ms.append(ms)
                    ms, made = cpu_ms(from_master, master, spec, config)
                    master_ms.append(ms)
                images = [Image.open(io.BytesIO(r.data)).convert("RGB") for r in (direct, made)]
                ref = whole.resize(images[0].size, Image.Resampling.LANCZOS)
                scores = scorer.score([(ref, image) for image in images])
                rows.append((os.path.basename(path), side, quality, len(master), made_ms, width,
                             statistics.median(direct_ms), statistics.median(master_ms),
                             scores[0], scores[1]))
                print(*rows[-1], sep="\t", flush=True)
    scorer.close()
    report(rows)


def report(rows):
    print("\n| master | bytes (median) | make ms (median) | width | ms from source | "
          "ms from master | ratio | score lost: median | worst |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, quality in MASTERS:
        for width in WIDTHS:
            chosen = [row for row in rows if row[1:3] == (side, quality) and row[5] == width]
            if not chosen:
                continue
            lost = [row[8] - row[9] for row in chosen]
            print(f"| {side} q{quality} | {statistics.median(r[3] for r in chosen) / 1e3:.0f} kB"
                  f" | {statistics.median(r[4] for r in chosen):.0f} | {width} | "
                  f"{statistics.median(r[6] for r in chosen):.0f} | "
                  f"{statistics.median(r[7] for r in chosen):.0f} | "
                  f"{statistics.median(r[7] / r[6] for r in chosen):.2f} | "
                  f"{statistics.median(lost):+.2f} | {max(lost):+.2f} |")


if __name__ == "__main__":
    main()
