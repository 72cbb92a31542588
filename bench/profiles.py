"""Bytes, quality and arrival time of each network class, on the corpus photos.

    .venv/bin/python bench/profiles.py

For each photo and each width, every class's answer is rendered by dynimg's own
pipeline (bandwidth=CLASS&width=W, dpr 1) and compared with a reference: a LANCZOS
resize of the full decode, never encoded. SSIM is luma SSIM (8×8 windows); an
answer the budget scaled down is scaled back up to the layout size first, as the
browser would. Arrival is bytes at the class's typical throughput (the Network
Information API's ECT figures; 4G taken as 4 Mbit/s, wifi as 20 Mbit/s).
"""

import io
import os
import statistics
import sys

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dynimg  # noqa: E402
from measure import corpus_files, ssim  # noqa: E402

#: Typical throughput of each class in kbit/s.
THROUGHPUT = {"slow-2g": 50, "2g": 70, "3g": 700, "4g": 4000, "wifi": 20000}
WIDTHS = (360, 800, 1600)


def main():
    config = dynimg.load_config()
    dynimg.limit_pillow()
    transforms = dynimg.LRU(dynimg.TRANSFORM_CACHE_SIZE)  # as an app keeps them
    classes = [name for name in THROUGHPUT if name in config.profiles]
    rows = {}
    encodes = []
    save = dynimg._save
    dynimg._save = lambda *args: encodes.append(1) or save(*args)
    for path in corpus_files():
        data = open(path, "rb").read()
        full = Image.open(path)
        # orient and to_srgb need only the source's facts and the transforms of a job
        job = dynimg.Job(spec=None, facts=dynimg.facts_of(full), plan=None,
                         transforms=transforms, deadline=0)
        full = dynimg.to_srgb(dynimg.orient(full.convert("RGB"), job), job)
        for width in WIDTHS:
            height = round(full.height * width / full.width)
            reference = full.resize((width, height), Image.Resampling.LANCZOS)
            for network in classes:
                request = dynimg.Request(path="/x.jpg", query=f"bandwidth={network}&width={width}")
                spec = dynimg.parse_spec(request, config)
                encodes.clear()
                rendered = dynimg.render(data, spec, config, transforms)
                rows.setdefault((network, width), []).append(
                    (len(rendered.data), rendered.quality, rendered.width,
                     ssim(reference, Image.open(io.BytesIO(rendered.data))), len(encodes)))
    print(f"{len(corpus_files())} photos; medians per class and width\n")
    print("| class | width | bytes | quality | sent width | SSIM | arrival (s) | encodes "
          "(mean, max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for (network, width), values in rows.items():
        size, quality, sent, score = (statistics.median(column) for column in list(zip(*values))[:4])
        counts = [value[4] for value in values]
        seconds = size * 8 / 1000 / THROUGHPUT[network]
        print(f"| {network} | {width} | {size:,.0f} | {quality:.0f} | {sent:.0f} | "
              f"{score:.3f} | {seconds:.1f} | {statistics.mean(counts):.1f}, {max(counts)} |")


if __name__ == "__main__":
    main()
