import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from animalcam import outputs


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_written_files_are_complete_and_readable_by_others(tmp_path, umask_022):
    target = tmp_path / "sub" / "metrics.json"
    outputs.write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temp file


def test_csv_round_trip(tmp_path):
    path = tmp_path / "rows.csv"
    outputs.write_csv(path, ("path", "label"), [("a,b.jpg", "cat"), ("c.jpg", "dog")])
    assert outputs.read_csv(path) == [
        {"path": "a,b.jpg", "label": "cat"},
        {"path": "c.jpg", "label": "dog"},
    ]


def test_replace_directory_swaps_in_only_on_success(tmp_path, umask_022):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), outputs.replace_directory(target) as staging:
        (staging / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "old.txt").read_text() == "old"

    with outputs.replace_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert target.stat().st_mode & 0o777 == 0o755


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def leftover(folder, name: str, pid: int, *, directory: bool = False, old: bool = True):
    """What a writer killed outright leaves: ``.<name>.<pid>-<random>.tmp``."""
    path = folder / f".{name}.{pid}-abcd1234.tmp"
    if directory:
        path.mkdir()
        (path / "half.txt").write_text("half")
    else:
        path.write_text("half")
    if old:  # from before this process started
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


@pytest.fixture
def fresh_sweep(monkeypatch):
    """Writers sweep each folder once per process; let each test sweep anew."""
    monkeypatch.setattr(outputs, "_swept", set())


def test_writers_remove_what_killed_writers_left(tmp_path, fresh_sweep):
    gone = dead_pid()
    leftover(tmp_path, "metrics.json", gone)
    leftover(tmp_path, "prepared", gone, directory=True)
    leftover(tmp_path, "raw.download", gone, directory=True)

    outputs.write_json(tmp_path / "metrics.json", {"a": 1})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_temp_files_of_live_or_newer_writers_are_kept(tmp_path, fresh_sweep):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = {
            leftover(tmp_path, "a.json", live.pid),  # a writer at work, in another process
            leftover(tmp_path, "b.json", os.getpid()),  # this process's own
            leftover(tmp_path, "c.json", dead_pid(), old=False),  # newer than this process
        }
        (tmp_path / ".hidden.tmp").write_text("not ours")
        (tmp_path / ".d.json.123.tmp").write_text("not ours")
        outputs.write_json(tmp_path / "x.json", {})
    finally:
        live.kill()
        live.wait()
    assert {p for p in tmp_path.iterdir()} == {
        *kept,
        tmp_path / "x.json",
        tmp_path / ".hidden.tmp",
        tmp_path / ".d.json.123.tmp",
    }


def test_temp_names_carry_the_writers_pid(tmp_path):
    names = []
    with outputs.replace_directory(tmp_path / "out") as staging:
        names.append(staging.name)
    with outputs.temporary_directory(tmp_path, "raw.download") as scratch:
        names.append(scratch.name)
    assert [name.split("-")[0] for name in names] == [
        f".out.{os.getpid()}",
        f".raw.download.{os.getpid()}",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interrupted_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def interrupted(src, dst):
        staging_done = Path(src).name.endswith(".tmp") and "-old" not in Path(src).name
        if staging_done and Path(dst) == target:
            raise KeyboardInterrupt  # between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), outputs.replace_directory(target) as staging:
        (staging / "new.txt").write_text("new")

    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["old.txt"]


def test_a_stop_whose_exception_was_lost_still_refuses_to_commit(tmp_path, monkeypatch):
    """A signal handler's exception raised inside a garbage-collector finalizer is lost;
    the stop must still keep the old outputs."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (tmp_path / "file.txt").write_text("old")
    monkeypatch.setattr(outputs, "_stop_signal", None)
    with pytest.raises(outputs.Terminated) as stopped, outputs.replace_directory(target) as new:
        (new / "new.txt").write_text("new")
        try:
            raise outputs.request_stop(15)
        except KeyboardInterrupt:
            pass  # what "Exception ignored in: <finalizer>" amounts to
    assert stopped.value.signal_name == "SIGTERM"
    with pytest.raises(outputs.Terminated):
        outputs.write_text(tmp_path / "file.txt", "new")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file.txt", "old.txt", "out"]
    assert (tmp_path / "file.txt").read_text() == "old"
    monkeypatch.setattr(outputs, "_stop_signal", None)
    outputs.write_text(tmp_path / "file.txt", "new")  # without a stop, commits as ever
    assert (tmp_path / "file.txt").read_text() == "new"
