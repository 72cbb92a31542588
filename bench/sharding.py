"""Routing by source against round-robin, through Varnish in front of three dynimg
backends on this machine: one mix of variants of several corpus photos (many
widths, device pixel ratios and network classes per photo, interleaved), sent
once through cache/varnish.vcl as shipped (each source on one backend) and once
through the same file with its director swapped for round-robin.

    .venv/bin/python bench/sharding.py [--clients 4] [--fronts 1] [--seed 18]

Reports renders (from the backends' logs), the backends' CPU time, their result
caches' bytes on disk and the hit ratio at Varnish, with the ratios sharded /
round-robin measured in the same run. Each routing gets three new backends with
empty result caches. --fronts N spreads the requests over N Varnish instances
(cache nodes in front of the same backends), each missing on its own.

Needs varnishd and the venv (`make bench` installs them).
"""

import argparse
import http.client
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from measure import corpus_files  # noqa: E402
from throughput import (dynimg_config, express_command, free_port, start,  # noqa: E402
                        stop, wait_for)

#: Backends' ports in the shipped VCL, in order; each run puts its own there.
VCL_PORTS = ("8001", "8002", "8003")

#: Layout widths (CSS px) a page asks for, as srcset and sizes would.
WIDTHS = (200, 300, 400, 600, 800, 1200)

#: Device pixel ratio hints: none (a 1x screen, or a browser sending no hints), 2x.
DPRS = (None, "2")

#: Network classes from the ECT hint; None: no hint (the default profile).
CLASSES = (None, "3g", "4g")

#: How many times each variant is asked for, drawn from: popular sizes come back.
REPEATS = (1, 1, 2, 3, 4)

#: One request line of dynimg's log: path, status and result-cache hit or not.
LOG_LINE = re.compile(r"(?:GET|HEAD) (\S*)\?\S* (\d{3}) \d+ bytes .* cache=(\S+) key=")


def variant_mix(sources, seed):
    """(url, headers) for every variant of every source, each one to four times,
    shuffled so sources, sizes and classes interleave."""
    rng = random.Random(seed)
    requests = []
    for source, width, dpr, network in itertools.product(sources, WIDTHS, DPRS, CLASSES):
        headers = {name: value for name, value in (("DPR", dpr), ("ECT", network)) if value}
        requests += [(f"/images/{source}?width={width}", headers)] * rng.choice(REPEATS)
    rng.shuffle(requests)
    return requests


def start_backend(folder, port):
    """mod_wsgi-express on `port` as `make serve` runs it (2 processes x 16 threads),
    with a result cache of its own and its request lines in folder/server.log."""
    cache = os.path.join(folder, "cache")
    os.makedirs(cache)
    os.chmod(cache, 0o777)
    config = dynimg_config(folder, cache, log_level="INFO")
    command = express_command(port, os.path.join(folder, "apache")) + ["--log-to-terminal"]
    log = open(os.path.join(folder, "server.log"), "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env=dict(os.environ, DYNIMG_CONFIG=config),
                               start_new_session=True)
    log.close()
    wait_for(f"http://127.0.0.1:{port}/images/_health")
    return process


def routed_vcl(routing, ports):
    """The shipped VCL on these ports; for round-robin, its director swapped."""
    with open(os.path.join(PROJECT, "cache", "varnish.vcl")) as source:
        vcl = source.read()
    for default, port in zip(VCL_PORTS, ports, strict=True):
        assert f'.port = "{default}";' in vcl, f"no backend on port {default} in the VCL"
        vcl = vcl.replace(f'.port = "{default}";', f'.port = "{port}";')
    if routing == "round-robin":
        vcl, directors = re.subn(r"directors\.shard\(\)", "directors.round_robin()", vcl)
        vcl, fetches = re.subn(r"sub vcl_backend_fetch \{.*?\n\}",
                               "sub vcl_backend_fetch {\n    set bereq.backend = "
                               "dynimg.backend();\n}", vcl, flags=re.S)
        assert directors == fetches == 1, "the VCL's director is not where it was"
    return vcl


def start_varnish(folder, vcl):
    """varnishd with this VCL, once its probe has found every backend healthy."""
    path = os.path.join(folder, "dynimg.vcl")
    with open(path, "w") as file:
        file.write(vcl)
    port, work = free_port(), os.path.join(folder, "varnish")
    command = ["varnishd", "-F", "-n", work, "-a", f"127.0.0.1:{port}", "-f", path,
               "-s", "malloc,512m", "-T", "none"]
    if os.geteuid() == 0:
        command[1:1] = ["-j", "none"]
    process = start(command)
    wait_for(f"http://127.0.0.1:{port}/images/_health")
    names = set(re.findall(r"^backend (\w+)", vcl, re.M))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = subprocess.run(["varnishlog", "-d", "-n", work, "-g", "raw",
                              "-i", "Backend_health"], capture_output=True, text=True).stdout
        if names <= set(re.findall(r"Backend_health - (\w+) Went healthy", log)):
            return process, port
        time.sleep(0.5)
    stop(process)
    raise RuntimeError("Varnish did not find every backend healthy")


