"""Load and faults against a real mod_wsgi-express: a bounded wrk run with a mix of
hits, renders, 404s, bad parameters and bad files; a daemon process killed in the
middle of it; a full cache disk; sources deleted or replaced mid-request."""

import os
import re
import shutil
import signal
import subprocess
import time
import zlib

import pytest
from PIL import Image

import dynimg
from conftest import IS_ROOT, ModWsgiExpress, shared_tempdir, write_config

#: The bound on a daemon process's peak RSS under this load (measured: see README).
RSS_BOUND_MB = 300

#: wrk Lua that counts the answers by status and prints "status N count" lines at
#: the end; each wrk thread gets `id` (0, 1, ...).
STATUS_TALLY = """
statuses = {}
all_threads = {}
function setup(thread)
  thread:set("id", #all_threads)
  table.insert(all_threads, thread)
end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(all_threads) do
    for status, count in pairs(thread:get("statuses")) do
      total[status] = (total[status] or 0) + count
    end
  end
  for status, count in pairs(total) do
    io.write(string.format("status %d %d\\n", status, count))
  end
end
"""

MIX = """
paths = {
  "/images/photo-medium-1.jpg?width=300",
  "/images/photo-large-%d.jpg?width=%d",
  "/images/photo-medium-1.jpg?width=300&format=webp",
  "/images/nope.jpg?width=100",
  "/images/photo-medium-2.jpg?width=abc",
  "/images/truncated.jpg?width=100",
  "/images/photo-medium-1.jpg?width=300",
  "/images/not-image.jpg?width=100",
}
counter = 0

request = function()
  counter = counter + 1
  local path = paths[(counter % #paths) + 1]
  if string.find(path, "%%d") then
    path = string.format(path, (counter % 3) + 1, 300 + (counter * 7 + SEED) % 900)
  end
  return wrk.format("GET", path)
end
""" + STATUS_TALLY


@pytest.fixture(scope="module")
def loaded_server(image_root):
    if not shutil.which("wrk"):
        pytest.fail("wrk is not installed (make test installs it)")
    folder = shared_tempdir("dynimg-load-")
    server = ModWsgiExpress(write_config(folder, image_root, limits={"queue_timeout": "5"},
                                         server={"log_level": "WARNING"}),
                            processes=2, threads=4)
    yield server, folder
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def run_wrk(port, folder, seconds, seed, during=None):
    script = os.path.join(folder, f"mix-{seed}.lua")
    with open(script, "w") as file:
        file.write(MIX.replace("SEED", str(seed)))
    # each request a new connection, as from many clients: mod_wsgi-express's Apache
    # reaps idle worker threads and, with them, now and then a kept-alive connection
    command = ["wrk", "-t2", "-c24", f"-d{seconds}s", "--timeout", "30s", "-s", script,
               "-H", "Connection: close", f"http://127.0.0.1:{port}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    if during:
        during()
    output = process.communicate(timeout=seconds + 60)[0]
    statuses = {int(s): int(n) for s, n in re.findall(r"status (\d+) (\d+)", output)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       output)
    return statuses, sum(map(int, errors.groups())) if errors else 0, output


def daemon_pids(port):
    lines = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in lines.splitlines()
            if f"(wsgi:127.0.0.1:{port}:" in line or f"(wsgi:localhost:{port}:" in line]


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read())[1]) / 1024


def check_every_cache_entry(cache_dir):
    """Every file decodes, has the size and checksum its name says, and nothing
    half-written remains."""
    checked = 0
    for folder, _, names in os.walk(cache_dir):
        if ".locks" in folder:
            continue
        for name in names:
            if folder == cache_dir and name == dynimg.FIGURES_FILE:
                continue  # the figures of the last trim, for /_health
            entry = dynimg.CacheEntry.parse(name)
            assert entry is not None, f"stray file {name}"
            path = os.path.join(folder, name)
            assert os.path.basename(folder) == entry.key[2:4] and name.startswith(entry.key)
            assert os.path.getsize(path) == entry.length
            with open(path, "rb") as file:
                assert zlib.crc32(file.read()) == entry.crc, f"damaged {name}"
            with Image.open(path) as image:
                image.load()
                assert image.size == (entry.width, entry.height)
            checked += 1
    return checked


