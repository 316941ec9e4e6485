"""Datasets of the local lm-eval tasks in this directory, read from JSONL files next to this file, so the tasks
work from any working directory and without network. lm-eval calls a task's `custom_dataset` with the task's
metadata and dataset_kwargs as keyword arguments and expects {split: datasets.Dataset}."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(file: str, **_) -> dict:
    rows = [json.loads(line) for line in (HERE / file).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
