"""Layer 3: real servers on 127.0.0.1 spoken to over HTTP: mod_wsgi-express, Debian's
apache2 with the shipped apache/dynimg.conf, and the wsgiref `serve` command."""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import (IS_ROOT, PROJECT, VENV_BIN, ModWsgiExpress, free_port, http_request,
                      shared_tempdir, stop, wait_for, write_config, writable_by_apache)


def image_of(reply):
    image = Image.open(io.BytesIO(reply.body))
    image.load()
    return image


def test_original_url_gives_a_best_fit_jpeg(server):
    reply = server.get("/images/?name=photo-large-2.jpg&width=340&height=400")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "image/jpeg"
    image = image_of(reply)
    assert image.format == "JPEG" and image.size == (340, 227)


def test_path_form_gives_the_same_bytes_and_key(server):
    by_query = server.get("/images/?name=photo-large-2.jpg&width=340&height=400")
    by_path = server.get("/images/photo-large-2.jpg?width=340&height=400")
    assert by_query.body == by_path.body
    assert by_query.headers["X-Image-Key"] == by_path.headers["X-Image-Key"]


def test_forcefit_and_cover_over_http(server):
    assert image_of(server.get("/images/photo-large-3.jpg?w=340&h=400&forcefit=1")).size \
        == (340, 400)
    assert image_of(server.get("/images/photo-large-3.jpg?w=340&h=400&fit=cover")).size \
        == (340, 400)


def test_sub_folder_and_utf8_names(server, image_root):
    shutil.copy(os.path.join(image_root, "photo-medium-1.jpg"),
                os.path.join(image_root, "sub", "café.jpg"))
    os.chmod(os.path.join(image_root, "sub", "café.jpg"), 0o644)
    assert server.get("/images/sub/caf%C3%A9.jpg?width=100").status == 200
    assert server.get("/images/?name=sub%2Fcaf%C3%A9.jpg&width=100").status == 200


def test_missing_source_is_a_404_image(server):
    reply = server.get("/images/nothing-here.jpg?width=120")
    assert reply.status == 404
    assert image_of(reply).width == 120


@pytest.mark.parametrize("query, parameter", [("width=x", "width"), ("a=1", "a"),
                                              ("w=1&width=2", "width"), ("fit=", "fit")])
def test_bad_parameters_are_400_naming_the_parameter(server, query, parameter):
    reply = server.get("/images/photo-medium-1.jpg?" + query)
    assert reply.status == 400
    assert reply.body.decode().startswith(parameter + ":")


def test_post_is_405_and_head_is_headers_only(server):
    post = server.get("/images/photo-medium-1.jpg", method="POST")
    assert post.status == 405 and post.headers["Allow"] == "GET, HEAD"
    head = server.get("/images/photo-medium-1.jpg?width=90", method="HEAD")
    get = server.get("/images/photo-medium-1.jpg?width=90")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(get.body))


@pytest.mark.parametrize("name", ["truncated.jpg", "not-image.jpg", "bomb.png", "bomb.gif"])
def test_broken_sources_are_422_and_the_server_keeps_serving(server, name):
    reply = server.get(f"/images/{name}?width=100")
    assert reply.status == 422 and reply.headers["X-Image-Error"]
    assert server.get("/images/photo-medium-1.jpg?width=50").status == 200


