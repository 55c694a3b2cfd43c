"""Read-only commands open a study by storage and name: run-only settings given on the command
line (the seed) need not be repeated, while a different search space or fitness is still refused."""

from __future__ import annotations

import yaml

from evomerge.cli import main
from reliability.harness import write_config


def test_read_only_commands_open_a_study_run_with_a_seed_override(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=2)
    where = ["--storage", f"sqlite:///{tmp_path}/s.db", "--study-name", "s"]
    assert main(["run", str(path), "--quiet", "--seed", "7", *where]) == 0
    capsys.readouterr()
    assert main(["status", str(path), *where]) == 0
    assert "seed 7" in capsys.readouterr().out  # the study's own settings, not the config's seed 0
    assert main(["archive", str(path), *where]) == 0
    assert main(["export", str(path), *where, "--trial", "0", "--out", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_read_only_commands_still_refuse_another_fitness(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=1)
    assert main(["run", str(path), "--quiet"]) == 0
    fitness = yaml.safe_load((tmp_path / "fitness.yaml").read_text())
    fitness["n_examples"] = 12
    (tmp_path / "fitness.yaml").write_text(yaml.safe_dump(fitness))
    capsys.readouterr()
    assert main(["status", str(path)]) == 2
    assert "different fitness" in capsys.readouterr().err


def test_run_with_another_seed_is_refused(tmp_path, zoo, capsys):
    path = write_config(tmp_path, zoo, n_trials=1)
    assert main(["run", str(path), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(path), "--quiet", "--seed", "3"]) == 2
    assert "different seed" in capsys.readouterr().err
