"""Memory under sustained renders: does a daemon process's RSS stay bounded and
flat? mod_wsgi-express as `make serve` runs it (2 processes x 16 threads), wrk with
16 connections, one of two mixes:

- variants (the default, `make soak`): a site's variants of the corpus's large
  photos, each request a width from 200 to 2400 px, a class (default, 2g, 3g,
  4g), a client (taking AVIF, WebP or JPEG; format=auto) and a dpr of its own,
  with a result cache of 64 MB, so masters are made, rendered from and trimmed
  with the results (--formats narrows the clients);
- sources: no result cache, every request a render from the source, the large
  photos and a PNG, a TIFF and a WebP at widths from 200 to 2400 px.

    .venv/bin/python bench/soak.py [--minutes 10] [--mix variants|sources] [--formats avif,webp,jpeg]

Samples each daemon process's RSS every few seconds and prints, per process: peak
RSS (VmHWM), the median RSS of the first and the last fifth of the run, and the
growth between them; with the cache, what it holds at the end against its bound.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

sys.path.insert(0, PROJECT)
import dynimg  # noqa: E402
sys.path.insert(0, os.path.join(PROJECT, "tests"))
from test_load import STATUS_TALLY  # noqa: E402
from throughput import (dynimg_config, express_command, free_port, start,  # noqa: E402
                        stop, wait_for)

#: A site's variants: each request a large photo, a width, a class, a client (its
#: Accept, with format=auto) and a dpr of its own (a few repeat after a while, as
#: cache hits do on a site).
VARIANTS_SCRIPT = """
names = {"photo-large-1.jpg", "photo-large-2.jpg", "photo-large-3.jpg",
         "photo-large-portrait.jpg", "photo-phone.jpg"}
