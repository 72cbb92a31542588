"""Shared fixtures: the corpus, test configs, the app under wsgiref.validate,
and real servers (mod_wsgi-express, Apache) on free 127.0.0.1 ports."""

import http.client
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)

import dynimg  # noqa: E402

VENV_BIN = os.path.dirname(sys.executable)

#: Seconds a response may make no progress towards its client (as `make serve`).
RESPONSE_TIMEOUT = 10
IS_ROOT = os.geteuid() == 0


def corpus_dir():
    return os.environ.get("DYNIMG_CORPUS") or os.path.join(PROJECT, "..", "shared", "corpus")


def read_manifest(folder):
    with open(os.path.join(folder, "MANIFEST.tsv"), encoding="utf-8") as manifest:
        header, *rows = [line.rstrip("\n").split("\t") for line in manifest if line.strip()]
    return [dict(zip(header, row)) for row in rows]


@pytest.fixture(autouse=True)
def dynimg_logger_as_found():
    """Every test leaves the dynimg logger as it found it (handlers, level,
    propagation), whatever configure_logging or the test changed."""
    logger = dynimg.log
    handlers, level, propagate, disabled = (list(logger.handlers), logger.level,
                                            logger.propagate, logger.disabled)
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.level, logger.propagate, logger.disabled = level, propagate, disabled


@pytest.fixture(scope="session")
def corpus():
    folder = corpus_dir()
    if not os.path.exists(os.path.join(folder, "MANIFEST.tsv")):
        message = f"image corpus not found at {folder} (set DYNIMG_CORPUS)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return os.path.realpath(folder)


def shared_tempdir(prefix):
    """A temporary folder that Apache's user (www-data) can reach and read."""
    folder = tempfile.mkdtemp(prefix=prefix)
    os.chmod(folder, 0o755)
    return folder


