"""Load a task's local JSONL splits relative to this folder, so the zoo tasks work from any
working directory, with `evomerge` and with the `lm_eval` command line alike (lm-eval
resolves plain `data_files` against the working directory). Referenced from the task YAMLs
as `custom_dataset: !function jsonl_splits.load`."""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load(data_files: dict, **_metadata) -> datasets.DatasetDict:
    """`data_files` maps split -> file or list of files, relative to this folder."""
    resolved = {split: [str(HERE / f) for f in ([files] if isinstance(files, str) else files)]
                for split, files in data_files.items()}
    return datasets.load_dataset("json", data_files=resolved)
