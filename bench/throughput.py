"""Throughput over HTTP on 127.0.0.1: an uncached render against thumbor's (wrk), a
site's variant mix against thumbor's (bench/variants.py's variants of the large
photos, each asked once, 16 at a time: dynimg with an empty result cache, so masters
are made and used; thumbor asked for the same widths, formats and class qualities),
then with wrk a result-cache hit through dynimg (Python), a hit from Apache's cache
in front (apache/cache.conf, what `make serve` ships), the same file served
statically by the same Apache (the ceiling), and the same image through Varnish.

    .venv/bin/python bench/throughput.py [--seconds 10] [--connections 16]
    .venv/bin/python bench/throughput.py --scaling     (processes x threads)

Needs wrk, varnishd, the venv and thumbor in .venv-bench (`make bench` installs
them). Ratios are measured in the same run: hits against the static file, renders
against thumbor's; rates count 200 answers only (a quick 503 "busy" is not work done).
"""

import argparse
import collections
import concurrent.futures
import http.client
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

sys.path.insert(0, PROJECT)
import dynimg as dynimg_module  # noqa: E402

IMAGE = "photo-large-1.jpg"

#: wrk script for renders that always miss: every request a width not asked before
#: (each wrk thread takes its own), each on a new connection (thumbor's processes
#: share kept-alive ones unevenly). `path` is a Lua expression of `width`.
MISS_SCRIPT = """
threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
counter = 0
request = function()
  counter = counter + 1
  local width = 200 + 2 * counter + id
  return wrk.format("GET", {path}, {{["Connection"] = "close"}})
end
"""

#: The same requests to dynimg and to thumbor (fit to a width, any height; thumbor
#: keeps no results).
DYNIMG_MISS_PATH = f'"/images/{IMAGE}?width=" .. width'
THUMBOR_MISS_PATH = f'"/unsafe/" .. width .. "x0/{IMAGE}"'

THUMBOR_CONF = """
LOADER = "thumbor.loaders.file_loader"
FILE_LOADER_ROOT_PATH = {root!r}
STORAGE = "thumbor.storages.no_storage"
ALLOW_UNSAFE_URL = True
QUALITY = 80
"""

#: Seconds of load before each measured hit row.
WARM_UP_SECONDS = 2

#: A server finishes what it queued after wrk hangs up: a pause before the next run.
DRAIN_SECONDS = 10

BENCH_BIN = os.path.join(PROJECT, ".venv-bench", "bin")


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


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, 15)
        process.wait()


def start(command, env=None):
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)


def dynimg_config(folder, cache_dir, log_level="WARNING", cache_max_mb=1024):
    """A dynimg.ini in folder for the corpus, with this result cache ("" for none)."""
    config = os.path.join(folder, "dynimg.ini")
    with open(config, "w") as ini:
        ini.write(f"[server]\nimage_root = {corpus_dir()}\nlog_level = {log_level}\n"
                  f"not_found_image = {PROJECT}/404image.png\n"
                  f"error_image = {PROJECT}/errorimage.png\n[cache]\ncache_dir = {cache_dir}\n"
                  f"cache_max_mb = {cache_max_mb}\n")
    return config


def express_command(port, server_root, processes=2, threads=16):
    """mod_wsgi-express serving dynimg as `make serve` runs it (Apache's user when
    started as root)."""
    command = [os.path.join(PROJECT, ".venv", "bin", "mod_wsgi-express"), "start-server",
               os.path.join(PROJECT, "dynimg.wsgi"), "--host", "127.0.0.1", "--port", str(port),
               "--mount-point", "/images", "--processes", str(processes),
               "--threads", str(threads), "--max-clients", "64", "--server-root", server_root]
    if os.geteuid() == 0:
        command += ["--user", "www-data", "--group", "www-data"]
    return command


