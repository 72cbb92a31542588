"""What a site's variants cost: every answer a page asks of a photo, uncached, by
dynimg (decoding each large source once into its master) and by libvips
(`thumbnail` from the source for each), interleaved, on one core.

    taskset -c 1 .venv/bin/python bench/variants.py [--photos N]     (make bench)

For each large corpus photo: widths 360 480 640 800 1080 1600 x classes default,
2g, 3g, 4g x JPEG, WebP and AVIF clients x dpr 1 and 2 (where the class allows 2),
in a shuffled order that interleaves widths and sources as a site sees them. dynimg
answers through its WSGI app with an empty result cache; libvips then makes the same
answer (dynimg's size, format and encoder quality, so the same work comes out) in
its own process. Both are timed in CPU ms inside their own process. Then a sample
of the answers made from masters is scored with SSIMULACRA2 against the same
answers made from the source (no cache): what the master costs a person.

Encodes counts the encoder calls an answer took (a byte budget may need more than
one); libvips is handed dynimg's final size and quality, so it encodes once.
`--rows FILE` keeps every answer's figures as JSON.
"""

import argparse
import collections
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import dynimg  # noqa: E402
from conftest import App, write_config  # noqa: E402
from measure import BENCH_PYTHON, Scorer, corpus_dir, corpus_files  # noqa: E402

WIDTHS = (360, 480, 640, 800, 1080, 1600)
CLASSES = ("default", "2g", "3g", "4g")
CLIENTS = ("jpeg", "webp", "avif")


def variants(config, photos):
    chosen = []
    for path in photos:
        for width in WIDTHS:
            for network in CLASSES:
                for dpr in (1, 2) if config.profiles[network].max_dpr >= 2 else (1,):
                    for client in CLIENTS:
                        chosen.append((os.path.basename(path), width, network, dpr, client))
    random.Random(16).shuffle(chosen)
    return chosen


def large_photos(count):
    """The first `count` corpus photos large enough for a master."""
    def pixels(path):
        with Image.open(path) as image:
            return image.width * image.height
    return [path for path in corpus_files("photo")
            if pixels(path) >= dynimg.MASTER_MIN_PIXELS][:count]


def query(width, network, dpr, client):
    return f"width={width}&dpr={dpr}&bandwidth={network}&format={client}"


