"""Throughput over HTTP on 127.0.0.1, with wrk: an uncached render, a result-cache hit
through dynimg under mod_wsgi-express, the same cached file served statically by the
same Apache (the ceiling), and the same image through Varnish in front.

    .venv/bin/python bench/throughput.py [--seconds 10] [--connections 16]

Needs wrk, varnishd and the venv (`make test` installs them). Ratios are against the
static file, measured in the same run.
"""

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from measure import corpus_dir  # noqa: E402

IMAGE = "photo-large-2.jpg"

#: wrk script for renders that always miss: every request a width not asked before.
MISS_SCRIPT = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/images/%s?width=" .. (200 + counter))
end
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def start(command, env=None):
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)


def start_dynimg(folder, port, processes=2, threads=4):
    cache = os.path.join(folder, "cache")
    os.makedirs(cache, exist_ok=True)
    os.chmod(cache, 0o777)
    config = os.path.join(folder, "dynimg.ini")
    with open(config, "w") as ini:
        ini.write(f"[server]\nimage_root = {corpus_dir()}\nlog_level = WARNING\n"
                  f"not_found_image = {PROJECT}/404image.png\n"
                  f"error_image = {PROJECT}/errorimage.png\n[cache]\ncache_dir = {cache}\n")
    command = [os.path.join(PROJECT, ".venv", "bin", "mod_wsgi-express"), "start-server",
               os.path.join(PROJECT, "dynimg.wsgi"), "--host", "127.0.0.1", "--port", str(port),
               "--mount-point", "/images", "--processes", str(processes),
               "--threads", str(threads), "--server-root", os.path.join(folder, "apache"),
               "--url-alias", "/static", cache]
    if os.geteuid() == 0:
        command += ["--user", "www-data", "--group", "www-data"]
    process = start(command, dict(os.environ, DYNIMG_CONFIG=config))
    wait_for(f"http://127.0.0.1:{port}/images/_health")
    return process, cache


def start_varnish(folder, backend_port, port):
    with open(os.path.join(PROJECT, "cache", "varnish.vcl")) as source:
        vcl = re.sub(r'\.port = "\d+";', f'.port = "{backend_port}";', source.read())
    path = os.path.join(folder, "dynimg.vcl")
    with open(path, "w") as file:
        file.write(vcl)
    command = ["varnishd", "-F", "-n", os.path.join(folder, "varnish"), "-a",
               f"127.0.0.1:{port}", "-f", path, "-s", "malloc,256m", "-T", "none"]
    if os.geteuid() == 0:
        command[1:1] = ["-j", "none"]
    process = start(command)
    wait_for(f"http://127.0.0.1:{port}/images/_health")
    return process


def wrk(url, seconds, connections, script=None):
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script:
        command[1:1] = ["-s", script]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    return rate, _latency(output, "50%"), _latency(output, "99%"), errors[0] if errors else ""


def _latency(output, percentile):
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", output).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def scaling(args):
    """Uncached renders by processes x threads, to choose the shipped defaults."""
    print("| processes x threads | requests/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for processes, threads in ((1, 1), (1, 4), (2, 1), (2, 4), (4, 2)):
        folder = tempfile.mkdtemp(prefix="dynimg-bench-")
        os.chmod(folder, 0o755)
        port = free_port()
        process, _ = start_dynimg(folder, port, processes, threads)
        try:
            script = os.path.join(folder, "miss.lua")
            with open(script, "w") as file:
                file.write(MISS_SCRIPT % IMAGE)
            rate, p50, p99, _ = wrk(f"http://127.0.0.1:{port}/", args.seconds,
                                    args.connections, script)
        finally:
            os.killpg(process.pid, 15)
            process.wait()
            shutil.rmtree(folder, ignore_errors=True)
        print(f"| {processes} x {threads} | {rate:.1f} | {p50:.0f} | {p99:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--scaling", action="store_true",
                        help="only measure uncached renders by processes x threads")
    args = parser.parse_args()
    if args.scaling:
        return scaling(args)
    folder = tempfile.mkdtemp(prefix="dynimg-bench-")
    os.chmod(folder, 0o755)
    processes = []
    try:
        port, varnish_port = free_port(), free_port()
        dynimg, cache = start_dynimg(folder, port)
        processes.append(dynimg)
        processes.append(start_varnish(folder, port, varnish_port))
        hit_url = f"http://127.0.0.1:{port}/images/{IMAGE}?width=400"
        key = wait_for(hit_url).headers["X-Image-Key"]
        cached = next(os.path.join(root, name) for root, _, names in os.walk(cache)
                      for name in names if name.startswith(key))
        static_url = f"http://127.0.0.1:{port}/static/{os.path.relpath(cached, cache)}"
        script = os.path.join(folder, "miss.lua")
        with open(script, "w") as file:
            file.write(MISS_SCRIPT % IMAGE)
        runs = [
            ("uncached render (400-1200 px of a 12 Mpx JPEG)", f"http://127.0.0.1:{port}/", script),
            ("result-cache hit through dynimg", hit_url, None),
            ("the same file, static, same Apache", static_url, None),
            ("through Varnish (hit)",
             f"http://127.0.0.1:{varnish_port}/images/{IMAGE}?width=400", None),
        ]
        results = [(name, *wrk(url, args.seconds, args.connections, script))
                   for name, url, script in runs]
    finally:
        for process in processes:
            os.killpg(process.pid, 15)
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)
    static = results[2][1]
    print(f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1; mod_wsgi-express "
          "2 processes x 4 threads; ratio: against the static file\n")
    print("| path | requests/s | p50 ms | p99 ms | ratio | errors |")
    print("|---|---:|---:|---:|---:|---|")
    for name, rate, p50, p99, errors in results:
        print(f"| {name} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | {rate / static:.2f} | "
              f"{errors or 'none'} |")


if __name__ == "__main__":
    main()
