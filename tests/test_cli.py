"""The command line: bad input gives one clear line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from evomerge.cli import main


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("recipe, message", [
    (None, "cannot read recipe"),
    ("method: ties\nmodels: [a\n", "not valid YAML (line"),
    ("method: nope\nmodels: [a]\n", "unknown merge method 'nope'"),
    ("method: linear\nmodels: [{model: no/such/dir/x, parameters: {weight: 1}}]\n", "no such directory"),
    ("method: linear\nmodels: [{model: evomerge/zoo_models/base, parameters: {weight: one}}]\n", "expected a finite number"),
    ("method: ties\nbase_model: evomerge/zoo_models/base\nmodels: [{model: evomerge/zoo_models/expert_rev, "
     "parameters: {weight: [1, 2, 3]}}]\n", "has 3 values but a 4-layer model"),
])
def test_bad_input_is_one_line(tmp_path, capsys, recipe, message):
    path = write(tmp_path, recipe) if recipe is not None else str(tmp_path / "missing.yaml")
    assert main(["merge", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evomerge: error:") and message in err[0], err


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["merge", "runs/examples/zoo_linear.yaml", "--out", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["merge", "runs/examples/zoo_linear.yaml", "--out", str(blocker / "sub")]) == 2
    assert "cannot create" in capsys.readouterr().err


def test_installed_command_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "x.yaml"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("evomerge: error: cannot read recipe")
