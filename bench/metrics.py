"""What /_metrics tells, and what counting costs, on a real mod_wsgi-express with
two daemon processes.

    .venv/bin/python bench/metrics.py [--seconds 8] [--svg docs/metrics-saved.svg]

1. A page of the corpus photos at 640 CSS px with format=auto (as Chromium asks:
   AVIF and WebP accepted), seen by a browser of each network class twice (the
   second time from the result cache), then revalidated (304s); then the scrape,
   as a table of bytes sent against the source files' bytes by class, and as a
   bar chart (an SVG written by hand: no plotting library) with --svg.
2. Result-cache hits under wrk with metrics kept in the run folder and with
   `[metrics] run_dir` empty (each process counts in memory only), two runs
   each in a balanced order: requests/s and their ratio.
3. A sum over 2, 16 and 256 process files, as one scrape reads them.
"""

import argparse
import http.client
import os
import shutil
import sys
import tempfile
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, PROJECT)

import dynimg  # noqa: E402
from measure import corpus_files  # noqa: E402
from throughput import (dynimg_config, express_command, free_port, start, stop,  # noqa: E402
                        wait_for, wrk)

#: The classes a page is seen in, as the demo page shows them.
CLASSES = ("default", "save-data", "slow-2g", "2g", "3g", "4g", "wifi")

#: Runs of the hit rate with metrics files ("run") and without (""), in this order.
ORDER = ("", "run", "run", "")

#: What Chromium's Accept says for an image.
ACCEPT = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"


def start_server(folder, run_dir):
    """mod_wsgi-express, 2 processes x 16 threads, counting into run_dir ("" for none)."""
    cache = os.path.join(folder, "cache")
    for path in (cache, run_dir):
        if path:
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o777)
    config = dynimg_config(folder, cache)
    with open(config, "a") as ini:
        ini.write(f"[metrics]\nrun_dir = {run_dir}\n")
    port = free_port()
    process = start(express_command(port, os.path.join(folder, f"apache-{port}")),
                    dict(os.environ, DYNIMG_CONFIG=config))
    wait_for(f"http://127.0.0.1:{port}/images/_health")
    return process, port