class Libvips:
    def __init__(self):
        self.process = subprocess.Popen(
            [BENCH_PYTHON, os.path.join(HERE, "vips_variant_worker.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def make(self, job):
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


class EncodeCounter:
    """Counts dynimg's encoder calls (every still answer's encodes go through _save)."""

    def __init__(self):
        self.calls, self.save = 0, dynimg._save
        dynimg._save = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.save(*args, **kwargs)

    def close(self):
        dynimg._save = self.save


def server_timing(value):
    """{name: ms} of a Server-Timing header's timed entries."""
    parts = (part.strip().split(";") for part in value.split(","))
    return {fields[0]: float(fields[-1][4:]) for fields in parts
            if fields[-1].startswith("dur=")}


def run(app, libvips, chosen):
    """A row per variant; a variant whose key an earlier one already made (800 px at
    dpr 2 is 1600 px at dpr 1) is a result-cache hit, kept as a row marked "hit"."""
    rows, keys = [], set()
    counter = EncodeCounter()
    for name, width, network, dpr, client in chosen:
        calls = counter.calls
        started = time.process_time()
        reply = app.request("/" + name, query(width, network, dpr, client))
        ms = (time.process_time() - started) * 1000
        assert reply.status == 200, (name, reply.status)
        key = reply.headers["X-Image-Key"]
        if key in keys:
            rows.append({"name": name, "width": width, "network": network, "dpr": dpr,
                         "client": client, "hit": True})
            continue
        keys.add(key)
        size = [int(side) for side in reply.headers["X-Image-Size"].split("x")]
        quality = int(reply.headers["X-Image-Quality"])
        timing = reply.headers["Server-Timing"]
        vips = libvips.make({
            "path": os.path.join(corpus_dir(), name), "width": size[0], "height": size[1],
            "format": client, "q": dynimg.encoder_quality(client, quality),
            "progressive": app.config.profiles[network].progressive
            and size[0] * size[1] >= dynimg.PROGRESSIVE_MIN_PIXELS})
        rows.append({"name": name, "width": width, "network": network, "dpr": dpr,
                     "client": client, "hit": False, "ms": ms, "bytes": len(reply.body),
                     "vips_ms": vips["ms"], "vips_bytes": vips["bytes"],
                     "size": size, "quality": quality, "encodes": counter.calls - calls,
                     "steps": server_timing(timing),
                     "master": "made" if "desc=made" in timing else
                     "kept" if "desc=kept" in timing else "none"})
    counter.close()
    return rows


def scores(cached, direct, rows):
    """SSIMULACRA2 of answers made from masters (dpr 1, default and 3g) and of the
    same answers made from the source, against the source's whole decode scaled to
    the answer's size: (lost, name, width, class, client) each."""
    scorer, lost = Scorer(), []
    for row in rows:
        if (row["hit"] or row["dpr"] != 1 or row["network"] not in ("default", "3g")
                or row["master"] == "none"):
            continue
        wanted = query(row["width"], row["network"], 1, row["client"])
        replies = [app.request("/" + row["name"], wanted) for app in (cached, direct)]
        images = [Image.open(io.BytesIO(reply.body)).convert("RGB") for reply in replies]
        whole = Image.open(os.path.join(corpus_dir(), row["name"])).convert("RGB")
        reference = whole.resize(images[1].size, Image.Resampling.LANCZOS)
        master_score, source_score = scorer.score([(reference, image) for image in images])
        lost.append((source_score - master_score, row["name"], row["width"], row["network"],
                     row["client"]))
    scorer.close()
    return lost


def avif_against_jpeg(direct, photos, repeats=5):
    """{photo: AVIF / JPEG render CPU time} of an 800 px answer from the source (an
    app without a result cache, so without masters), medians of `repeats`."""
    ratios = {}
    for path in photos:
        name = os.path.basename(path)
        medians = []
        for client in ("avif", "jpeg"):
            times = []
            for _ in range(repeats):
                started = time.process_time()
                assert direct.request("/" + name, query(800, "default", 1, client)).status == 200
                times.append(time.process_time() - started)
            medians.append(statistics.median(times))
        ratios[name] = medians[0] / medians[1]
    return ratios


def report(rows, lost, from_source):
    hits = sum(row["hit"] for row in rows)
    rows = [row for row in rows if not row["hit"]]
    by_source = collections.defaultdict(lambda: [0.0, 0.0, 0, 0])
    for row in rows:
        totals = by_source[row["name"]]
        totals[0] += row["ms"]
        totals[1] += row["vips_ms"]
        totals[2] += row["bytes"]
        totals[3] += row["vips_bytes"]
    print("\n| source | variants | dynimg CPU s | libvips CPU s | ratio | bytes, dynimg/libvips |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (ms, vips_ms, sent, vips_sent) in sorted(by_source.items()):
        count = sum(row["name"] == name for row in rows)
        print(f"| {name} | {count} | {ms / 1000:.1f} | {vips_ms / 1000:.1f} | "
              f"{ms / vips_ms:.2f} | {sent / vips_sent:.2f} |")
    print(f"| all | {len(rows)} | {sum(r['ms'] for r in rows) / 1000:.1f} | "
          f"{sum(r['vips_ms'] for r in rows) / 1000:.1f} | "
          f"{sum(r['ms'] for r in rows) / sum(r['vips_ms'] for r in rows):.2f} | |")
    print("\n| client | dynimg ms per variant (median) | libvips | ratio of totals |")
    print("|---|---:|---:|---:|")
    for client in CLIENTS:
        chosen = [row for row in rows if row["client"] == client]
        print(f"| {client} | {statistics.median(r['ms'] for r in chosen):.0f} | "
              f"{statistics.median(r['vips_ms'] for r in chosen):.0f} | "
              f"{sum(r['ms'] for r in chosen) / sum(r['vips_ms'] for r in chosen):.2f} |")
    print("\n| class | answers | encodes per answer (mean) | most | answers of 2+ encodes |")
    print("|---|---:|---:|---:|---:|")
    for network in CLASSES:
        chosen = [row["encodes"] for row in rows if row["network"] == network]
        print(f"| {network} | {len(chosen)} | {statistics.mean(chosen):.2f} | {max(chosen)} | "
              f"{sum(count > 1 for count in chosen)} |")
    print("\n| answer's long side | answers | dynimg CPU s | libvips CPU s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for low, high in ((0, dynimg.MASTER_SIDE // 2), (dynimg.MASTER_SIDE // 2, dynimg.MASTER_SIDE),
                      (dynimg.MASTER_SIDE, 1 << 30)):
        chosen = [row for row in rows if low < max(row["size"]) <= high]
        if chosen:
            ms, vips_ms = sum(r["ms"] for r in chosen), sum(r["vips_ms"] for r in chosen)
            print(f"| {low + 1}-{high if high < 1 << 30 else ''} px | {len(chosen)} | "
                  f"{ms / 1000:.1f} | {vips_ms / 1000:.1f} | {ms / vips_ms:.2f} |")
    kinds = collections.Counter(row["master"] for row in rows)
    print(f"\nanswers: {kinds['made']} made a master, {kinds['kept']} came from one, "
          f"{kinds['none']} from the source (wider than a master serves); {hits} more "
          "were the same image as an earlier variant (a cache hit), left out of both sides")
    avif = {(r["name"], r["dpr"]): r["ms"] for r in rows if r["width"] == 800 and
            r["network"] == "default" and r["client"] == "avif" and r["master"] != "made"}
    jpeg = {(r["name"], r["dpr"]): r["ms"] for r in rows if r["width"] == 800 and
            r["network"] == "default" and r["client"] == "jpeg" and r["master"] != "made"}
    common = sorted(set(avif) & set(jpeg))
    if common:
        print("AVIF / JPEG render time, 800 px default class, from the master: " + ", ".join(
            f"{name} dpr {dpr}: {avif[name, dpr] / jpeg[name, dpr]:.2f}"
            for name, dpr in common))
    print("... and from the source (no result cache, medians of 5): " + ", ".join(
        f"{name}: {ratio:.2f}" for name, ratio in from_source.items()))
    if lost:
        values = [value for value, *_ in lost]
        worst = max(lost)
        print(f"SSIMULACRA2 lost to the master over {len(lost)} answers: median "
              f"{statistics.median(values):+.2f}, worst {worst[0]:+.2f} ({worst[1:]})")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--rows", help="write every answer's figures to this JSON file")
    args = parser.parse_args()
    photos = large_photos(args.photos)
    dynimg.tune_malloc()
    with tempfile.TemporaryDirectory() as folder:
        cached = App(dynimg.load_config(write_config(os.path.join(folder, "a"), corpus_dir())))
        direct = App(dynimg.load_config(write_config(os.path.join(folder, "b"), corpus_dir(),
                                                     cache={"cache_dir": ""})))
        chosen = variants(cached.config, photos)
        print(f"{len(chosen)} variants of {len(photos)} photos "
              f"({', '.join(os.path.basename(p) for p in photos)}), one core")
        libvips = Libvips()
        rows = run(cached, libvips, chosen)
        libvips.close()
        lost = scores(cached, direct, rows)
        from_source = avif_against_jpeg(direct, photos)
    if args.rows:
        with open(args.rows, "w", encoding="utf-8") as file:
            json.dump(rows, file)
    report(rows, lost, from_source)


if __name__ == "__main__":
    main()