classes = {"default", "2g", "3g", "4g"}
formats = {FORMATS}
-- browsers' Accept: format=auto answers as they would be answered
accepts = {avif = "image/avif,image/webp,*/*", webp = "image/webp,*/*", jpeg = "*/*"}
counter = 0
request = function()
  counter = counter + 1
  local n = counter * 2 + id  -- the two wrk threads take turns through one sequence
  local name = names[n % #names + 1]
  local width = 200 + (n * 37) % 2200
  local query = "width=" .. width .. "&bandwidth=" .. classes[n % #classes + 1]
                .. "&format=auto&dpr=" .. (n % 7 == 0 and 2 or 1)
  local accept = accepts[formats[n % #formats + 1]]
  return wrk.format("GET", "/images/" .. name .. "?" .. query,
                    {["Connection"] = "close", ["Accept"] = accept})
end
""" + STATUS_TALLY

#: The result cache's bound in the variants mix: small, so it trims under the load.
VARIANTS_CACHE_MB = 64

#: Every request a render: the large photos in turn, each at a width of its own.
SOURCES_SCRIPT = """
names = {"photo-large-1.jpg", "photo-large-2.jpg", "photo-large-3.jpg",
         "photo-large-portrait.jpg", "photo-phone.jpg", "photo-medium.png",
         "panorama.tif", "webp-lossy.webp"}
counter = 0
request = function()
  counter = counter + 1
  local name = names[counter % #names + 1]
  local width = 200 + (counter * 37) % 2200
  return wrk.format("GET", "/images/" .. name .. "?width=" .. width,
                    {["Connection"] = "close"})
end
"""

SAMPLE_SECONDS = 5


def daemon_pids(port):
    lines = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in lines.splitlines()
            if f"(wsgi:127.0.0.1:{port}:" in line]


def memory_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        text = status.read()
    return (int(re.search(r"VmRSS:\s+(\d+) kB", text)[1]) / 1024,
            int(re.search(r"VmHWM:\s+(\d+) kB", text)[1]) / 1024)


def cache_contents(cache):
    """(results, masters, bytes on disk) of the entries in the result cache folder
    (an entry trimmed while this looks is skipped)."""
    results = masters = size = 0
    for root, folders, names in os.walk(cache):
        folders[:] = [folder for folder in folders if not folder.startswith(".")]
        for name in names:
            if dynimg.CacheEntry.parse(name) is None:
                continue  # locks, figures, files being written
            path = os.path.join(root, name)
            try:
                size += os.lstat(path).st_blocks * 512
                with open(path, "rb") as file:
                    head = file.read(4096)
            except FileNotFoundError:
                continue
            if b"dynimg master of" in head:
                masters += 1
            else:
                results += 1
    return results, masters, size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--mix", choices=("variants", "sources"), default="variants")
    parser.add_argument("--formats", default="jpeg,webp,avif",
                        help="the variants mix's formats, comma-separated")
    args = parser.parse_args()
    seconds = round(args.minutes * 60)
    folder = tempfile.mkdtemp(prefix="dynimg-soak-")
    os.chmod(folder, 0o755)
    port = free_port()
    cache = os.path.join(folder, "cache") if args.mix == "variants" else ""
    if cache:
        os.makedirs(cache)
        os.chmod(cache, 0o777)
    config = dynimg_config(folder, cache, cache_max_mb=VARIANTS_CACHE_MB)
    command = express_command(port, os.path.join(folder, "apache"))
    server = start(command, dict(os.environ, DYNIMG_CONFIG=config))
    try:
        wait_for(f"http://127.0.0.1:{port}/images/_health")
        script = os.path.join(folder, "soak.lua")
        with open(script, "w") as file:
            file.write(VARIANTS_SCRIPT.replace("FORMATS", ", ".join(
                f'"{name}"' for name in args.formats.split(","))) if cache else SOURCES_SCRIPT)
        load = subprocess.Popen(["wrk", "-t2", "-c16", f"-d{seconds}s", "--timeout", "30s",
                                 "-s", script, f"http://127.0.0.1:{port}/"],
                                stdout=subprocess.PIPE, text=True)
        samples = {}  # pid: [(seconds since start, rss)]
        started = time.monotonic()
        while load.poll() is None:
            for pid in daemon_pids(port):
                try:
                    samples.setdefault(pid, []).append(
                        (time.monotonic() - started, memory_mb(pid)[0]))
                except (OSError, TypeError):
                    pass  # the process just went away
            time.sleep(SAMPLE_SECONDS)
        output = load.communicate()[0]
        peaks = {pid: memory_mb(pid)[1] for pid in daemon_pids(port)}
        held = cache_contents(cache) if cache else None
    finally:
        stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)[1]
    requests = re.search(r"(\d+) requests in", output)[1]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    statuses = ", ".join(f"{count} x {status}" for status, count in
                         sorted(re.findall(r"status (\d+) (\d+)", output)) if status != "200")
    print(f"{args.minutes:g} minutes of the {args.mix} mix: {requests} requests, {rate} req/s, "
          f"{errors[0] if errors else 'no errors'}{f' ({statuses})' if statuses else ''}; "
          f"RSS sampled every {SAMPLE_SECONDS} s\n")
    if held:
        print(f"result cache at the end: {held[0]} results and {held[1]} masters, "
              f"{held[2] / 2 ** 20:.1f} MB on disk, bound {VARIANTS_CACHE_MB} MB\n")
    print("| daemon process | peak RSS MB | first fifth MB | last fifth MB | growth MB |")
    print("|---|---:|---:|---:|---:|")
    for pid, series in samples.items():
        fifth = max(1, len(series) // 5)
        first = statistics.median(rss for _, rss in series[:fifth])
        last = statistics.median(rss for _, rss in series[-fifth:])
        peak = peaks.get(pid, max(rss for _, rss in series))
        print(f"| {pid} | {peak:.0f} | {first:.0f} | {last:.0f} | {last - first:+.0f} |")
    minutes = sorted({int(at // 60) for series in samples.values() for at, _ in series})
    print("\nmedian RSS MB by minute, per process:\n")
    print("| minute | " + " | ".join(str(pid) for pid in samples) + " |")
    print("|---:|" + "---:|" * len(samples))
    for minute in minutes:
        cells = [statistics.median([rss for at, rss in series if int(at // 60) == minute] or [0])
                 for series in samples.values()]
        print(f"| {minute + 1} | " + " | ".join(f"{cell:.0f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
