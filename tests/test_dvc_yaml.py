"""dvc.yaml's deps say what each stage really runs and reads, so that `dvc repro` reruns
exactly the stages a change touches."""

import dataclasses
import textwrap

import pytest
import yaml
from dvc_code_deps import (
    REPO_ROOT,
    code_deps,
    expected_code_deps,
    listed_code_deps,
    rewrite,
    stage_script,
)

from animalcam.params import Params

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_code_deps_are_the_stage_script_and_what_it_imports(name):
    expected = expected_code_deps()[name]
    listed = listed_code_deps(STAGES[name])
    missing = sorted(set(expected) - set(listed))
    extra = sorted(set(listed) - set(expected))
    assert not missing and not extra, (
        f"dvc.yaml stage {name}: code deps missing {missing}, not imported {extra}; "
        "refresh them with `python tests/dvc_code_deps.py`"
    )
    assert listed == expected, "in the order `python tests/dvc_code_deps.py` writes"


def test_stage_scripts_are_named_after_their_stage():
    for name, stage in STAGES.items():
        assert stage_script(stage["cmd"]) == f"stages/{name}.py"


def test_function_level_imports_count(tmp_path):
    package = tmp_path / "src" / "animalcam"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "light.py").write_text("from animalcam import deep\n")
    (package / "deep.py").write_text("import json\n")
    (package / "heavy.py").write_text("from animalcam.deep import x\n")
    (package / "unused.py").write_text("")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "s.py").write_text(
        textwrap.dedent(
            """
            import animalcam.light
            def main():
                from animalcam import heavy
            """
        )
    )
    assert code_deps("stages/s.py", tmp_path) == [
        "stages/s.py",
        "src/animalcam/__init__.py",
        "src/animalcam/deep.py",
        "src/animalcam/heavy.py",
        "src/animalcam/light.py",
    ]


def test_rewrite_replaces_code_lines_only_and_keeps_comments():
    text = textwrap.dedent(
        """\
        # header
        stages:
          a:
            cmd: python stages/a.py
            deps:
              - stages/a.py
              - src/animalcam/old.py
              - data/raw  # why
            params:
              - a
        """
    )
    new = rewrite(text, {"a": ["stages/a.py", "src/animalcam/new.py"]})
    assert new == text.replace("old.py", "new.py")
    assert rewrite(new, {"a": ["stages/a.py", "src/animalcam/new.py"]}) == new


def _param_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        yield key
        if dataclasses.is_dataclass(value):
            yield from _param_keys(value, key + ".")


def test_params_deps_name_real_keys_and_never_the_speed_section():
    known = set(_param_keys(Params()))
    for name, stage in STAGES.items():
        for key in stage.get("params", []):
            assert key in known, f"dvc.yaml stage {name}: no param {key}"
            assert key.split(".")[0] != "speed", (
                f"dvc.yaml stage {name} lists {key}: speed switches must rerun nothing"
            )


def test_every_result_changing_section_is_some_stages_dep():
    listed = {key.split(".")[0] for stage in STAGES.values() for key in stage.get("params", [])}
    sections = {f.name for f in dataclasses.fields(Params)}
    # mlflow names where results are logged; speed changes how fast, not what.
    assert listed == sections - {"mlflow", "speed"}