def test_etag_revalidation_gets_304(server):
    first = server.get("/images/photo-medium-1.jpg?width=77")
    again = server.get("/images/photo-medium-1.jpg?width=77",
                       headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and again.body == b""


def test_health_answers_status_and_version_only_by_default(server):
    reply = server.get("/images/_health")
    assert reply.status == 200 and reply.headers["Cache-Control"] == "no-store"
    health = json.loads(reply.body)
    assert set(health) == {"status", "version", "avif"} and health["status"] == "ok"


@pytest.fixture(scope="module")
def detailed_server(image_root):
    """A server whose /_health shows its details ([server] health_details = yes)."""
    folder = shared_tempdir("dynimg-details-")
    express = ModWsgiExpress(write_config(folder, image_root, server={"health_details": "yes"}),
                             processes=1, threads=2)
    yield express
    express.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_health_answers_json_with_the_pillow_build(detailed_server):
    health = json.loads(detailed_server.get("/images/_health").body)
    assert health["pillow"]["version"]
    assert health["config"].endswith("dynimg.ini")
    assert health["cache"]["max_bytes"] > 0
    record = os.path.join(os.path.dirname(VENV_BIN), "dynimg-build.json")
    if os.path.exists(record):
        with open(record) as file:
            built = json.load(file)
        assert health["pillow"]["simd"] == (built["pillow"] == "pillow-simd")
        assert health["pillow"]["avx2"] == built["avx2"]


def test_health_says_whether_the_server_encodes_avif_and_with_what(detailed_server):
    """The daemons (www-data, Apache's environment) load the plugin make installed."""
    health = json.loads(detailed_server.get("/images/_health").body)
    installed = subprocess.run([os.path.join(VENV_BIN, "python"), "-c", "import pillow_avif"],
                               capture_output=True).returncode == 0
    assert health["avif"] is installed
    if installed:
        assert health["avif_encoder"]["encoder"] == "svt"
        assert "avif" in health["output_formats"]
        assert health["auto_formats"] == ["avif", "webp", "jpeg"]
        reply = detailed_server.get("/images/photo-medium-1.jpg?width=200&format=avif")
        assert reply.status == 200 and image_of(reply).format == "AVIF"
        assert "Svt[info]" not in detailed_server.log()


def test_the_shipped_apache_config_serves_images_under_real_apache2():
    """apache/dynimg.conf, unmodified, included by a minimal main config."""
    apache2 = shutil.which("apache2") or "/usr/sbin/apache2"
    folder = shared_tempdir("dynimg-apache-")
    os.makedirs(os.path.join(folder, "logs"))
    os.chmod(os.path.join(folder, "logs"), 0o777)
    writable_by_apache(os.path.join(folder, "htcache"))
    port = free_port()
    module = subprocess.run([os.path.join(VENV_BIN, "mod_wsgi-express"), "module-location"],
                            capture_output=True, text=True, check=True).stdout.strip()
    modules = "/usr/lib/apache2/modules"
    main = os.path.join(folder, "httpd.conf")
    with open(main, "w") as conf:
        conf.write(f"""
ServerRoot {folder}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {folder}/httpd.pid
ErrorLog {folder}/error.log
DefaultRuntimeDir {folder}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
{"User www-data" if IS_ROOT else ""}
{"Group www-data" if IS_ROOT else ""}
Define DYNIMG_HOME {PROJECT}
Define DYNIMG_VENV {os.path.dirname(VENV_BIN)}
Define DYNIMG_PORT {port}
Define DYNIMG_LOG_DIR {folder}/logs
Define DYNIMG_RUN_DIR {folder}
Define DYNIMG_CACHE_ROOT {folder}/htcache
Define DYNIMG_USER {"www-data" if IS_ROOT else os.environ.get("USER", "nobody")}
{"" if os.path.exists(_default_module_path()) else f"Define DYNIMG_WSGI_MODULE {module}"}
Include {PROJECT}/apache/dynimg.conf
""")
    check = subprocess.run([apache2, "-t", "-f", main], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "Syntax OK" in check.stderr
    log_path = os.path.join(folder, "console.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([apache2, "-f", main, "-DFOREGROUND"], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(port, "/images/_health", process, log_path)
        reply = http_request(port, "/images/sunset.jpg?width=340&height=400")
        assert reply.status == 200
        assert image_of(reply).size == (340, 227)
        query_form = http_request(port, "/images/?name=sunset.jpg&width=340&height=400")
        assert query_form.headers["X-Image-Key"] == reply.headers["X-Image-Key"]
        # Apache files its cached copy just after the answer: ask until it answers
        deadline = time.monotonic() + 10
        while True:
            repeat = http_request(port, "/images/sunset.jpg?width=340&height=400")
            if repeat.headers.get("X-Cache", "").startswith("HIT") \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert repeat.headers.get("X-Cache", "").startswith("HIT")  # cache.conf is in front
        assert repeat.body == reply.body
        with open(os.path.join(folder, "logs", "dynimg-access.log")) as access:
            assert "GET /images/sunset.jpg?width=340&height=400" in access.read()
    finally:
        stop(process)
        shutil.rmtree(folder, ignore_errors=True)


def _default_module_path():
    return os.path.join(os.path.dirname(VENV_BIN), "lib", "python3.11", "site-packages",
                        "mod_wsgi", "server", "mod_wsgi-py311.cpython-311-x86_64-linux-gnu.so")


def test_render_command_runs_the_pipeline_offline(tmp_path):
    output = tmp_path / "out.jpg"
    result = subprocess.run(
        [sys.executable, os.path.join(PROJECT, "dynimg.py"), "render", "sunset.jpg",
         "--width", "340", "--height", "400", "--forcefit", "-o", str(output)],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4272x2848 -> 340x400" in result.stdout and " ms" in result.stdout
    assert Image.open(output).size == (340, 400)


def test_serve_command_serves_the_samples_with_wsgiref(tmp_path):
    port = free_port()
    config = write_config(str(tmp_path), os.path.join(PROJECT, "samples"))
    process = subprocess.Popen(
        [sys.executable, os.path.join(PROJECT, "dynimg.py"), "--config", config, "serve",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = http_request(port, "/images/wine.jpg?width=100")
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        assert reply.status == 200 and image_of(reply).width == 100
    finally:
        stop(process)


def test_one_render_per_key_across_processes(server):
    import concurrent.futures
    url = "/images/photo-large-1.jpg?width=777"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: server.get(url), range(8)))
    assert {reply.status for reply in replies} == {200}
    assert len({reply.body for reply in replies}) == 1
    assert sum(r.headers["Server-Timing"] == "cache;desc=hit" for r in replies) == 7
    again = server.get(url)
    assert again.headers["Server-Timing"] == "cache;desc=hit" and again.body == replies[0].body
