"""The offline GLUE story (``python -m utils.glue_quickstart``) at its reduced CI size on a synthetic GLUE folder:
every stage runs through the three GLUE scripts, the tables list every task and method, and a second run is cached."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from utils.cli import run_main
from utils.glue_data_loader import load_raw_split
from utils.glue_merging import METHODS
from utils.glue_quickstart import main

WORDS = "the a film movie was good bad great awful not very fun dull cat dog sat ran on mat".split()


def _sentence(i: int) -> str:
    return " ".join(WORDS[(i * (j + 2) + j) % len(WORDS)] for j in range(3 + i % 4))


def _write_glue(d: Path) -> None:
    (d / "SST-2").mkdir(parents=True)
    (d / "CoLA").mkdir()
    (d / "STS-B").mkdir()
    (d / "MNLI").mkdir()
    (d / "QNLI").mkdir()
    for name, n in (("train.tsv", 80), ("dev.tsv", 30)):
        (d / "SST-2" / name).write_text(
            "sentence\tlabel\n" + "".join(f"{_sentence(i)}\t{i % 2}\n" for i in range(n))
        )
        (d / "CoLA" / name).write_text("".join(f"src\t{i % 2}\t\t{_sentence(i)}\n" for i in range(n)))
        (d / "STS-B" / name).write_text(
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            + "".join(
                f"{i}\tg\tf\ty\t0\tn\tn\t{_sentence(i)}\t{_sentence(i + 1)}\t{(i % 21) / 4:.2f}\n"
                for i in range(n)
            )
        )
    (d / "QNLI" / "dev.tsv").write_text(
        "index\tquestion\tsentence\tlabel\n"
        + "".join(
            f"{i}\t{_sentence(i)}\t{_sentence(i + 3)}\t{('entailment', 'not_entailment')[i % 2]}\n"
            for i in range(100)
        )
    )
    labels = ["entailment", "neutral", "contradiction"]
    (d / "MNLI" / "dev_matched.jsonl").write_text(
        "".join(json.dumps({"premise": _sentence(i), "hypothesis": _sentence(i + 5), "label": labels[i % 3]}) + "\n"
                for i in range(120))
    )  # fmt: skip


def _rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_glue_story_ci_size_and_cache(tmp_path):
    glue = tmp_path / "glue"
    _write_glue(glue)
    before = sorted((p.name, p.stat().st_size) for p in glue.rglob("*"))
    out = tmp_path / "story"
    load_raw_split.cache_clear()
    argv = ["--size", "ci", "--output_dir", str(out), "--glue_data_dir", str(glue), "--threads", "1"]
    first = main(argv)
    tasks = ["sst2", "stsb", "qnli", "mnli"]
    assert first["tasks"] == tasks and not any(first["cached"].values())
    models = _rows(out / "glue_models.csv")
    assert [r["task"] for r in models] == tasks
    assert [r["metric"] for r in models] == ["accuracy", "averaged_scores", "accuracy", "accuracy"]
    # a learning rate per task (the CI size: 1e-3 for the single-sentence tasks, 5e-4 for the re-splits), found by
    # the DARE and merge scripts through --learning_rate sst2=0.001,...
    folders = sorted(f"{p.parent.name}/{p.name}" for p in out.glob("runs/*/models/*/tiny-bert_lr*"))
    assert folders == ["mnli/tiny-bert_lr0.0005", "qnli/tiny-bert_lr0.0005", "sst2/tiny-bert_lr0.001",
                       "stsb/tiny-bert_lr0.001"]  # fmt: skip
    dare = _rows(out / "glue_dare.csv")
    assert list(dare[0]) == [
        "task",
        "fine-tuned",
        "DARE 0.5",
        "DARE 0.9",
        "DARE 0.99",
        "DropOnly 0.9",
        "magnitude 0.9",
    ]
    plain = [m for m in METHODS if m != "mask_merging"]
    pair_methods = [r["method"] for r in _rows(out / "glue_pairwise.csv")]
    assert pair_methods[: len(plain)] == plain and any(m.startswith("DARE + ") for m in pair_methods)
    all_methods = [r["method"] for r in _rows(out / "glue_all_tasks.csv")]
    assert all_methods[0] == "fine-tuned (individual)"
    assert "slerp_merging" in pair_methods and "slerp_merging" not in all_methods  # SLERP merges two models
    # method, the 4 pairs of the cycle sst2→stsb→qnli→mnli→sst2, mean
    assert list(_rows(out / "glue_pairwise.csv")[0])[1:-1] == [
        "sst2→stsb",
        "stsb→qnli",
        "qnli→mnli",
        "mnli→sst2",
    ]
    for name in ("glue_story.md", "glue_dare_drop_rate.png", "glue_all_tasks.png"):
        assert (out / name).stat().st_size > 100, name
    assert set(first["findings"]) == {
        "dare_keeps_up_to_0.9",
        "dare_plus_x_beats_x",
        "finetuned_beat_majority",
    }
    # the MNLI and QNLI re-splits: 80% of the dev set to train on, 20% to test
    (mnli_train,) = (out / "glue_data").glob("*/MNLI/train.tsv")
    assert len(mnli_train.read_text().splitlines()) == 1 + 96
    (qnli_test,) = (out / "glue_data").glob("*/QNLI/dev.tsv")
    assert len(qnli_test.read_text().splitlines()) == 1 + 20
    # second run: everything read back
    second = main(argv)
    load_raw_split.cache_clear()
    assert all(second["cached"].values())
    for key in ("models", "dare", "pairwise", "all_tasks", "findings"):
        assert second[key] == first[key], key
    assert second["timings"]["total"] < first["timings"]["total"]
    assert sorted((p.name, p.stat().st_size) for p in glue.rglob("*")) == before  # the input is untouched


def test_glue_story_bad_arguments(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, fragment in (
        (["--glue_data_dir", str(a_file)], "is not a folder"),
        (["--glue_data_dir", str(tmp_path), "--output_dir", str(a_file)], "is not a folder"),
        (
            ["--glue_data_dir", str(tmp_path), "--output_dir", str(tmp_path / "x"), "--threads", "0"],
            "--threads",
        ),
        (["--glue_data_dir", str(tmp_path), "--output_dir", str(tmp_path)], "input --glue_data_dir"),
    ):
        with pytest.raises(SystemExit) as info:
            run_main(lambda a=argv: main(a))
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize(
    ("better", "worse", "expected"), [(20, 18, False), (30, 10, True), (10, 30, False), (0, 0, False)]
)
def test_dare_plus_x_verdict_is_a_sign_test(better, worse, expected):
    """'DARE + X beats X' reproduces only when DARE + X wins significantly more (pair, method) cases than it loses:
    20 better / 18 worse (the story's seed-0 count) is not evidence. p-value checked against the binomial sum."""
    from math import comb

    from utils.glue_quickstart import findings_from

    pairs = []
    for i, d in enumerate([0.01] * better + [-0.01] * worse + [0.0] * 2):
        pairs.append({"dare": False, "method": "m", "source": f"s{i}", "target": "t", "score": 0.5})
        pairs.append({"dare": True, "method": "mask_merging", "base_method": "m", "source": f"s{i}", "target": "t",
                      "score": 0.5 + d})  # fmt: skip
    f = findings_from(None, [], pairs, [], [])["dare_plus_x_beats_x"]
    assert (f["pairwise"]["better"], f["pairwise"]["worse"], f["pairwise"]["equal"]) == (better, worse, 2)
    assert f["reproduces"] is expected
    n, k = better + worse, min(better, worse)
    if n:
        two_sided = min(1.0, 2 * sum(comb(n, j) for j in range(k + 1)) / 2**n)
        assert f["pairwise"]["sign_test_p"] == pytest.approx(two_sided)
    else:
        assert f["pairwise"]["sign_test_p"] is None
