"""Config loading: strict keys and types, one-line errors, exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from mirwatch import config


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "lib").mkdir(exist_ok=True)
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = config.load(write(tmp_path, '[library]\nroots = ["lib"]\n[state]\ndir = "st"\n'))
    assert cfg.library.roots == [tmp_path / "lib"]
    assert cfg.state.dir == tmp_path / "st"
    assert cfg.queue_path == tmp_path / "st" / "queue.sqlite3"
    assert cfg.essentia.threshold == 0.1 and cfg.essentia.top_k == 10
    assert cfg.essentia.danceability_atonality == "effnet"
    assert cfg.logging.format == "json"


def test_repo_default_config_is_valid():
    repo = Path(__file__).resolve().parents[1]
    cfg = config.load(repo / "config.toml", check_roots=False)
    assert cfg.library.roots == [repo / "library"]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[library]\nroots = ["lib"]\n[essentia]\ntreshold = 0.2\n', "unknown key 'essentia.treshold'"),
        ('[library]\nroots = ["lib"]\n[bogus]\nx = 1\n', "unknown key 'bogus'"),
        ('[library]\nroots = ["lib"]\n[essentia]\ntop_k = "ten"\n', "essentia.top_k must be an integer"),
        ('[library]\nroots = ["lib"]\n[essentia]\nthreshold = "high"\n', "essentia.threshold must be a number"),
        ('[library]\nroots = ["lib"]\n[logging]\nformat = "xml"\n', "logging.format must be one of"),
        ('[library]\nroots = "lib"\n', "library.roots must be a list"),
        ('[library]\nroots = ["nowhere"]\n', "is not a directory"),
        ('[library]\nroots = []\n', "library.roots is empty"),
        ('[library\nroots = []\n', "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, '[library]\nroots = ["lib"]\n[worker]\nmax_attempts = true\n')
    proc = subprocess.run([sys.executable, "-m", "mirwatch.cli", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "worker.max_attempts must be an integer" in proc.stderr


def test_env_var_names_the_config(tmp_path, monkeypatch):
    path = write(tmp_path, '[library]\nroots = ["lib"]\n')
    monkeypatch.setenv("MIRWATCH_CONFIG", str(path))
    assert config.load(None).path == path.resolve()