def start_dynimg(folder, port, processes=2, threads=16, front_cache=False):
    """mod_wsgi-express on `port`; servers started on one folder share its result cache."""
    cache = os.path.join(folder, "cache")
    os.makedirs(cache, exist_ok=True)
    os.chmod(cache, 0o777)
    config = dynimg_config(folder, cache)
    command = express_command(port, os.path.join(folder, f"apache-{port}"), processes,
                              threads) + ["--url-alias", "/static", cache]
    if front_cache:
        front = os.path.join(folder, f"htcache-{port}")
        os.makedirs(front)
        include = os.path.join(folder, f"front-{port}.conf")
        with open(include, "w") as conf:
            conf.write(f"Define DYNIMG_CACHE_ROOT {front}\n"
                       f"Include {PROJECT}/apache/cache.conf\n")
        command += ["--include-file", include]
        if os.geteuid() == 0:
            shutil.chown(front, "www-data", "www-data")
    process = start(command, dict(os.environ, DYNIMG_CONFIG=config))
    wait_for(f"http://127.0.0.1:{port}/images/_health")
    return process, cache


def start_thumbor(folder, port, processes=2):
    conf = os.path.join(folder, "thumbor.conf")
    with open(conf, "w") as file:
        file.write(THUMBOR_CONF.format(root=corpus_dir()))
    process = start([os.path.join(BENCH_BIN, "thumbor"), "-i", "127.0.0.1", "-p", str(port),
                     "-c", conf, "-l", "error", "--processes", str(processes)])
    wait_for(f"http://127.0.0.1:{port}/healthcheck")
    return process


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
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
               "--latency", url]
    if script:
        command[1:1] = ["-s", script]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])
    requests = int(re.search(r"(\d+) requests in", output)[1])
    refused = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if refused:  # a quick 503 ("busy") is not throughput: the rate counts answers
        rate *= 1 - int(refused[1]) / requests
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", output)
    return rate, _latency(output, "50%"), _latency(output, "99%"), errors[0] if errors else ""


def _latency(output, percentile):
    value, unit = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)", output).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]


def variant_mix_paths(config):
    """The paths asking dynimg and thumbor for a site's variants, in the order
    bench/variants.py sees them: for thumbor, the width dynimg would make at the dpr
    (no budget: thumbor has none) in the format at the class's quality, on the
    format's own scale as dynimg encodes it."""
    from variants import large_photos, query, variants
    paths = {"dynimg": [], "thumbor": []}
    chosen = variants(config, large_photos(3))
    # 800 px at dpr 2 is 1600 px at dpr 1: the same answer, a hit for dynimg
    paths["distinct"] = len({(name, width * dpr, network, client)
                             for name, width, network, dpr, client in chosen})
    for name, width, network, dpr, client in chosen:
        paths["dynimg"].append(f"/images/{name}?{query(width, network, dpr, client)}")
        quality = dynimg_module.encoder_quality(client, config.profiles[network].quality)
        paths["thumbor"].append(f"/unsafe/{width * dpr}x0/filters:format({client}):"
                                f"quality({quality})/{name}")
    return paths


