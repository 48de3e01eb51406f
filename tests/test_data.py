"""load_prompt_dataset: every source type, the errors, and determinism."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, DatasetDict

from trl_intrinsic.data import load_prompt_dataset

GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1, "color": "red"},
            {"class": "circle", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "a photo of a circle left of a red square",
    },
    {"tag": "counting", "include": [{"class": "triangle", "count": 3}], "exclude": [{"class": "triangle", "count": 4}],
     "prompt": "a photo of three triangles"},
]  # fmt: skip


def _write_jsonl(path, rows) -> None:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def test_txt_file_one_prompt_per_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  two blue squares  \n   \nthree green triangles", encoding="utf-8")
    ds = load_prompt_dataset(path)
    assert isinstance(ds, Dataset)
    assert ds["prompt"] == ["a red circle", "two blue squares", "three green triangles"]
    assert ds.column_names == ["prompt"]
    assert load_prompt_dataset(str(path))["prompt"] == ds["prompt"]


def test_geneval_jsonl_keeps_metadata_as_json_strings(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    _write_jsonl(path, GENEVAL_ROWS)
    ds = load_prompt_dataset(path)
    assert ds.column_names == ["prompt", "metadata"]
    assert ds["prompt"] == [r["prompt"] for r in GENEVAL_ROWS]
    assert all(isinstance(m, str) for m in ds["metadata"])
    # Optional keys and mixed-type lists survive exactly.
    assert [json.loads(m) for m in ds["metadata"]] == GENEVAL_ROWS


def test_flow_grpo_directory_layout_selects_the_split(tmp_path):
    (tmp_path / "train.txt").write_text("a red circle\na blue square\n", encoding="utf-8")
    (tmp_path / "test.txt").write_text("a green triangle\n", encoding="utf-8")
    assert load_prompt_dataset(tmp_path)["prompt"] == ["a red circle", "a blue square"]
    assert load_prompt_dataset(tmp_path, split="test")["prompt"] == ["a green triangle"]

    geneval = tmp_path / "geneval"
    geneval.mkdir()
    _write_jsonl(geneval / "test_metadata.jsonl", GENEVAL_ROWS[:2])
    ds = load_prompt_dataset(geneval, split="test")
    assert ds["prompt"] == [r["prompt"] for r in GENEVAL_ROWS[:2]] and "metadata" in ds.column_names


def test_saved_dataset_and_dataset_dict(tmp_path):
    Dataset.from_dict({"caption": ["a red circle", "a cat"], "score": [1, 2]}).save_to_disk(
        tmp_path / "single"
    )
    ds = load_prompt_dataset(tmp_path / "single")
    assert ds["prompt"] == ["a red circle", "a cat"]
    assert ds["score"] == [1, 2]  # other columns reach reward functions

    DatasetDict(
        train=Dataset.from_dict({"text": ["one", "two"]}), test=Dataset.from_dict({"text": ["three"]})
    ).save_to_disk(tmp_path / "dict")
    assert load_prompt_dataset(tmp_path / "dict", split="test")["prompt"] == ["three"]
    with pytest.raises(ValueError, match=r"validation.*\['test', 'train'\]"):
        load_prompt_dataset(tmp_path / "dict", split="validation")


def test_dataset_metadata_column_becomes_json(tmp_path):
    rows = [
        {"prompt": r["prompt"], "metadata": {"tag": r["tag"], "n": len(r["include"])}} for r in GENEVAL_ROWS
    ]
    Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    ds = load_prompt_dataset(tmp_path / "ds")
    assert [json.loads(m) for m in ds["metadata"]] == [r["metadata"] for r in rows]


def test_data_files_json_and_csv(tmp_path):
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps([{"caption": "a red circle", "id": 0}, {"caption": "a dog", "id": 1}]))
    ds = load_prompt_dataset("json", data_files=str(json_path))
    assert ds["prompt"] == ["a red circle", "a dog"] and ds["id"] == [0, 1]

    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("question,prompt,other\nq1,a blue square,x\nq2,a cat,y\n")
    # Explicit column: the chosen column becomes `prompt`, replacing the existing one.
    ds = load_prompt_dataset("csv", data_files=str(csv_path), prompt_column="question")
    assert ds["prompt"] == ["q1", "q2"] and ds["other"] == ["x", "y"]
    assert load_prompt_dataset("csv", data_files=str(csv_path))["prompt"] == ["a blue square", "a cat"]


def test_missing_prompt_column_lists_columns(tmp_path):
    Dataset.from_dict({"question": ["x"], "answer": ["y"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"\['question', 'answer'\].*prompt_column"):
        load_prompt_dataset(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"prompt_column='caption'.*\['question', 'answer'\]"):
        load_prompt_dataset(tmp_path / "ds", prompt_column="caption")
    assert load_prompt_dataset(tmp_path / "ds", prompt_column="question")["prompt"] == ["x"]

    path = tmp_path / "meta.jsonl"
    _write_jsonl(path, [{"tag": "colors", "caption": "a red circle"}, {"tag": "colors"}])
    with pytest.raises(ValueError, match=r"line 2.*\['tag'\]"):
        load_prompt_dataset(path)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        load_prompt_dataset(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_prompt_dataset(str(tmp_path / "nowhere"))

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt.*no prompts"):
        load_prompt_dataset(empty)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_prompt_dataset(bad)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('["a red circle"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_prompt_dataset(not_object)

    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match=r"binary\.txt.*UTF-8"):
        load_prompt_dataset(binary)

    (tmp_path / "prompts.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="prompt_column"):
        load_prompt_dataset(tmp_path / "prompts.txt", prompt_column="text")
    with pytest.raises(ValueError, match="num_prompts"):
        load_prompt_dataset(tmp_path / "prompts.txt", num_prompts=0)
    with pytest.raises(TypeError, match="num_prompts"):
        load_prompt_dataset(tmp_path / "prompts.txt", num_prompts=2.5)


def test_num_prompts_subset_is_seeded(tmp_path):
    path = tmp_path / "prompts.txt"
    prompts = [f"prompt number {i}" for i in range(50)]
    path.write_text("\n".join(prompts), encoding="utf-8")
    a = load_prompt_dataset(path, num_prompts=10, seed=0)["prompt"]
    assert len(a) == 10 and len(set(a)) == 10 and set(a) <= set(prompts)
    assert load_prompt_dataset(path, num_prompts=10, seed=0)["prompt"] == a
    assert load_prompt_dataset(path, num_prompts=10, seed=1)["prompt"] != a
    # More than available: every prompt, in file order.
    assert load_prompt_dataset(path, num_prompts=500)["prompt"] == prompts


def test_toyworld_prompts():
    from trl_intrinsic import toyworld

    ds = load_prompt_dataset("toyworld", num_prompts=40, seed=3)
    assert len(ds) == 40 and ds.column_names == ["prompt", "metadata"]
    expected = toyworld.sample_metadata(40, seed=3, split="train")
    assert ds["prompt"] == [m["prompt"] for m in expected]
    assert [json.loads(m) for m in ds["metadata"]] == expected
    assert load_prompt_dataset("toyworld", num_prompts=40, seed=3)["metadata"] == ds["metadata"]
    assert load_prompt_dataset("toyworld", num_prompts=40, seed=4)["prompt"] != ds["prompt"]

    test = load_prompt_dataset("toyworld", split="test", num_prompts=20)
    assert test["prompt"] == [m["prompt"] for m in toyworld.sample_metadata(20, seed=0, split="test")]
    position = load_prompt_dataset("toyworld", num_prompts=10, tags=["position"])
    assert {json.loads(m)["tag"] for m in position["metadata"]} == {"position"}
    assert len(load_prompt_dataset("toyworld")) == 1000


def test_local_data_directory_and_unreachable_hub_name(tmp_path):
    data_dir = tmp_path / "csv_dir"
    data_dir.mkdir()
    (data_dir / "train.csv").write_text("text,label\na red circle,1\na blue square,0\n")
    ds = load_prompt_dataset(data_dir)
    assert ds["prompt"] == ["a red circle", "a blue square"] and ds["label"] == [1, 0]
    # Tests run with HF_HUB_OFFLINE=1: an uncached hub name fails with a clear error.
    with pytest.raises(FileNotFoundError, match=r"some-org/no-such-prompts.*toyworld"):
        load_prompt_dataset("some-org/no-such-prompts")
