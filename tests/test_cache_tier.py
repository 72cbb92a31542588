"""The cache tier, for real: varnishd and nginx with the shipped cache/ configs in
front of three mod_wsgi-express backends on 127.0.0.1."""

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import dynimg
from conftest import (IS_ROOT, PROJECT, ModWsgiExpress, free_port, http_request,
                      shared_tempdir, stop, write_config)

#: Backends' max-age in these tests, so cached copies go stale within a test.
MAX_AGE = 3


#: The backends' ports in the shipped configs, in order; the tests put theirs there.
CONFIG_PORTS = ("8001", "8002", "8003")

#: One request line of dynimg's log: path, query, status and result-cache hit or not.
LOG_LINE = re.compile(r"(?:GET|HEAD) (\S*)\?(\S*) (\d{3}) \d+ bytes .* cache=(\S+) key=")


class Backends:
    """As many dynimg backends as the shipped configs name, sharing one image root,
    each with its own log and result cache."""

    def __init__(self, image_root, count=len(CONFIG_PORTS)):
        self.folders = [shared_tempdir("dynimg-backend-") for _ in range(count)]
        self.configs = [write_config(folder, image_root,
                                     server={"cache_max_age": str(MAX_AGE)})
                        for folder in self.folders]
        # side by side: each takes a second or so to come up
        with ThreadPoolExecutor(count) as pool:
            starting = [pool.submit(ModWsgiExpress, config, processes=1, threads=4)
                        for config in self.configs]
        self.servers = [future.result() for future in starting if not future.exception()]
        if len(self.servers) < count:
            self.close()
            raise next(future.exception() for future in starting if future.exception())

    @property
    def ports(self):
        return [server.port for server in self.servers]

    def requests_for(self, path_and_query):
        """How many times the backends answered this exact image request."""
        path, _, query = path_and_query.removeprefix("/images").partition("?")
        line = re.compile(rf"GET {re.escape(path)}\?{re.escape(query)} \d{{3}} ")
        return sum(len(line.findall(server.log())) for server in self.servers)

    def rendered(self):
        """{"/images" + path?query: indexes of the backends that rendered it}: the
        image 200s their logs show, not answered from their result caches."""
        where = {}
        for index, server in enumerate(self.servers):
            for path, query, status, cache in LOG_LINE.findall(server.log()):
                if status == "200" and cache == "-" and not path.startswith("/_"):
                    where.setdefault(f"/images{path}?{query}", set()).add(index)
        return where

    def stop(self, index=None):
        for server in self.servers if index is None else [self.servers[index]]:
            server.stop()

    def start(self, index):
        """Start a stopped backend again, on its port, with its config and cache."""
        self.servers[index] = ModWsgiExpress(self.configs[index], processes=1, threads=4,
                                             port=self.servers[index].port)

    def close(self):
        self.stop()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


def varnish_front(folder, ports):
    binary = shutil.which("varnishd") or "/usr/sbin/varnishd"
    if not os.path.exists(binary):
        pytest.fail("varnishd is not installed (make test installs it)")
    with open(os.path.join(PROJECT, "cache", "varnish.vcl")) as source:
        vcl = source.read()
    for default, port in zip(CONFIG_PORTS, ports, strict=True):
        assert f'.port = "{default}";' in vcl, f"no backend on port {default} in the VCL"
        vcl = vcl.replace(f'.port = "{default}";', f'.port = "{port}";')
    vcl_path = os.path.join(folder, "dynimg.vcl")
    with open(vcl_path, "w") as file:
        file.write(vcl)
    port = free_port()
    command = [binary, "-F", "-n", os.path.join(folder, "work"), "-a", f"127.0.0.1:{port}",
               "-f", vcl_path, "-s", "malloc,64m", "-T", "none"]
    if IS_ROOT:
        command[1:1] = ["-j", "none"]
    return port, command


