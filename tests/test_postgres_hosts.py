"""Several hosts, one library, one PostgreSQL queue: real daemons against a real server.

Each "host" is a `mirwatch run` process with its own state dir and host name,
reaching the shared library through its own path (a symlink standing in for
a different mount point). The server is the session's throwaway cluster.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

import pgcluster
from conftest import Daemon, NotifySocket, flac_bytes

CPU_ONLY = '[flamingo]\nenabled = "off"\n[features]\naesthetics = "off"\n'


class Host(Daemon):
    def __init__(self, root: Path, models: Path, *, name: str, mount: Path, dsn: str,
                 cluster: pgcluster.PgCluster, lease: float) -> None:
        self.name, self.mount, self.dsn, self.cluster, self.lease = name, mount, dsn, cluster, lease
        super().__init__(root, models)

    def write_config(self, models: Path, extra: str = "") -> None:
        self.config.write_text(
            f'[library]\nsettle_seconds = 0.5\n[library.roots]\nmain = "{self.mount}"\n'
            f'[state]\ndir = "{self.root / "state"}"\n[models]\ndir = "{models}"\n'
            f'[worker]\nstop_grace = 5.0\n'
            f'[queue]\nbackend = "postgres"\ndsn = "{self.dsn}"\npassword_file = "{self.cluster.password_file}"\n'
            f'host_name = "{self.name}"\nlease_seconds = {self.lease}\nreconnect_timeout = 120\n'
            f'[logging]\nformat = "json"\nlevel = "debug"\n' + CPU_ONLY + extra
        )

    def tracks(self, event: str, **match) -> list[str]:
        """Track folder names in this host's `event` events."""
        return [Path(e["path"]).parent.name for e in self.events(event)
                if "path" in e and all(e.get(k) == v for k, v in match.items())]


@pytest.fixture
def cluster():
    return pgcluster.shared()


@pytest.fixture
def make_hosts(tmp_path, tiny_models, cluster):
    started: list[Host] = []
    library = tmp_path / "library"
    library.mkdir()
    db = cluster.new_database("hosts")

    def make(n: int, lease: float) -> tuple[Path, list[Host]]:
        hosts = []
        for i in range(n):
            name = f"host{chr(ord('a') + i)}"
            # A different path to the same folder. The symlink sits above the root:
            # inotify does not follow a root that is itself a symlink.
            alias = tmp_path / f"via-{name}"
            alias.symlink_to(tmp_path, target_is_directory=True)
            mount = alias / library.name
            hosts.append(Host(tmp_path / name, tiny_models, name=name, mount=mount, dsn=cluster.dsn(db),
                              cluster=cluster, lease=lease))
        started.extend(hosts)
        return library, hosts

    make.cluster, make.db = cluster, db
    yield make
    for h in started:
        if h.proc is not None:
            if h.proc.poll() is None:
                os.kill(h.proc.pid, signal.SIGCONT)
                h.proc.kill()
            h.proc.wait(30)


def add_tracks(library: Path, names: list[str], seconds: float = 3.0) -> None:
    data = {i: flac_bytes(seconds, seed=i) for i in range(4)}
    for i, name in enumerate(names):
        (library / name).mkdir()
        tmp = library / name / ".full_mix.flac.part"
        tmp.write_bytes(data[i % 4])
        os.rename(tmp, library / name / "full_mix.flac")


def start_all(hosts: list[Host]) -> None:
    for h in hosts:
        h.start()
    for h in hosts:
        h.wait_event("ready", timeout=240)


def wait_all_done(hosts: list[Host], names: list[str], timeout: float) -> Counter:
    def done():
        got = Counter(t for h in hosts for t in h.tracks("sidecar_written"))
        return got if set(names) <= set(got) else None

    alive = next(h for h in hosts if h.proc is not None and h.proc.poll() is None)
    try:
        return alive.wait_for(done, timeout, f"all {len(names)} tracks written")
    except AssertionError as exc:
        seen = {t for h in hosts for t in h.tracks("sidecar_written")}
        missing = sorted(set(names) - seen)
        events = {h.name: [e for e in h.events() if any(f"/{m}/" in str(e.get("path", "")) for m in missing)][-6:]
                  for h in hosts}
        raise AssertionError(f"no sidecar_written for {missing}; their events per host: {events}\n{exc}") from None


def shared_queue(make_hosts, host: Host):
    from mirwatch.queue.postgres import PostgresQueue

    return PostgresQueue(make_hosts.cluster.dsn(make_hosts.db), roots={"main": host.mount},
                         password=make_hosts.cluster.password, host="test-reader")


