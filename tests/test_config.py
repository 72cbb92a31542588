"""dynimg.ini: defaults that work, relative paths, and bad values named at start-up."""

import os
import subprocess
import sys

import pytest

import dynimg
from conftest import PROJECT, write_config


def test_the_shipped_ini_loads_and_serves_the_samples():
    config = dynimg.load_config(os.path.join(PROJECT, "dynimg.ini"))
    assert config.image_root == os.path.join(PROJECT, "samples")
    assert os.path.isfile(config.not_found_image)
    assert {"default", "save-data", "2g", "3g", "4g", "wifi"} <= set(config.profiles)


def test_every_default_key_is_documented_in_the_shipped_ini():
    with open(os.path.join(PROJECT, "dynimg.ini"), encoding="utf-8") as ini:
        lines = ini.read().splitlines()
    for section, keys in dynimg.DEFAULTS.items():
        assert f"[{section}]" in lines
        for key in keys:
            assert any(line.startswith(f"{key} =") for line in lines), (section, key)


def test_relative_paths_resolve_against_the_ini_folder(tmp_path):
    (tmp_path / "pictures").mkdir()
    path = write_config(str(tmp_path), "pictures")
    assert dynimg.load_config(path).image_root == os.path.realpath(tmp_path / "pictures")


@pytest.mark.parametrize("section, key, value", [
    ("limits", "max_width", "wide"),
    ("limits", "max_dpr", "9"),
    ("server", "log_level", "LOUD"),
    ("output", "format", "gif"),
    ("output", "bg", "reddish"),
    ("network.3g", "quality", "0"),
    ("network.3g", "progressive", "maybe"),
    ("screens", "phone", "big"),
    ("hints", "downlink_classes", "2g 0.1, 7g"),
])
def test_a_bad_value_names_section_and_key(tmp_path, image_root, section, key, value):
    path = write_config(str(tmp_path), image_root, **{section: {key: value}})
    with pytest.raises(dynimg.ConfigError) as raised:
        dynimg.load_config(path)
    assert f"[{section}] {key}" in str(raised.value)


def test_a_missing_image_root_stops_start_up(tmp_path):
    path = write_config(str(tmp_path), str(tmp_path / "nowhere"))
    with pytest.raises(dynimg.ConfigError, match=r"\[server\] image_root"):
        dynimg.load_config(path)


def test_dynimg_config_environment_variable_picks_the_file(tmp_path, image_root):
    path = write_config(str(tmp_path), image_root, server={"error_max_age": "7"})
    result = subprocess.run([sys.executable, os.path.join(PROJECT, "dynimg.py"), "check"],
                            env=dict(os.environ, DYNIMG_CONFIG=path), capture_output=True,
                            text=True)
    assert result.returncode == 0 and path in result.stdout


def test_check_command_fails_on_a_bad_config(tmp_path, image_root):
    path = write_config(str(tmp_path), image_root, limits={"max_height": "-1"})
    result = subprocess.run([sys.executable, os.path.join(PROJECT, "dynimg.py"),
                             "--config", path, "check"], capture_output=True, text=True)
    assert result.returncode == 2 and "[limits] max_height" in result.stderr


def test_log_file_and_level_come_from_the_ini(tmp_path, image_root):
    log_path = tmp_path / "dynimg.log"
    path = write_config(str(tmp_path), image_root,
                        server={"log_file": str(log_path), "log_level": "WARNING"})
    config = dynimg.load_config(path)
    dynimg.configure_logging(config)
    try:
        dynimg.log.info("not written")
        dynimg.log.warning("written")
        for handler in dynimg.log.handlers:
            handler.flush()
        assert log_path.read_text().count("written") == 1
    finally:
        for handler in list(dynimg.log.handlers):
            handler.close()
            dynimg.log.removeHandler(handler)


def test_a_class_of_ones_own_gets_progressive_jpeg_unless_it_says_no(tmp_path, image_root):
    path = write_config(str(tmp_path), image_root, **{
        "network.satellite": {"quality": "50", "min_quality": "40", "max_bytes": "60000",
                              "max_dpr": "1"},
        "network.fibre": {"quality": "85", "min_quality": "70", "max_bytes": "0",
                          "max_dpr": "3", "progressive": "no"}})
    profiles = dynimg.load_config(path).profiles
    assert profiles["satellite"].progressive and not profiles["fibre"].progressive
    assert profiles["2g"].progressive and not profiles["4g"].progressive
