"""``owm backup prune``: restic's keep rules (a hypothesis test against a simple reference over
random backup dates), the CLI against a real daemon (every remaining backup restores byte for
byte), garbage collection beside a running backup (stopped with SIGSTOP while prune runs, and
the exact race in-process), and a prune killed with SIGKILL in the middle of its collection.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import blake3
from backup_helpers import create, ok, ok_json, preserve, random_writes, read_image, refused, write
from conftest import OWM, Daemon, cli_env, run_owm
from hypothesis import given, settings
from hypothesis import strategies as st

from owm.backup.manifest import COMPLETE, INCOMPLETE, ChunkMap, Manifest
from owm.backup.prune import RULES, Policy, apply_policy, bucket
from owm.backup.repo import Repository, utc_now
from owm.backup.restore import restore_backup
from owm.backup.verify import verify_backups

CHUNK = 64 * 1024


# -- the rules ---------------------------------------------------------------------------------
def reference(items: list[tuple[str, datetime]], policy: Policy) -> set[str]:
    """restic's rules said plainly: per rule, the newest backup of each of the N most recent
    periods that hold one (``last``: the N newest backups); the union of all rules."""
    newest_first = sorted(items, key=lambda x: (x[1], x[0]), reverse=True)
    kept: set[str] = set()
    for rule in RULES:
        n = getattr(policy, rule)
        if rule == "last":
            kept.update(i for i, _ in newest_first[:n])
            continue
        periods: list[tuple[int, ...]] = []
        best: dict[tuple[int, ...], str] = {}
        for backup_id, when in newest_first:
            period = bucket(rule, when, 0)
            if period not in best:
                best[period] = backup_id
                periods.append(period)
        kept.update(best[p] for p in sorted(periods, reverse=True)[:n])
    return kept


START = datetime(2024, 12, 20, tzinfo=UTC)
dates = st.lists(st.integers(min_value=0, max_value=3 * 365 * 24 * 60), min_size=0, max_size=60)
counts = st.integers(min_value=0, max_value=6)


@settings(max_examples=300, deadline=None)
@given(dates, counts, counts, counts, counts, counts, counts)
def test_keep_rules_match_the_reference(minutes: list[int], last: int, hourly: int, daily: int,
                                        weekly: int, monthly: int, yearly: int) -> None:
    # Minutes over three years, with repeats and clusters (several backups an hour or a day).
    items = [(f"b{k:03d}", START + timedelta(minutes=m)) for k, m in enumerate(minutes)]
    policy = Policy(last, hourly, daily, weekly, monthly, yearly)
    keep, remove = apply_policy(items, policy)
    assert set(keep) == reference(items, policy)
    assert set(keep) | set(remove) == {i for i, _ in items}
    assert not set(keep) & set(remove)


# -- the command against a real daemon --------------------------------------------------------
def _set_time(repo: Path, backup_id: str, when: datetime) -> None:
    r = Repository.open(repo)
    m = r.load(backup_id)
    m.preserved_at = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    r.save(m)


def _backups(daemon: Daemon, repo: Path, count: int) -> dict[str, bytes]:
    """``count`` backups of successive images of vol (8 changed chunks each): id -> content."""
    rng = random.Random("prune")
    out: dict[str, bytes] = {}
    for _ in range(count):
        write(daemon, [(rng.randrange(64) * CHUNK, rng.randbytes(CHUNK)) for _ in range(8)])
        image = preserve(daemon)
        data = read_image(daemon, image)
        summary = ok_json(daemon.owm("backup", image, "--to", repo, "--json", "--release"))
        out[summary["id"]] = data
    return out


def _restores(repo: Path, expected: dict[str, bytes]) -> None:
    """Every backup restores byte for byte and verifies (in-process: the CLI's own code)."""
    target = repo.parent / "check.raw"
    for backup_id, data in expected.items():
        asyncio.run(restore_backup(repo, backup_id, f"file:{target}"))
        assert target.read_bytes() == data, backup_id
        target.unlink()
    reports = verify_backups(Repository.open(repo))
    assert all(r.ok and r.state == "complete" for r in reports), reports


def _chunk_files(repo: Path) -> set[str]:
    return {p.name for p in (repo / "chunks").glob("*/*")}


def _age(repo: Path) -> None:
    """Date every chunk an hour back, as if the backups were made long ago (a collection
    spares chunks touched since it began and since the oldest running backup began)."""
    old = time.time() - 3600
    for path in (repo / "chunks").glob("*/*"):
        os.utime(path, (old, old))


def test_prune_keeps_what_the_rules_say_and_the_rest_restores(daemon: Daemon,
                                                              short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, random_writes(random.Random("base"), 4 << 20, 8))
    expected = _backups(daemon, repo, 5)
    ids = sorted(expected)
    days = [START + timedelta(days=d, hours=h) for d, h in ((0, 1), (1, 2), (1, 9), (2, 3),
                                                            (2, 4))]
    for backup_id, when in zip(ids, days, strict=True):
        _set_time(repo, backup_id, when)
    _age(repo)
    before = _chunk_files(repo)
    dry = ok_json(daemon.owm("backup", "prune", repo, "--keep-daily", "2", "--dry-run",
                             "--json"))
    # Newest of each of the 2 most recent days: day 2 -> ids[4], day 1 -> ids[2].
    assert {r["id"] for r in dry["kept"]} == {ids[4], ids[2]}
    assert {r["id"] for r in dry["removed"]} == {ids[0], ids[1], ids[3]}
    assert _chunk_files(repo) == before and len(os.listdir(repo / "backups")) >= 5
    done = ok_json(daemon.owm("backup", "prune", repo, "--keep-daily", "2", "--keep-last", "1",
                              "--json"))
    assert {r["id"] for r in done["removed"]} == {ids[0], ids[1], ids[3]}
    assert done["chunks_removed"] > 0 and done["chunks_removed"] == dry["chunks_removed"]
    listed = {b["id"] for b in ok_json(daemon.owm("backup", "list", repo, "--json"))}
    assert listed == {ids[2], ids[4]}
    _restores(repo, {i: expected[i] for i in listed})
    text = ok(daemon.owm("backup", "prune", repo, "--keep-last", "1", "--volume", "other"))
    assert text.startswith("Removed 0 backups") and "Freed 0 chunks" in text
    assert "keep" in refused(daemon.owm("backup", "prune", repo))
    assert "restic" in ok(daemon.owm("backup", "prune", "--help"))


# -- beside a running backup -------------------------------------------------------------------
def test_collection_keeps_a_chunk_a_running_backup_just_reused(short_tmp: Path) -> None:
    """The exact race, in-process: a backup that holds its running-lock finds a chunk that no
    manifest names (it is about to name it); a collection runs before its manifest does."""
    repo = Repository.open(short_tmp / "repo", create=True)
    data = random.randbytes(CHUNK)
    digest = blake3.blake3(data).digest()
    repo.put_chunk(digest, data)
    old = time.time() - 3600
    os.utime(repo.chunk_path(digest), (old, old))  # stored long ago by a backup since deleted
    backup_id, fd = repo.new_id("vol@0")
    try:
        with repo.locked(exclusive=False):  # as a backup holds it, all along
            assert repo.has_chunk(digest)  # the running backup decides to reuse it
            assert repo.collect_garbage() == (0, 0)
            chunk_map = ChunkMap(1)
            chunk_map.put(0, digest)
            m = Manifest(id=backup_id, volume="vol", image="vol@0", generation=0, size=CHUNK,
                         chunk_size=CHUNK, state=INCOMPLETE,
                         consistency="transaction-consistent", started_at=utc_now(),
                         map_data=chunk_map)
            repo.sync()
            m.state, m.completed_at = COMPLETE, utc_now()
            repo.save(m)
    finally:
        repo.finish(backup_id, fd)
    assert repo.collect_garbage() == (0, 0)
    assert repo.get_chunk(digest, CHUNK) == data
    # Once nothing names it and nobody touched it since, it goes.
    repo.remove_manifest(backup_id)
    os.utime(repo.chunk_path(digest), (old, old))
    assert repo.collect_garbage()[0] == 1 and not repo.has_chunk(digest)


def _rchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def test_prune_while_a_backup_runs_leaves_it_complete_and_restorable(daemon: Daemon,
                                                                     short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    size = 24 << 20
    create(daemon, "vol", "24M")
    write(daemon, [(o, random.randbytes(1 << 20)) for o in range(0, size, 1 << 20)])
    first = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    write(daemon, [(0, b"n" * CHUNK)])
    second = ok_json(daemon.owm("backup", preserve(daemon), "--to", repo, "--json"))["id"]
    # A second volume with the content of vol@0: its full backup reuses vol@0's chunks, which
    # the prune below leaves to nobody but that running backup.
    write(daemon, [(0, b"x" * CHUNK)])
    ok(daemon.owm("restore", repo, first, "--to", "twin"))
    image = preserve(daemon, "twin")
    expected = read_image(daemon, image)
    _age(repo)
    env = cli_env(OWM_BACKUP_CHECKPOINT_SECONDS="600")
    proc = subprocess.Popen([*OWM, "--pool", str(daemon.pool), "backup", image, "--to",
                             str(repo), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    stopped = False
    try:
        deadline = time.monotonic() + 60
        base: int | None = None
        while proc.poll() is None and time.monotonic() < deadline:
            if base is None and list((repo / "backups").glob("twin@0-*.json")):
                base = _rchar(proc.pid)  # its manifest is saved: reading starts
            elif base is not None and _rchar(proc.pid) - base > 4 << 20:
                proc.send_signal(signal.SIGSTOP)
                stopped = True
                break
            time.sleep(0.001)
        pruned = ok_json(daemon.owm("backup", "prune", repo, "--volume", "vol", "--keep-last",
                                    "1", "--json"))
        assert [r["id"] for r in pruned["removed"]] == [first]
    finally:
        if stopped:
            proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    summary = ok_json(subprocess.CompletedProcess([], 0, out, err))
    # ``stopped``: it was stopped mid-way (it nearly always is; 384 of its chunks were reused
    # when this was written); otherwise it ended before the prune, which must also hold.
    target = short_tmp / "twin.raw"
    ok(daemon.owm("restore", repo, summary["id"], "--to", target))
    assert target.read_bytes() == expected
    ok(daemon.owm("backup", "verify", repo))
    assert {b["id"] for b in ok_json(daemon.owm("backup", "list", repo, "--json"))} == {
        second, summary["id"]}


# -- killed in the middle of its collection ---------------------------------------------------
def test_prune_killed_mid_collection_resumes_and_every_backup_restores(daemon: Daemon,
                                                                       short_tmp: Path) -> None:
    repo = short_tmp / "repo"
    create(daemon, "vol", "4M")
    write(daemon, random_writes(random.Random("kill"), 4 << 20, 8))
    expected = _backups(daemon, repo, 3)
    ids = sorted(expected)
    _age(repo)
    env = cli_env(OWM_TEST_GC_STOP_AFTER="3")
    proc = subprocess.Popen([*OWM, "backup", "prune", str(repo), "--keep-last", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list((repo / "chunks").glob("*/*.gc")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate()
    assert list((repo / "chunks").glob("*/*.gc"))  # killed with chunks moved aside
    # The manifests went first: what is left restores even before the collection is rerun.
    assert {b["id"] for b in ok_json(daemon.owm("backup", "list", repo, "--json"))} == {ids[2]}
    _restores(repo, {ids[2]: expected[ids[2]]})
    result = run_owm("backup", "prune", repo, "--keep-last", "1", "--json")
    again = ok_json(result)
    assert again["removed"] == [] and again["chunks_removed"] > 0
    assert not list((repo / "chunks").glob("*/*.gc"))
    _restores(repo, {ids[2]: expected[ids[2]]})
    r = Repository.open(repo)
    assert _chunk_files(repo) == {d.hex() for d in r.load(ids[2]).chunk_map.digests()}