def nginx_front(folder, ports):
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        pytest.fail("nginx is not installed (make test installs it)")
    with open(os.path.join(PROJECT, "cache", "nginx.conf")) as source:
        conf = source.read()
    port = free_port()
    cache = os.path.join(folder, "cache")
    os.makedirs(cache)
    os.chmod(cache, 0o777)
    for default, backend in zip(CONFIG_PORTS, ports, strict=True):
        assert f"server 127.0.0.1:{default} " in conf, f"no server on port {default}"
        conf = conf.replace(f"server 127.0.0.1:{default} ", f"server 127.0.0.1:{backend} ")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/var/cache/nginx/dynimg", cache)
    with open(os.path.join(folder, "dynimg.conf"), "w") as file:
        file.write(conf)
    temp = os.path.join(folder, "temp")
    os.makedirs(temp)
    os.chmod(temp, 0o777)
    main = os.path.join(folder, "nginx.conf")
    with open(main, "w") as file:
        file.write(f"""daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
{"user www-data;" if IS_ROOT else ""}
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {folder}/dynimg.conf;
}}
""")
    return port, [binary, "-c", main, "-e", os.path.join(folder, "error.log")]


class Tier:
    """Backends behind a real front (varnishd or nginx) with the shipped config:
    `get` asks the front, `port` is where it listens."""

    def __init__(self, kind, image_root):
        self.kind = kind
        self.backends = Backends(image_root)
        self.folder = shared_tempdir(f"dynimg-{kind}-")
        self.port, command = {"varnish": varnish_front, "nginx": nginx_front}[kind](
            self.folder, self.backends.ports)
        log_path = os.path.join(self.folder, "front.log")
        with open(log_path, "w") as log:
            self.front = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.get("/images/_health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if self.front.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as log:
                    output = log.read()
                self.close()
                pytest.fail(f"{kind} did not start:\n{output}")
            time.sleep(0.2)

    def get(self, path, **kwargs):
        return http_request(self.port, path, **kwargs)

    def close(self):
        stop(self.front)
        self.backends.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(params=["varnish", "nginx"])
def tier(request, image_root):
    front = Tier(request.param, image_root)
    yield front.get, front.backends
    front.close()


def test_the_cache_tier_caches_separates_variants_and_survives_backend_failures(tier):
    get, backends = tier
    # (a) a repeated request is a hit and never reaches a backend
    url = "/images/photo-medium-2.jpg?width=201"
    first = get(url)
    assert first.status == 200
    for _ in range(3):
        assert get(url).body == first.body
    assert backends.requests_for(url) == 1

    # (b) network classes and formats are separate variants, never crossed
    hinted = "/images/photo-medium-2.jpg?width=640"
    slow = get(hinted, headers={"ECT": "2g"})
    fast = get(hinted, headers={"ECT": "4g"})
    assert slow.headers["X-Image-Network"] == "2g" and fast.headers["X-Image-Network"] == "4g"
    assert len(slow.body) < len(fast.body)
    auto = "/images/photo-medium-2.jpg?width=300&format=auto"
    chrome = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
    best = get(auto, headers={"Accept": chrome})
    webp = get(auto, headers={"Accept": "image/webp,image/*"})
    jpeg = get(auto, headers={"Accept": "image/png,image/*;q=0.8"})
    assert best.headers["Content-Type"] == ("image/avif" if dynimg.AVIF_ENCODER else "image/webp")
    assert webp.headers["Content-Type"] == "image/webp"
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    for _ in range(2):
        assert get(hinted, headers={"ECT": "2G"}).body == slow.body
        assert get(hinted, headers={"ECT": "4g"}).body == fast.body
        assert get(auto, headers={"Accept": chrome}).body == best.body
        assert get(auto, headers={"Accept": "image/webp,*/*"}).body == webp.body
        assert get(auto, headers={"Accept": "*/*"}).body == jpeg.body
    assert backends.requests_for(hinted) == 2
    # three variants to the cache (takes AVIF and WebP, WebP only, neither), whatever
    # the backend makes of them
    assert backends.requests_for(auto) == 3

    # (c) revalidation through the cache
    again = get(url, headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and again.body == b""

    # (d) one backend stopped: every request still succeeds
    backends.stop(0)
    for width in range(150, 160):
        assert get(f"/images/photo-medium-1.jpg?width={width}").status == 200

    # (e) every backend stopped: cached copies, now stale, are still served
    backends.stop()
    time.sleep(MAX_AGE + 1)
    for path, headers, body in ((url, {}, first.body), (hinted, {"ECT": "2g"}, slow.body),
                                (auto, {"Accept": "image/webp"}, webp.body)):
        reply = get(path, headers=headers)
        assert reply.status == 200 and reply.body == body
