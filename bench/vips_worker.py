"""Times libvips `thumbnail` + `jpegsave` (pyvips) on files; run in the bench venv.

    .venv-bench/bin/python bench/vips_worker.py BOX OUTPUT_DIR FILE...

Prints one JSON object: {file: milliseconds}; writes each output as OUTPUT_DIR/NAME.jpg.
"""

import json
import os
import sys
import time

import pyvips

box, output_dir, files = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pyvips.cache_set_max(0)  # each round decodes afresh, like a cache miss
pyvips.concurrency_set(1)  # one core, as the others get
timings = {}
for path in files:
    with open(path, "rb") as file:
        data = file.read()
    started = time.perf_counter()
    image = pyvips.Image.thumbnail_buffer(data, box, height=box)
    output = image.jpegsave_buffer(Q=80)
    timings[path] = (time.perf_counter() - started) * 1000
    with open(os.path.join(output_dir, os.path.basename(path) + ".jpg"), "wb") as out:
        out.write(output)
print(json.dumps(timings))
