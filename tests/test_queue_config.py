"""The [queue] section and named library roots."""

from __future__ import annotations

import pytest

from mirwatch import config


def load(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(path, check_roots=False)


def test_roots_as_a_list_are_named_after_their_folders(tmp_path):
    cfg = load(tmp_path, '[library]\nroots = ["/srv/music", "lib/Extra"]\n')
    assert cfg.library.roots == [config.Path("/srv/music"), tmp_path / "lib" / "Extra"]
    assert cfg.library.root_map == {"music": config.Path("/srv/music"), "Extra": tmp_path / "lib" / "Extra"}
    assert cfg.queue.backend == "sqlite" and cfg.library.watch


def test_roots_as_a_table_keep_their_names(tmp_path):
    cfg = load(tmp_path, '[library]\nwatch = false\n[library.roots]\nmain = "/mnt/nas/music"\nold = "archive"\n')
    assert cfg.library.root_map == {"main": config.Path("/mnt/nas/music"), "old": tmp_path / "archive"}
    assert cfg.library.roots == [config.Path("/mnt/nas/music"), tmp_path / "archive"] and not cfg.library.watch


def test_postgres_queue_settings(tmp_path):
    cfg = load(tmp_path, '[library]\nroots = ["/m"]\n[queue]\nbackend = "postgres"\n'
                         'dsn = "postgresql://mirwatch@db:5432/mirwatch"\npassword_file = "pw"\n'
                         'host_name = "gpu1"\nlease_seconds = 30\n')
    q = cfg.queue
    assert (q.backend, q.host_name, q.lease_seconds, q.password_file) == ("postgres", "gpu1", 30.0, tmp_path / "pw")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[library]\nroots = ["/a/music", "/b/music"]\n', "two roots have the same name"),
        ('[library.roots]\n"bad name" = "/x"\n', "root name 'bad name'"),
        ('[library]\nroots = 5\n', "library.roots must be a list or a table"),
        ('[library.roots]\nmain = 5\n', "library.roots.main must be a path"),
        ('[library]\nroot_names = ["x"]\n', "unknown key 'library.root_names'"),
        ('[queue]\nbackend = "redis"\n', "queue.backend must be one of"),
        ('[queue]\nbackend = "postgres"\n', "queue.dsn is required"),
        ('[queue]\nbackend = "postgres"\ndsn = "postgresql://u:s3cret@h/db"\n', "must not contain a password"),
        ('[queue]\nbackend = "postgres"\ndsn = "host=h password=s3cret"\n', "must not contain a password"),
        ('[queue]\nlease_seconds = 0.5\n', "queue.lease_seconds must be at least 2"),
    ],
)
def test_bad_queue_or_roots_config_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message) as err:
        load(tmp_path, text)
    assert "s3cret" not in str(err.value)