def ask_all(port, paths, connections):
    """Every path asked once, `connections` at a time, each on a new connection (wrk
    cannot stop at the end of a list): (answers/s, p50 ms, p99 ms, errors)."""
    def ask(path):
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            connection.request("GET", path, headers={"Connection": "close"})
            reply = connection.getresponse()
            reply.read()
            status = reply.status
        except (OSError, http.client.HTTPException) as error:
            status = type(error).__name__
        finally:
            connection.close()
        return status, (time.monotonic() - started) * 1000
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        answers = list(pool.map(ask, paths))
    seconds = time.monotonic() - started
    times = sorted(ms for _, ms in answers)
    failed = collections.Counter(status for status, _ in answers if status != 200)
    return (sum(status == 200 for status, _ in answers) / seconds,
            times[len(times) // 2], times[int(len(times) * 0.99)],
            ", ".join(f"{count} x {status}" for status, count in failed.items()))


def scaling(args):
    """Uncached renders by processes x threads, to choose the shipped defaults."""
    print("| processes x threads | requests/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for processes, threads in ((1, 1), (1, 4), (2, 1), (2, 4), (2, 16), (4, 2)):
        folder = tempfile.mkdtemp(prefix="dynimg-bench-")
        os.chmod(folder, 0o755)
        port = free_port()
        process, _ = start_dynimg(folder, port, processes, threads)
        try:
            script = os.path.join(folder, "miss.lua")
            with open(script, "w") as file:
                file.write(MISS_SCRIPT.format(path=DYNIMG_MISS_PATH))
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
    processes, thumbor = [], None
    try:
        port, front_port, varnish_port, thumbor_port, mix_port = (free_port()
                                                                  for _ in range(5))
        dynimg, cache = start_dynimg(folder, port)
        processes.append(dynimg)
        mix_folder = os.path.join(folder, "mix")  # a result cache of its own
        os.makedirs(mix_folder)
        os.chmod(mix_folder, 0o755)
        processes.append(start_dynimg(mix_folder, mix_port)[0])
        processes.append(start_dynimg(folder, front_port, front_cache=True)[0])
        processes.append(start_varnish(folder, port, varnish_port))
        thumbor = start_thumbor(folder, thumbor_port)
        hit_url = f"http://127.0.0.1:{port}/images/{IMAGE}?width=400"
        front_url = f"http://127.0.0.1:{front_port}/images/{IMAGE}?width=400"
        key = wait_for(hit_url).headers["X-Image-Key"]
        wait_for(front_url)
        cached = next(os.path.join(root, name) for root, _, names in os.walk(cache)
                      for name in names if name.startswith(key))
        static_url = f"http://127.0.0.1:{front_port}/static/{os.path.relpath(cached, cache)}"
        scripts = {}
        for name, path in (("dynimg", DYNIMG_MISS_PATH), ("thumbor", THUMBOR_MISS_PATH)):
            scripts[name] = os.path.join(folder, f"miss-{name}.lua")
            with open(scripts[name], "w") as file:
                file.write(MISS_SCRIPT.format(path=path))
        mix = variant_mix_paths(dynimg_module.load_config(os.path.join(mix_folder,
                                                                      "dynimg.ini")))
        results = [
            ("uncached render, dynimg (fit a 20 Mpx JPEG to a new width from 202 px)",
             *wrk(f"http://127.0.0.1:{port}/", args.seconds, args.connections, scripts["dynimg"])),
        ]
        time.sleep(DRAIN_SECONDS)
        results += [
            (f"variant mix, dynimg ({len(mix['dynimg'])} variants of 3 large photos, each "
             f"once, {mix['distinct']} distinct answers, empty result cache)", *ask_all(mix_port, mix["dynimg"], args.connections)),
            ("uncached render, thumbor 7.8 (2 processes), same requests",
             *wrk(f"http://127.0.0.1:{thumbor_port}/", args.seconds, args.connections,
                  scripts["thumbor"])),
        ]
        time.sleep(DRAIN_SECONDS)
        results.append(
            ("variant mix, thumbor 7.8, same widths, formats and qualities",
             *ask_all(thumbor_port, mix["thumbor"], args.connections)))
        # thumbor finishes what it queued even after wrk hangs up: stop it before the rest
        stop(thumbor)
        runs = [
            ("result-cache hit through dynimg (Python)", hit_url, None),
            ("hit from Apache's cache in front (apache/cache.conf)", front_url, None),
            ("the same file, static, same Apache", static_url, None),
            ("through Varnish (hit)",
             f"http://127.0.0.1:{varnish_port}/images/{IMAGE}?width=400", None),
        ]
        for name, url, script in runs:
            # unmeasured first: Apache starts the children the load needs, so no
            # row pays for that (or for its kept-alive connections closed on the way)
            wrk(url, WARM_UP_SECONDS, args.connections, script)
            results.append((name, *wrk(url, args.seconds, args.connections, script)))
    finally:
        for process in processes + [thumbor] * bool(thumbor):
            stop(process)
        shutil.rmtree(folder, ignore_errors=True)
    baselines = {0: results[2][1], 2: results[2][1],  # renders: against thumbor
                 1: results[3][1], 3: results[3][1]}
    static = results[6][1]
    print(f"wrk -t2 -c{args.connections} -d{args.seconds}s on 127.0.0.1; mod_wsgi-express "
          "2 processes x 16 threads, --max-clients 64 (as make serve); ratio: renders against thumbor, the rest against "
          "the static file\n")
    print("| path | requests/s | p50 ms | p99 ms | ratio | errors |")
    print("|---|---:|---:|---:|---:|---|")
    for index, (name, rate, p50, p99, errors) in enumerate(results):
        print(f"| {name} | {rate:,.0f} | {p50:.1f} | {p99:.1f} | "
              f"{rate / baselines.get(index, static):.2f} | {errors or 'none'} |")


if __name__ == "__main__":
    main()
