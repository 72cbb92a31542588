"""Memory under sustained uncached renders: does a daemon process's RSS stay bounded
and flat? mod_wsgi-express as `make serve` runs it (2 processes x 16 threads), no
result cache (every request renders), wrk asking for the corpus's large photos at
widths from 200 to 2400 px, 16 connections.

    .venv/bin/python bench/soak.py [--minutes 10]      (make soak)

Samples each daemon process's RSS every few seconds and prints, per process: peak
RSS (VmHWM), the median RSS of the first and the last fifth of the run, and the
growth between them.
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

from throughput import (dynimg_config, express_command, free_port, start,  # noqa: E402
                        stop, wait_for)

#: Every request a render: the large photos in turn, each at a width of its own.
SOAK_SCRIPT = """
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    seconds = round(args.minutes * 60)
    folder = tempfile.mkdtemp(prefix="dynimg-soak-")
    os.chmod(folder, 0o755)
    port = free_port()
    config = dynimg_config(folder, "")
    command = express_command(port, os.path.join(folder, "apache"))
    server = start(command, dict(os.environ, DYNIMG_CONFIG=config))
    try:
        wait_for(f"http://127.0.0.1:{port}/images/_health")
        script = os.path.join(folder, "soak.lua")
        with open(script, "w") as file:
            file.write(SOAK_SCRIPT)
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
    finally:
        stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)[1]
    requests = re.search(r"(\d+) requests in", output)[1]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    print(f"{args.minutes:g} minutes of uncached renders: {requests} requests, {rate} req/s, "
          f"{errors[0] if errors else 'no errors'}; RSS sampled every {SAMPLE_SECONDS} s\n")
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