def session_cpu(session):
    """CPU seconds of every process in a session (Apache and its children, waited-for
    ones included through their parent)."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            total += sum(int(value) for value in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def disk_bytes(folder):
    """Bytes on disk (blocks) of the files in a result cache, its lock files aside."""
    total = 0
    for path, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if name != ".locks"]
        total += sum(os.stat(os.path.join(path, name)).st_blocks * 512 for name in names)
    return total


def send(requests, ports, clients):
    """The requests through the fronts (request i to front i mod N) by `clients`
    threads on kept-alive connections; returns the X-Cache values and any failures."""
    queue = iter(enumerate(requests))
    lock, caches, failures = threading.Lock(), [], []

    def client():
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                       for port in ports]
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                break
            index, (url, headers) = item
            connection = connections[index % len(ports)]
            connection.request("GET", url, headers=headers)
            response = connection.getresponse()
            response.read()
            with lock:
                caches.append(response.headers.get("X-Cache"))
                if response.status != 200:
                    failures.append((url, headers, response.status))
        for connection in connections:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return caches, failures


def run(routing, requests, args):
    """One routing: three new backends, the fronts, the mix; its figures."""
    folder = tempfile.mkdtemp(prefix=f"dynimg-sharding-{routing}-")
    os.chmod(folder, 0o755)
    backends, fronts = [], []
    try:
        ports = [free_port() for _ in VCL_PORTS]
        for index, port in enumerate(ports):
            backend = os.path.join(folder, f"backend{index + 1}")
            os.makedirs(backend)
            os.chmod(backend, 0o755)
            backends.append((start_backend(backend, port), backend))
        vcl = routed_vcl(routing, ports)
        for index in range(args.fronts):
            front = os.path.join(folder, f"varnish{index + 1}")
            os.makedirs(front)
            fronts.append(start_varnish(front, vcl))
        cpu_before = sum(session_cpu(process.pid) for process, _ in backends)
        started = time.monotonic()
        caches, failures = send(requests, [port for _, port in fronts], args.clients)
        wall = time.monotonic() - started
        cpu = sum(session_cpu(process.pid) for process, _ in backends) - cpu_before
        renders = 0
        for _, backend in backends:
            with open(os.path.join(backend, "server.log"), errors="replace") as log:
                renders += sum(1 for path, status, cache in LOG_LINE.findall(log.read())
                               if status == "200" and cache == "-" and not path.startswith("/_"))
        cache_bytes = sum(disk_bytes(os.path.join(backend, "cache")) for _, backend in backends)
    finally:
        for process, _ in fronts + backends:
            stop(process)
        shutil.rmtree(folder, ignore_errors=True)
    if failures:
        print(f"{routing}: {len(failures)} requests failed, first {failures[:3]}",
              file=sys.stderr)
    return {"requests": len(caches), "hit ratio": caches.count("hit") / len(caches),
            "renders": renders, "cpu": cpu, "cache": cache_bytes, "wall": wall,
            "failed": len(failures)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--fronts", type=int, default=1, help="Varnish instances in front")
    parser.add_argument("--seed", type=int, default=18, help="of the mix's order and repeats")
    args = parser.parse_args()
    sources = [os.path.basename(path) for path in corpus_files("photo")]
    requests = variant_mix(sources, args.seed)
    for path in corpus_files("photo"):
        with open(path, "rb") as file:  # both routings find the sources in the page cache
            file.read()
    results = {routing: run(routing, requests, args) for routing in ("sharded", "round-robin")}
    variants = len(set((url, tuple(sorted(headers.items()))) for url, headers in requests))
    print(f"{len(sources)} corpus photos ({', '.join(sources)}); widths "
          f"{', '.join(map(str, WIDTHS))} x DPR hint none/2 x ECT none/3g/4g: {variants} "
          f"variants, {len(requests)} requests in a shuffled order (seed {args.seed}), "
          f"{args.clients} clients, {args.fronts} Varnish; three backends of 2 processes x "
          f"16 threads on this {os.cpu_count()}-core machine\n")
    print("| routing | requests | hit ratio at Varnish | renders | backend CPU s | "
          "result caches MB | wall s | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for routing, figures in results.items():
        print(f"| {routing} | {figures['requests']} | {figures['hit ratio']:.3f} | "
              f"{figures['renders']} | {figures['cpu']:.1f} | "
              f"{figures['cache'] / 1048576:.1f} | {figures['wall']:.1f} | "
              f"{figures['failed']} |")
    sharded, spread = results["sharded"], results["round-robin"]
    print(f"| sharded / round-robin | | {sharded['hit ratio'] / spread['hit ratio']:.2f} | "
          f"{sharded['renders'] / spread['renders']:.2f} | {sharded['cpu'] / spread['cpu']:.2f} | "
          f"{sharded['cache'] / spread['cache']:.2f} | {sharded['wall'] / spread['wall']:.2f} | |")


if __name__ == "__main__":
    main()
