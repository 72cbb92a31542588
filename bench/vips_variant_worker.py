"""libvips's side of bench/variants.py; run in the bench venv.

Reads one JSON job a line on stdin ({"path", "width", "height", "format", "q",
"progressive"}), makes that answer from the source with `thumbnail` and the format's
saver, and answers with the CPU milliseconds it took and the bytes made.
"""

import json
import sys
import time

import pyvips

pyvips.cache_set_max(0)  # each answer decodes its source afresh, like a miss
pyvips.concurrency_set(1)  # one core, as dynimg's render gets

SAVERS = {
    "jpeg": lambda image, job: image.jpegsave_buffer(
        Q=job["q"], optimize_coding=True, interlace=job["progressive"]),
    "webp": lambda image, job: image.webpsave_buffer(Q=job["q"]),
    # effort 0: libaom's fastest, near dynimg's SVT-AV1 preset in CPU (the default,
    # effort 4, takes ~30x as long)
    "avif": lambda image, job: image.heifsave_buffer(Q=job["q"], compression="av1",
                                                     effort=0),
}

for line in sys.stdin:
    job = json.loads(line)
    with open(job["path"], "rb") as file:
        data = file.read()
    started = time.process_time()
    image = pyvips.Image.thumbnail_buffer(data, job["width"], height=job["height"],
                                          size="force")
    output = SAVERS[job["format"]](image, job)
    milliseconds = (time.process_time() - started) * 1000
    print(json.dumps({"ms": milliseconds, "bytes": len(output)}), flush=True)
