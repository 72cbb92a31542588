"""Times libvips `thumbnail` + `jpegsave` (pyvips); run in the bench venv.

    .venv-bench/bin/python bench/vips_worker.py

Reads one request a line on stdin, "BOX FILE OUTPUT", renders FILE to fit BOX x BOX
at JPEG q80, writes OUTPUT, and answers with the milliseconds on stdout. Staying up
between requests lets the caller interleave libvips with its other paths image by
image, so both see the same moment of a noisy machine.
"""

import sys
import time

import pyvips

pyvips.cache_set_max(0)  # each request decodes afresh, like a cache miss
pyvips.concurrency_set(1)  # one core, as the others get
warmed = False
for line in sys.stdin:
    box, path, output_path = line.rstrip("\n").split(" ", 2)
    with open(path, "rb") as file:
        data = file.read()
    if not warmed:  # libvips loads its JPEG support and sets up on first use
        pyvips.Image.thumbnail_buffer(data, int(box), height=int(box)).jpegsave_buffer(Q=80)
        warmed = True
    started = time.perf_counter()
    image = pyvips.Image.thumbnail_buffer(data, int(box), height=int(box))
    output = image.jpegsave_buffer(Q=80)
    milliseconds = (time.perf_counter() - started) * 1000
    with open(output_path, "wb") as out:
        out.write(output)
    print(f"{milliseconds:.3f}", flush=True)
