"""Manifests: content, atomic replacement under concurrency, reading back, compat."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_versions import V, probe_61, probe_612, probe_617, probe_json

from kvhost import manifest as mf
from kvhost import versions as ver
from kvhost.errors import UsageError
from kvhost.probe import Probe


def write(tmp: Path, name: str, probe: Probe) -> Path:
    path = tmp / name
    mf.write_atomic(path, mf.encode(mf.build(probe)))
    return path


def test_manifest_for_61_names_v5_and_embeds_the_probe() -> None:
    p = probe_61()
    m = mf.build(p, generated_at="2026-01-01T00:00:00.000000Z")
    assert m["schema"] == mf.SCHEMA == 1
    assert m["backend"] == "vhost-net"
    assert m["kernel_release"] == "6.1.0-56-amd64"
    assert m["latest"] == V[5]
    assert m["supported"] == [V[n] for n in range(1, 6)]
    assert m["versions"][V[5]] == ver.parse(V[5]).spec()
    assert Probe.from_json(m["probe"]) == p
    assert m["offer"]["unservable"] == ["ACCESS_PLATFORM"]
    assert m["generated_at"] == "2026-01-01T00:00:00.000000Z"
    assert json.loads(mf.encode(m)) == m


def test_generation_time_is_utc_now() -> None:
    before = time.time()
    stamp = mf.build(probe_61())["generated_at"]
    import datetime as dt

    t = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
    assert before - 1 <= t <= time.time() + 1


def test_a_host_serving_nothing_gets_no_manifest() -> None:
    p = Probe.from_json(probe_json("6.1", None, [], vhost_error="no /dev/vhost-net: modprobe"))
    with pytest.raises(mf.ManifestError, match=r"no manifest written.*no /dev/vhost-net"):
        mf.build(p)


def test_write_read_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path / "sub" / "dir", "vhost-net.json", probe_612())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["vhost-net.json"]  # no temp file left behind
    m = mf.read(path)
    assert m.latest.name == V[7]
    assert [v.name for v in m.supported] == [V[n] for n in range(1, 8)]
    assert m.offer == ver.host_offer(probe_612())
    assert m.kernel_release.startswith("6.12")


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = write(tmp_path, "vhost-net.json", probe_61())
    before = path.read_bytes()
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):  # root ignores the mode; make rename impossible
            os.chmod(tmp_path, 0o700)
            (tmp_path / "blocker").mkdir()
            with pytest.raises(mf.ManifestError, match="cannot write manifest"):
                mf.write_atomic(tmp_path / "blocker", b"{}")
            assert (tmp_path / "blocker").is_dir()
        else:
            with pytest.raises(mf.ManifestError, match="cannot write manifest"):
                mf.write_atomic(path, mf.encode(mf.build(probe_612())))
    finally:
        os.chmod(tmp_path, 0o700)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) in (["vhost-net.json"], ["blocker", "vhost-net.json"])


def test_failed_write_names_the_callers_kind_of_file(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    target = tmp_path / "not-a-dir" / "kvhost"
    with pytest.raises(mf.ManifestError) as err:
        mf.write_atomic(target, b"x", action="write NFD feature file")
    assert str(err.value) == f"cannot write NFD feature file {target}: File exists"
    with pytest.raises(mf.ManifestError, match=f"^cannot write manifest {target}: "):
        mf.write_atomic(target, b"x")


def _writer(path: str, ident: int, rounds: int) -> None:
    base = mf.build(probe_612() if ident % 2 else probe_61())
    for i in range(rounds):
        doc: dict[str, Any] = dict(base, writer=ident, round=i)
        # sizes differ between writers so a torn file could not still parse by luck
        doc["pad"] = "x" * (1000 * (ident % 7) + i)
        mf.write_atomic(Path(path), mf.encode(doc))


def test_concurrent_writers_and_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "vhost-net.json"
    mf.write_atomic(path, mf.encode(dict(mf.build(probe_61()), writer=-1, round=0, pad="")))
    writers, rounds, readers = 16, 25, 8
    reads = [0] * readers
    bad: list[str] = []
    stop = threading.Event()

    def reader(k: int) -> None:
        while not stop.is_set():
            try:
                text = path.read_text()
                doc = json.loads(text)
                m = mf.load(doc, str(path))
                assert len(doc["pad"]) == (
                    0 if doc["writer"] < 0 else 1000 * (doc["writer"] % 7) + doc["round"]
                )
                assert m.latest.name in (V[5], V[7])
            except Exception as err:  # any failure is the finding
                bad.append(f"{type(err).__name__}: {err}")
                return
            reads[k] += 1

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, rounds)) for w in range(writers)]
    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for t in threads:
        t.start()
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    stop.set()
    for t in threads:
        t.join()
    assert [p.exitcode for p in procs] == [0] * writers
    assert not bad, bad[:3]
    assert sum(reads) > readers, reads
    final = json.loads(path.read_text())
    assert final["writer"] >= 0 and final["round"] == rounds - 1
    assert os.listdir(tmp_path) == ["vhost-net.json"]


def _check_doc(text: str, where: str) -> tuple[int, int]:
    doc = json.loads(text)
    m = mf.load(doc, where)
    expected_pad = 0 if doc["writer"] < 0 else 1000 * (doc["writer"] % 7) + doc["round"]
    if len(doc["pad"]) != expected_pad:
        raise AssertionError(f"pad of writer {doc['writer']} round {doc['round']} is torn")
    if m.latest.name not in (V[5], V[7]):
        raise AssertionError(f"latest {m.latest.name}")
    return int(doc["writer"]), int(doc["round"])


def _race_writer(path: str, ident: int, rounds: int, start: Any) -> None:
    start.wait(60)
    _writer(path, ident, rounds)


def _race_reader(path: str, start: Any, done: Any, results: Any) -> None:
    reads, seen, error = 0, set(), None
    # readers yield the CPU to writers (and nap between reads below): 100 readers spinning
    # at full priority on 2 cores would starve the writers and stretch the test to minutes
    os.nice(19)
    start.wait(60)
    try:
        # one more read after the writers finished, so even a slow starter reads the end
        while True:
            last = done.is_set()
            with open(path) as f:
                seen.add(_check_doc(f.read(), path))
            reads += 1
            if last:
                break
            time.sleep(0.02)
    except Exception as err:  # any failure is the finding
        error = f"{type(err).__name__}: {err}"
    results.put((reads, len(seen), error))


def test_100_writer_and_100_reader_processes(tmp_path: Path) -> None:
    """Issue 6: 100 concurrent writers and readers, every read parses, the end is complete.

    Processes, not threads: 200 forked processes released by one barrier, so writes and
    reads really overlap on both cores (a thread reader would mostly wait for the GIL).
    """
    path = tmp_path / "vhost-net.json"
    mf.write_atomic(path, mf.encode(dict(mf.build(probe_61()), writer=-1, round=0, pad="")))
    writers, readers, rounds = 100, 100, 3
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Barrier(writers + readers), ctx.Event(), ctx.Queue()
    wprocs = [
        ctx.Process(target=_race_writer, args=(str(path), w, rounds, start))
        for w in range(writers)
    ]
    rprocs = [
        ctx.Process(target=_race_reader, args=(str(path), start, done, results))
        for _ in range(readers)
    ]
    for p in rprocs + wprocs:
        p.start()
    for p in wprocs:
        p.join(60)
    done.set()
    outcome = [results.get(timeout=60) for _ in rprocs]
    for p in rprocs:
        p.join(60)
    assert [p.exitcode for p in wprocs + rprocs] == [0] * (writers + readers)
    errors = [e for _, _, e in outcome if e]
    assert not errors, errors[:3]
    assert min(r for r, _, _ in outcome) >= 1, outcome
    # readers saw the file change under them: the race really happened
    assert max(s for _, s, _ in outcome) > 1, outcome[:5]
    final = mf.read(path)
    assert final.raw["round"] == rounds - 1 and 0 <= final.raw["writer"] < writers
    _check_doc(path.read_text(), str(path))
    assert os.listdir(tmp_path) == ["vhost-net.json"]


# --- reading errors -------------------------------------------------------------------------


def test_read_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot read manifest .*nope\.json"):
        mf.read(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UsageError, match=r"bad\.json is not valid JSON"):
        mf.read(bad)
    good = mf.build(probe_61())
    cases: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda d: d.update(schema=99), "has schema 99"),
        (lambda d: d.update(backend="dpdk"), "is for backend 'dpdk'"),
        (lambda d: d.pop("supported"), r"is malformed \(KeyError"),
        (
            lambda d: d["versions"].update({V[1]: ver.parse(V[2]).spec()}),
            f"defines {V[1]} as .* but the registry says",
        ),
    ]
    for mutate, fragment in cases:
        doc = json.loads(json.dumps(good))
        mutate(doc)
        bad.write_text(json.dumps(doc))
        with pytest.raises(UsageError, match=fragment):
            mf.read(bad)


def test_a_newer_writers_versions_are_read_from_their_specs(tmp_path: Path) -> None:
    doc = mf.build(probe_61())
    future = "org.kernel.vhost-net.v99"
    doc["supported"].append(future)
    doc["versions"][future] = ver.parse(V[5]).spec().replace("queue-size=1024", "queue-size=2048")
    doc["latest"] = future
    m = mf.load(doc, "future.json")
    assert m.latest.name == future and m.latest.max_queue_size == 2048


# --- compat ---------------------------------------------------------------------------------


def test_compat_612_and_61_is_v5_and_names_ring_reset(tmp_path: Path) -> None:
    a = mf.read(write(tmp_path, "612.json", probe_612()))
    b = mf.read(write(tmp_path, "61.json", probe_61()))
    result = mf.compat([a, b])
    assert result.version is not None and result.version.name == V[5]
    (reason,) = result.reasons
    assert "612.json (kernel 6.12.117+deb12-amd64)'s latest org.kernel.vhost-net.v7" in reason
    assert "cannot move to" in reason and "61.json (kernel 6.1.0-56-amd64)" in reason
    assert "RING_RESET" in reason and "GUEST_USO4" in reason
    assert mf.compat([b, a]).version == result.version


def test_compat_of_equal_hosts_has_no_reasons(tmp_path: Path) -> None:
    a = mf.read(write(tmp_path, "a.json", probe_617()))
    b = mf.read(write(tmp_path, "b.json", probe_617()))
    assert mf.compat([a, b]) == mf.Compat(ver.parse(V[8]), ())
    assert mf.compat([a]).version == ver.parse(V[8])


def test_compat_three_hosts_takes_the_oldest_common(tmp_path: Path) -> None:
    old = Probe.from_json(
        probe_json(
            "3.0.1", 0x3D008000, ["CSUM", "TSO4", "TSO6", "TSO_ECN", "UFO"], tun_features=0x7073
        )
    )
    hosts = [
        mf.read(write(tmp_path, f"{n}.json", p))
        for n, p in (("a", probe_617()), ("b", old), ("c", probe_61()))
    ]
    result = mf.compat(hosts)
    assert result.version is not None and result.version.name == V[3]
    assert any("b.json" in r and "MQ" in r and "VERSION_1" in r for r in result.reasons)


def test_compat_with_no_common_version_says_why(tmp_path: Path) -> None:
    doc = mf.build(probe_61())
    odd = json.loads(json.dumps(doc))
    odd.update(supported=[V[1]], latest=V[1])
    only_new = json.loads(json.dumps(doc))
    only_new.update(supported=[V[2]], latest=V[2])
    result = mf.compat([mf.load(odd, "odd.json"), mf.load(only_new, "new.json")])
    assert result.version is None
    assert result.reasons[0].startswith("no version is supported by every host (odd.json")
    assert result.to_json()["version"] is None
    with pytest.raises(UsageError):
        mf.compat([])