@pytest.fixture(scope="session")
def image_root(corpus):
    """A copy of the corpus plus a sub-folder, so tests can add and change files."""
    root = shared_tempdir("dynimg-images-")
    for name in os.listdir(corpus):
        shutil.copy(os.path.join(corpus, name), root)
        os.chmod(os.path.join(root, name), 0o644)
    os.makedirs(os.path.join(root, "sub", "dir"))
    shutil.copy(os.path.join(corpus, "photo-medium-1.jpg"), os.path.join(root, "sub", "dir"))
    for folder in (os.path.join(root, "sub"), os.path.join(root, "sub", "dir")):
        os.chmod(folder, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def writable_by_apache(folder):
    """A folder Apache's children (www-data when started as root) can write."""
    os.makedirs(folder, exist_ok=True)
    if IS_ROOT:
        shutil.chown(folder, "www-data", "www-data")


def write_config(folder, image_root, **sections):
    """A dynimg.ini in `folder` using the project's images, with overrides."""
    cache_dir = os.path.join(folder, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    os.chmod(cache_dir, 0o777)  # Apache's user writes the result cache
    run_dir = os.path.join(folder, "run")
    os.makedirs(run_dir, exist_ok=True)
    os.chmod(run_dir, 0o777)  # and its processes' metrics files
    values = {"server": {"image_root": image_root,
                         "not_found_image": os.path.join(PROJECT, "404image.png"),
                         "error_image": os.path.join(PROJECT, "errorimage.png")},
              "cache": {"cache_dir": cache_dir}, "metrics": {"run_dir": run_dir}}
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    path = os.path.join(folder, "dynimg.ini")
    with open(path, "w", encoding="utf-8") as ini:
        for section, keys in values.items():
            ini.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    os.chmod(path, 0o644)
    return path


@pytest.fixture(scope="session")
def config(image_root, tmp_path_factory):
    return dynimg.load_config(write_config(str(tmp_path_factory.mktemp("config")), image_root))


class App:
    """A dynimg app of its own for a config, called directly on a test environ
    under wsgiref.validate. `monkeypatch` is accepted for older call sites."""

    def __init__(self, config, monkeypatch=None):
        self.dynimg = dynimg.App(config)
        self.config = config
        self.app = validator(self.dynimg)

    def request(self, path="/", query="", method="GET", headers=None, environ=None):
        return self.request_raw(path.encode("utf-8").decode("latin-1"), query, method, headers,
                                environ)

    def request_raw(self, path_info, query="", method="GET", headers=None, environ=None):
        """PATH_INFO exactly as a server would pass it (bytes as latin-1); `environ`
        adds keys such as REMOTE_ADDR."""
        environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "/images",
                   "PATH_INFO": path_info, "QUERY_STRING": query, **(environ or {})}
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        setup_testing_defaults(environ)
        captured = {}

        def start_response(status, headers, exc_info=None):
            captured["status"] = int(status.split()[0])
            captured["headers"] = dict(headers)

        result = self.app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            result.close()
        return Reply(captured["status"], captured["headers"], body)


class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def image(self):
        from PIL import Image
        image = Image.open(io.BytesIO(self.body))
        image.load()
        return image

    @property
    def text(self):
        return self.body.decode()


@pytest.fixture
def app(image_root, tmp_path):
    """An app with a result cache of its own (the test's tmp_path)."""
    return App(dynimg.load_config(write_config(str(tmp_path), image_root)))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_request(port, path, method="GET", headers=None, timeout=60):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def wait_for(port, path, process, log_path, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if http_request(port, path, timeout=5).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    with open(log_path, errors="replace") as log:
        output = log.read()[-4000:]
    stop(process)
    raise RuntimeError(f"server on port {port} did not come up:\n{output}")


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class ModWsgiExpress:
    """A real mod_wsgi-express (Apache) serving dynimg.wsgi under /images."""

    def __init__(self, config_path, processes=2, threads=16, front_cache=False, port=None):
        """front_cache: with the shipped apache/cache.conf (Apache's cache) in front.
        port: a stopped server's, to start it again where it was (its log goes on)."""
        self.folder = os.path.dirname(config_path)
        self.port = port or free_port()
        self.log_path = os.path.join(self.folder, "server.log")
        command = [os.path.join(VENV_BIN, "mod_wsgi-express"), "start-server",
                   os.path.join(PROJECT, "dynimg.wsgi"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--mount-point", "/images",
                   "--processes", str(processes), "--threads", str(threads),
                   "--server-root", os.path.join(self.folder, "server"),
                   "--include-file", os.path.join(PROJECT, "apache", "methods.conf"),
                   "--response-socket-timeout", str(RESPONSE_TIMEOUT),
                   "--log-to-terminal"]
        if IS_ROOT:
            command += ["--user", "www-data", "--group", "www-data"]
        if front_cache:
            command += ["--include-file", self._front_cache()]
        env = dict(os.environ, DYNIMG_CONFIG=config_path, DYNIMG_HOME=PROJECT)
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
        wait_for(self.port, "/images/_health", self.process, self.log_path)

    def _front_cache(self):
        self.cache_root = os.path.join(self.folder, "htcache")
        writable_by_apache(self.cache_root)
        include = os.path.join(self.folder, "front-cache.conf")
        with open(include, "w") as conf:
            conf.write(f"Define DYNIMG_CACHE_ROOT {self.cache_root}\n"
                       f"Include {PROJECT}/apache/cache.conf\n")
        return include

    def get(self, path, **kwargs):
        return http_request(self.port, path, **kwargs)

    def log(self):
        with open(self.log_path, errors="replace") as log:
            return log.read()

    def stop(self):
        stop(self.process)


@pytest.fixture(scope="session")
def server(image_root):
    folder = shared_tempdir("dynimg-server-")
    express = ModWsgiExpress(write_config(folder, image_root))
    yield express
    express.stop()
    shutil.rmtree(folder, ignore_errors=True)
