"""Prompt sets as ``datasets.Dataset``: hub datasets, local files, GenEval metadata, the toy world.

Every loader returns a dataset with a ``prompt`` column. Sources that carry per-prompt metadata
(GenEval ``.jsonl`` files, the toy world, datasets with a ``metadata`` column) also get a
``metadata`` column holding one JSON **string** per row: GenEval metadata has optional keys and
mixed-type lists that Arrow cannot store as a struct column. Rewards that need it (e.g. the toy
verifier) parse the string. Other columns of a dataset are kept: trainers pass every column to
reward functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["PROMPT_COLUMN_CANDIDATES", "load_prompt_dataset"]

PROMPT_COLUMN_CANDIDATES: tuple[str, ...] = ("prompt", "text", "caption", "prompts")
"""Column names tried, in order, when ``prompt_column`` is not given."""

TOYWORLD = "toyworld"
_DEFAULT_TOYWORLD_PROMPTS = 1000
# Flow-GRPO's prompt-set layout: ``<dir>/{split}.txt`` or ``<dir>/{split}_metadata.jsonl``.
_SPLIT_FILES = ("{split}_metadata.jsonl", "{split}.txt")


def load_prompt_dataset(
    source: str | os.PathLike,
    *,
    split: str = "train",
    prompt_column: str | None = None,
    num_prompts: int | None = None,
    seed: int = 0,
    **kwargs: Any,
):
    """Load a prompt set as a ``datasets.Dataset`` with a ``prompt`` column.

    Args:
        source: one of
            * ``"toyworld"``: GenEval-style toy-world prompts from
              :func:`trl_intrinsic.toyworld.sample_metadata` (``num_prompts`` of them, 1000 by default);
              ``kwargs`` go to ``sample_metadata`` (e.g. ``tags=["position"]``);
            * a ``.txt`` file: one prompt per line (Flow-GRPO's format; blank lines are skipped);
            * a ``.jsonl`` file: one JSON object per line with a prompt key (GenEval's
              ``evaluation_metadata.jsonl`` format); the whole object is kept as ``metadata``;
            * a directory with ``{split}.txt`` or ``{split}_metadata.jsonl`` (Flow-GRPO's layout);
            * a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
            * anything else ``datasets.load_dataset(source, split=split, **kwargs)`` reads: a hub
              dataset name, a local dataset directory, or a builder name such as ``"json"`` or
              ``"csv"`` with ``data_files=...``.
        split: the split to read (``DatasetDict`` sources, Flow-GRPO directories, the toy world).
        prompt_column: the column (or JSON key) holding the prompt. Default: the first of
            :data:`PROMPT_COLUMN_CANDIDATES` present.
        num_prompts: keep a random subset of this many rows (all rows if the source has fewer);
            for the toy world, the number of prompts sampled. ``None``: all rows.
        seed: seeds the subset and the toy-world sampler: equal arguments give equal datasets.
        **kwargs: forwarded to ``datasets.load_dataset`` or, for the toy world, to
            ``sample_metadata``. Local files and saved datasets take none.

    Returns:
        A ``datasets.Dataset`` with a ``prompt`` column, a ``metadata`` column of JSON strings where
        the source has metadata, and the source's other columns.

    Raises:
        FileNotFoundError: ``source`` looks like a local path but does not exist, or cannot be
            loaded by ``datasets``.
        ValueError: the source is empty or malformed, the prompt column is missing, or the split
            does not exist.
    """
    if num_prompts is not None and (isinstance(num_prompts, bool) or not isinstance(num_prompts, int)):
        raise TypeError(f"num_prompts: expected an int or None, got {type(num_prompts).__name__}")
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"num_prompts: must be ≥ 1 (or None for all prompts), got {num_prompts}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")

    if isinstance(source, str) and source == TOYWORLD:
        return _load_toyworld(split=split, num_prompts=num_prompts, seed=seed, **kwargs)

    path = Path(source)
    if path.is_dir() and not kwargs:
        for pattern in _SPLIT_FILES:
            if (path / pattern.format(split=split)).is_file():
                path = path / pattern.format(split=split)
                break
    if path.is_file() and path.suffix in (".txt", ".jsonl"):
        if kwargs:
            raise TypeError(f"Unexpected keyword arguments {sorted(kwargs)} for a local {path.suffix} file.")
        if path.suffix == ".txt":
            if prompt_column is not None:
                raise ValueError(
                    f"prompt_column={prompt_column!r} does not apply to {path}: a .txt file holds one prompt "
                    "per line and no columns. Drop prompt_column."
                )
            dataset = _read_txt(path)
        else:
            dataset = _read_jsonl(path, prompt_column)
    else:
        dataset = _load_with_datasets(source, path, split=split, **kwargs)
        dataset = _standardize_columns(dataset, prompt_column, str(source))

    if len(dataset) == 0:
        raise ValueError(f"{source}: no prompts found (split={split!r}); expected at least one row.")
    if num_prompts is not None and num_prompts < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(num_prompts)).flatten_indices()
    return dataset


def _load_toyworld(*, split: str, num_prompts: int | None, seed: int, **kwargs: Any):
    from datasets import Dataset

    from trl_intrinsic import toyworld  # light, but only needed here

    n = _DEFAULT_TOYWORLD_PROMPTS if num_prompts is None else num_prompts
    metadata = toyworld.sample_metadata(n, seed=seed, split=split, **kwargs)
    return Dataset.from_dict(
        {"prompt": [m["prompt"] for m in metadata], "metadata": [json.dumps(m) for m in metadata]}
    )


def _read_txt(path: Path):
    from datasets import Dataset

    prompts = [line.strip() for line in _read_lines(path)]
    return Dataset.from_dict({"prompt": [p for p in prompts if p]})


def _read_jsonl(path: Path, prompt_column: str | None):
    from datasets import Dataset

    prompts, metadata = [], []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
        key = _prompt_key(row.keys(), prompt_column, f"{path}, line {number}")
        prompts.append(row[key])
        metadata.append(json.dumps(row))
    return Dataset.from_dict({"prompt": prompts, "metadata": metadata})


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason}).") from err


def _load_with_datasets(source: str | os.PathLike, path: Path, *, split: str, **kwargs: Any):
    import datasets

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        if kwargs:
            raise TypeError(
                f"Unexpected keyword arguments {sorted(kwargs)} for a dataset saved with save_to_disk."
            )
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"{path}: no split {split!r}; available splits: {sorted(loaded)}. Pass split=..."
                )
            loaded = loaded[split]
        return loaded

    looks_local = (
        path.exists() or str(source).startswith((".", "/", "~")) or path.suffix in (".txt", ".jsonl")
    )
    if looks_local and not path.exists():
        raise FileNotFoundError(
            f"{source}: no such file or directory; expected a .txt or .jsonl prompt file, a dataset "
            "directory, a hub dataset name or 'toyworld'."
        )
    try:
        return datasets.load_dataset(str(source), split=split, **kwargs)
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"{source}: cannot read split {split!r} ({err}). Pass split=...") from err
        raise
    except Exception as err:
        kind = "local path" if looks_local else "dataset name"
        raise FileNotFoundError(
            f"{source}: the {kind} could not be loaded with datasets.load_dataset "
            f"({type(err).__name__}: {err}). Expected a .txt or .jsonl prompt file, a dataset directory, "
            "a hub dataset name (reachable or cached) or 'toyworld'."
        ) from err


def _prompt_key(columns: Sequence[str] | Any, prompt_column: str | None, where: str) -> str:
    columns = list(columns)
    if prompt_column is not None:
        if prompt_column in columns:
            return prompt_column
        raise ValueError(
            f"{where}: prompt_column={prompt_column!r} not found; available columns: {columns}. "
            "Pass prompt_column= one of them."
        )
    for candidate in PROMPT_COLUMN_CANDIDATES:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"{where}: no prompt column among {list(PROMPT_COLUMN_CANDIDATES)}; available columns: {columns}. "
        "Pass prompt_column= the column holding the prompts."
    )


def _standardize_columns(dataset, prompt_column: str | None, where: str):
    """Rename the prompt column to ``prompt`` and store ``metadata`` as JSON strings."""
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):  # an IterableDatasetDict
        raise ValueError(f"{where}: expected a Dataset, got {type(dataset).__name__}.")
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"{where}: streaming datasets are not supported; pass streaming=False.")
    key = _prompt_key(dataset.column_names, prompt_column, where)
    if key != "prompt":
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(key, "prompt")
    if "metadata" in dataset.column_names:
        feature = dataset.features["metadata"]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            dataset = dataset.map(
                lambda row: {"metadata": json.dumps(row["metadata"])},
                desc="Serializing metadata to JSON",
            )
    return dataset