def test_load_holds_without_5xx_socket_errors_or_damaged_cache(loaded_server):
    server, folder = loaded_server
    server.get("/images/photo-medium-1.jpg?width=300")
    statuses, socket_errors, output = run_wrk(server.port, folder, 15, seed=1)
    assert socket_errors == 0, output
    assert sum(statuses.values()) > 100, output
    assert not {status for status in statuses if status >= 500} - {503}, statuses
    assert {200, 400, 404, 422} <= set(statuses), statuses
    pids = daemon_pids(server.port)
    assert len(pids) == 2
    peaks = [peak_rss_mb(pid) for pid in pids]
    print(f"\nload: {statuses}, peak RSS per daemon process: {[round(p) for p in peaks]} MB")
    assert max(peaks) < RSS_BOUND_MB
    assert check_every_cache_entry(os.path.join(folder, "cache")) > 10
    reply = server.get("/images/photo-medium-1.jpg?width=300")
    assert reply.headers["Server-Timing"] == "cache;desc=hit"


def test_a_daemon_killed_mid_load_fails_few_requests_and_is_replaced(loaded_server):
    server, folder = loaded_server
    before = daemon_pids(server.port)

    def kill_one():
        time.sleep(4)
        os.kill(before[0], signal.SIGKILL)

    statuses, socket_errors, output = run_wrk(server.port, folder, 12, seed=2,
                                              during=kill_one)
    failed = sum(count for status, count in statuses.items() if status >= 500 and status != 503)
    print(f"\nkilled pid {before[0]} at 4 s: {statuses}, socket errors {socket_errors}")
    # at most the requests in flight in the killed process (its 8 threads) fail, once each
    assert failed + socket_errors <= 8, output
    deadline = time.monotonic() + 20
    while len(daemon_pids(server.port)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = daemon_pids(server.port)
    assert len(after) == 2 and before[0] not in after
    check_every_cache_entry(os.path.join(folder, "cache"))
    for width in (301, 302, 303, 304):
        assert server.get(f"/images/photo-large-1.jpg?width={width}").status == 200


@pytest.fixture
def tiny_disk(tmp_path):
    mount = shared_tempdir("dynimg-tinydisk-")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k,mode=0777", "tmpfs",
                             mount], capture_output=True, text=True) if IS_ROOT else None
    if result is None or result.returncode != 0:
        if os.environ.get("CI") == "true" and IS_ROOT:
            pytest.fail(f"cannot mount a tmpfs: {result.stderr if result else ''}")
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", mount])
    os.rmdir(mount)


def test_a_full_cache_disk_still_serves_every_render(image_root, tiny_disk):
    folder = shared_tempdir("dynimg-full-")
    server = ModWsgiExpress(write_config(folder, image_root, cache={"cache_dir": tiny_disk}),
                            processes=1, threads=2)
    try:
        for width in range(800, 1400, 100):
            reply = server.get(f"/images/photo-large-2.jpg?width={width}")
            assert reply.status == 200 and reply.body[:2] == b"\xff\xd8"
        assert "result cache write failed" in server.log()
        assert shutil.disk_usage(tiny_disk).free < 100 * 1024
        assert not [name for _, _, names in os.walk(tiny_disk) for name in names
                    if name.startswith(".tmp-")]
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_a_source_changed_mid_request_gives_404_or_the_new_image(app, image_root, monkeypatch,
                                                                  change):
    path = os.path.join(image_root, f"moving-{change}.jpg")
    shutil.copy(os.path.join(image_root, "photo-medium-1.jpg"), path)
    original = dynimg.open_source

    def changing(spec, config):
        # between the stat that made the key and the read of the bytes
        if change == "delete":
            os.unlink(path)
        else:
            shutil.copy(os.path.join(image_root, "photo-medium-2.jpg"), path)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        return original(spec, config)

    monkeypatch.setattr(dynimg, "open_source", changing)
    reply = app.request(f"/moving-{change}.jpg", "width=200")
    if change == "delete":
        assert reply.status == 404
        return
    assert reply.status == 200 and reply.image().size == (200, 125)  # the new photo's shape
    # keyed by the bytes actually read: the new file's identity and facts
    stat = os.stat(path)
    config = app.config
    spec = dynimg.parse_spec(dynimg.Request(path=f"/moving-{change}.jpg", query="width=200"),
                             config)
    plan = dynimg.plan_output(dynimg.probe_file(path, config), spec, config)
    assert reply.headers["X-Image-Key"] == dynimg.image_key(
        spec, plan, (f"moving-{change}.jpg", stat.st_size, stat.st_mtime_ns))