def test_three_hosts_analyse_each_of_60_tracks_exactly_once(make_hosts):
    library, hosts = make_hosts(3, lease=30)
    start_all(hosts)
    names = [f"Track {i:02d}" for i in range(60)]
    add_tracks(library, names)  # every host's watcher sees every file
    written = wait_all_done(hosts, names, timeout=420)
    time.sleep(2.0)  # a duplicate would be on its way by now
    written = Counter(t for h in hosts for t in h.tracks("sidecar_written"))
    assert written == Counter({n: 1 for n in names})
    assert all((library / n / f"{n}.INFO").is_file() for n in names)
    per_host = {h.name: len(h.tracks("sidecar_written")) for h in hosts}
    assert all(per_host.values()), per_host
    assert not [e for h in hosts for e in h.events("job_failed")]
    status = hosts[1].status()  # `mirwatch status` on any host reads the shared queue
    assert status["counts"] == {"queued": 0, "running": 0, "done": 60, "failed": 0}
    q = shared_queue(make_hosts, hosts[0])
    try:
        rows = {r["name"]: r for r in q.hosts()}
        assert {n: r["done"] for n, r in rows.items()} == per_host
        assert all(r["heartbeat_age"] < 30 and not r["stopped"] for r in rows.values())
    finally:
        q.close()
    for h in hosts:
        assert h.stop() == 0
    q = shared_queue(make_hosts, hosts[0])
    try:
        assert all(r["stopped"] for r in q.hosts())
    finally:
        q.close()


def test_a_killed_hosts_job_is_finished_by_another_after_its_lease(make_hosts):
    library, (a, b) = make_hosts(2, lease=3)
    start_all([a, b])
    names = [f"K{i}" for i in range(6)]
    add_tracks(library, names)
    a.wait_event("job_started", timeout=120)
    a.kill9()
    orphaned = set(a.tracks("job_started")) - set(a.tracks("job_done"))
    assert orphaned, "host a finished its job before the kill"
    wait_all_done([a, b], names, timeout=240)
    assert b.events("lease_expired")
    assert orphaned <= set(b.tracks("job_done"))
    assert all((library / n / f"{n}.INFO").is_file() for n in names)
    assert b.status()["counts"] == {"queued": 0, "running": 0, "done": 6, "failed": 0}


def test_workers_ride_out_a_server_restart(make_hosts):
    library, hosts = make_hosts(2, lease=10)
    start_all(hosts)
    names = [f"R{i:02d}" for i in range(20)]
    add_tracks(library, names)
    hosts[0].wait_for(lambda: sum(len(h.events("job_done")) for h in hosts) >= 3, 180, "first jobs")
    make_hosts.cluster.restart()
    wait_all_done(hosts, names, timeout=300)
    assert any(h.events("queue_reconnected") for h in hosts)
    assert not [e for h in hosts for e in h.events("job_failed")]
    assert all(h.proc.poll() is None for h in hosts)
    assert hosts[0].status()["counts"]["done"] == 20


def test_a_host_frozen_past_its_lease_does_not_write_over_the_newer_result(make_hosts):
    library, (a, b) = make_hosts(2, lease=3)
    start_all([a, b])
    names = [f"S{i}" for i in range(6)]
    add_tracks(library, names)
    a.wait_event("job_started", timeout=120)
    os.kill(a.proc.pid, signal.SIGSTOP)  # a network partition, as far as the queue can tell
    try:
        frozen = set(a.tracks("job_started")) - set(a.tracks("job_done"))
        assert frozen, "host a finished its job before the freeze"
        b.wait_for(lambda: frozen <= set(b.tracks("sidecar_written")), 180, "b to take over a's jobs")
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    a.wait_for(lambda: [e for e in a.events("lease_lost") if "discarded" in e.get("detail", "")], 120,
               "a to find its claim lost at write time")
    wait_all_done([a, b], names, timeout=180)
    time.sleep(2.0)
    written = Counter(t for h in (a, b) for t in h.tracks("sidecar_written"))
    assert written == Counter({n: 1 for n in names}), written
    assert b.status()["counts"] == {"queued": 0, "running": 0, "done": 6, "failed": 0}


def test_the_watchdog_keeps_being_pinged_while_the_queue_server_is_down(make_hosts, tmp_path):
    # systemd kills a daemon whose pings stop for WatchdogSec; an outage of the shared
    # queue must pause the work, not look like a hang.
    library, (host,) = make_hosts(1, lease=10)
    with NotifySocket(tmp_path / "notify.sock") as notify:
        host.env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}  # a ping every second

        def pings() -> list[float]:
            return [t for t, m in notify.received if m == "WATCHDOG=1"]

        start_all([host])
        host.wait_for(lambda: len(pings()) >= 2, 30, "first pings")
        make_hosts.cluster.stop()
        down = time.monotonic()
        try:
            time.sleep(8.0)
        finally:
            make_hosts.cluster.start()
        during = [down] + [t for t in pings() if t >= down] + [down + 8.0]
        gaps = [b - a for a, b in zip(during, during[1:])]
        assert max(gaps) < 2.0, f"watchdog pings stopped for {max(gaps):.1f} s while the server was down"
        add_tracks(library, ["After"])
        wait_all_done([host], ["After"], timeout=120)
        assert host.proc.poll() is None
