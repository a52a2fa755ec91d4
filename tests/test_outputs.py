import os

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