def get(port, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("GET", path, headers=headers or {})
        reply = connection.getresponse()
        reply.read()
        return reply
    finally:
        connection.close()


def browse(port):
    """Each class sees the page twice, then revalidates it."""
    names = [os.path.basename(path) for path in corpus_files("photo")]
    for network in CLASSES:
        etags = [get(port, f"/images/{name}?width=640&format=auto&bandwidth={network}",
                     {"Accept": ACCEPT}).getheader("ETag") for name in names]
        for name in names:
            get(port, f"/images/{name}?width=640&format=auto&bandwidth={network}",
                {"Accept": ACCEPT})
        for name, etag in zip(names, etags):
            get(port, f"/images/{name}?width=640&format=auto&bandwidth={network}",
                {"Accept": ACCEPT, "If-None-Match": etag})
    return len(names)


def scrape(port, seconds=10):
    """The summary of /_metrics once both processes have written their files."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        time.sleep(dynimg.METRICS_FLUSH_SECONDS * 1.5)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/images/_metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        if text == last:
            break
        last = text
    counts = {}
    for line in last.splitlines():
        if line and not line.startswith("#"):
            sample, value = line.rsplit(" ", 1)
            name, _, labels = sample.partition("{")
            values = tuple(part.split("=", 1)[1].strip('"')
                           for part in labels.rstrip("}").split(",") if part)
            counts[name, values] = float(value)
    return dynimg.summarize_metrics(counts)


def print_table(summary, photos):
    print(f"{photos} photos at 640 CSS px, format=auto, each class twice then 304s; "
          f"{summary['renders']:.0f} renders, {summary['cache_hits']:.0f} result-cache hits\n")
    print("| class | requests | bytes sent | source bytes | saved | sent / source "
          "| sent / default's |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    default = summary["classes"]["default"]["sent_bytes"]
    for network in CLASSES:
        figures = summary["classes"][network]
        print(f"| {network} | {figures['requests']:.0f} | {figures['sent_bytes']:,.0f} | "
              f"{figures['source_bytes']:,.0f} | {figures['saved_bytes']:,.0f} | "
              f"{figures['sent_bytes'] / figures['source_bytes']:.4f} | "
              f"{figures['sent_bytes'] / default:.2f} |")


def write_svg(summary, path):
    """Bytes sent per class for one view of the page as bars (each class saw it twice)."""
    rows = [(network, summary["classes"][network]) for network in CLASSES]
    widest = max(figures["sent_bytes"] for _, figures in rows)
    bars = []
    for index, (network, figures) in enumerate(rows):
        y = 30 + index * 26
        length = 360 * figures["sent_bytes"] / widest
        saved = figures["saved_bytes"] / figures["source_bytes"]
        bars.append(f'<text x="70" y="{y + 14}" text-anchor="end">{network}</text>'
                    f'<rect x="80" y="{y}" width="{length:.1f}" height="18" fill="#4a7ab5"/>'
                    f'<text x="{86 + length:.1f}" y="{y + 14}">'
                    f'{figures["sent_bytes"] / 2000:,.0f} kB, {saved:.1%} saved</text>')
    source = rows[0][1]["source_bytes"] / 2  # two views a class
    height = 40 + len(rows) * 26
    with open(path, "w", encoding="utf-8") as file:
        file.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="640" height="{height}" '
                   f'font-family="sans-serif" font-size="12">'
                   f'<text x="10" y="16" font-weight="bold">One page of photos at 640 CSS px '
                   f'as each network class receives it (the sources: {source / 1e6:,.1f} MB)'
                   f'</text>'
                   + "".join(bars) + "</svg>\n")


def hit_rate(folder, run_dir, seconds):
    process, port = start_server(folder, run_dir)
    try:
        path = "/images/photo-medium-1.jpg?width=300"
        get(port, path)
        wrk(f"http://127.0.0.1:{port}{path}", 2, 16)  # warm up
        return wrk(f"http://127.0.0.1:{port}{path}", seconds, 16)[0]
    finally:
        stop(process)


def sum_cost():
    folder = tempfile.mkdtemp(prefix="dynimg-bench-run-")
    try:
        server = dynimg.process_tag(os.getppid())
        me = dynimg.process_tag(os.getpid())
        rows = [[name, list(labels), 12345] for name, labels in
                [("dynimg_requests_total", (status, network)) for status in ("200", "304", "404")
                 for network in CLASSES]
                + [("dynimg_sent_bytes_total", (network, kind)) for network in CLASSES
                   for kind in ("jpeg", "webp", "avif")]]
        written = 0
        for files in (2, 16, 256):
            for number in range(written, files):
                dynimg._write_json(os.path.join(folder, f"{server}.{me}-{number:x}a.json"),
                                   {"counts": rows})
            written = files
            seconds = min(timeit.repeat(lambda: dynimg.sum_metrics(folder, server),
                                        number=10, repeat=5)) / 10
            print(f"| {files} | {seconds * 1000:.2f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="wrk seconds a row")
    parser.add_argument("--svg", help="write the bytes-by-class chart here")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="dynimg-bench-metrics-")
    os.chmod(folder, 0o755)
    try:
        process, port = start_server(os.path.join(folder, "page"), os.path.join(folder, "run"))
        try:
            photos = browse(port)
            summary = scrape(port)
        finally:
            stop(process)
        print_table(summary, photos)
        if args.svg:
            write_svg(summary, args.svg)
        rates = {"": [], "run": []}
        for index, run in enumerate(ORDER):  # balanced, as the machine's load drifts
            where = os.path.join(folder, f"hits-{index}")
            rates[run].append(hit_rate(where, run and os.path.join(where, run), args.seconds))
        counted, uncounted = sum(rates["run"]), sum(rates[""])
        print("\n| result-cache hits, requests/s | runs | mean |\n|---|---|---:|")
        for run, name in (("run", "metrics in the run folder"), ("", "in memory only")):
            print(f"| {name} | {', '.join(f'{rate:,.0f}' for rate in rates[run])} | "
                  f"{sum(rates[run]) / len(rates[run]):,.0f} |")
        print(f"| **ratio** | | **{counted / uncounted:.2f}** |")
        print("\n| process files | one sum, ms |\n|---:|---:|")
        sum_cost()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
