"""Hostile and mistaken inputs to the GLUE scripts (issue 10): each is one ``error:`` line and exit status 2, the
inputs are unchanged, and nothing is left behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import inference_plms_glue
import merge_plms_glue
import train_plms_glue
from utils.cli import run_main
from utils.glue_data_loader import load_raw_split
from utils.tiny_models import build_tiny_classifier, build_word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
LR = "0.001"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def _glue(d: Path) -> None:
    words = "the a cat dog man runs sees big small red blue house car park".split()
    for folder, header, make in (
        ("CoLA", None, lambda i: f"src\t{i % 2}\t\t{words[i % 14]} {words[(i * 3) % 14]} {words[(i * 5) % 14]}"),
        ("RTE", "index\tsentence1\tsentence2\tlabel",
         lambda i: f"{i}\t{words[i % 14]} {words[(i * 7) % 14]}\t{words[(i * 3) % 14]}\t"
                   f"{['entailment', 'not_entailment'][i % 2]}"),
    ):  # fmt: skip
        (d / folder).mkdir(parents=True)
        for split, n in (("train", 40), ("dev", 16)):
            rows = ([header] if header else []) + [make(i) for i in range(n)]
            (d / folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def _digest(path: Path) -> str:
    """A hash of every file (name, bytes, mode) under ``path``."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mode).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_glue")
    _glue(root / "glue")
    load_raw_split.cache_clear()
    tok = build_word_tokenizer(["the a cat dog man runs sees big small red blue house car park"], "bert", 100)
    build_tiny_classifier("bert", len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, pad_token_id=tok.pad_token_id, save_dir=root / "tiny", tokenizer=tok)  # fmt: skip
    for task in ("cola", "rte"):
        train_plms_glue.main(["--dataset_name", task, "--language_model_name", str(root / "tiny"), "--num_runs", "1",
                              "--num_epochs", "1", "--learning_rate", LR, "--glue_data_dir", str(root / "glue"),
                              "--models_dir", str(root / "models"), "--results_dir", str(root / "train_results"),
                              "--max_train_samples", "16", "--max_eval_samples", "8"])  # fmt: skip
    yield SimpleNamespace(root=root, glue=root / "glue", tiny=root / "tiny", models=root / "models")
    load_raw_split.cache_clear()


def _common(world, results: Path, glue: Path | None = None, models: Path | None = None) -> list[str]:
    return ["--language_model_name", str(world.tiny), "--learning_rate", LR, "--glue_data_dir", str(glue or world.glue),
            "--models_dir", str(models or world.models), "--results_dir", str(results), "--max_eval_samples", "8"]  # fmt: skip


def _refused(main, argv, capsys, *fragments) -> str:
    """Run ``main(argv)`` as the command line would: exit 2, one ``error:`` line containing every fragment."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(lambda: main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2, err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture()
def snapshot(world):
    """Digests of the inputs before a case; the test compares after."""
    return {"glue": _digest(world.glue), "models": _digest(world.models), "tiny": _digest(world.tiny)}


def _unchanged(world, snapshot) -> None:
    assert {
        "glue": _digest(world.glue),
        "models": _digest(world.models),
        "tiny": _digest(world.tiny),
    } == snapshot


# ----------------------------------------------------------------------------------------------- GLUE data
@pytest.mark.parametrize(
    "case, content, fragment",
    [
        ("empty train TSV (0 bytes)", b"", "empty file"),
        ("train TSV with a header and one data row", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n",
         "at least 2 are needed"),
        ("header only", b"index\tsentence1\tsentence2\tlabel\n", "no data rows"),
        ("not UTF-8", b"index\tsentence1\tsentence2\tlabel\n0\t\xff\xfe\tb\tentailment\n", "not UTF-8"),
        ("a field over the csv size limit",
         b"index\tsentence1\tsentence2\tlabel\n0\t" + b"a" * 200_000 + b"\tb\tentailment\n", "not a readable TSV"),
        ("a row with too few fields", b"index\tsentence1\tsentence2\tlabel\n0\ta\n", "expected at least 4"),
        ("a bad label", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n1\ta\tb\tentailment\n", "bad label"),
    ],
)  # fmt: skip
def test_bad_glue_files(world, tmp_path, capsys, snapshot, case, content, fragment):
    glue = tmp_path / "glue"
    shutil.copytree(world.glue, glue)
    (glue / "RTE" / "train.tsv").write_bytes(content)
    before = _digest(glue)
    out = tmp_path / "out"
    _refused(train_plms_glue.main, ["--dataset_name", "rte", *_common(world, out / "r", glue, out / "m"),
                                    "--num_runs", "1"], capsys, fragment)  # fmt: skip
    _refused(merge_plms_glue.main, [*_common(world, out / "r", glue), "--dataset_names", "cola", "rte"], capsys,
             fragment)  # fmt: skip
    assert _digest(glue) == before and not out.exists()
    _unchanged(world, snapshot)


def test_bad_glue_data_folder_and_jsonl(world, tmp_path, capsys, snapshot):
    out = tmp_path / "out"
    a_file = tmp_path / "not_a_folder"
    a_file.write_text("x")
    _refused(inference_plms_glue.main, [*_common(world, out, glue=a_file), "--dataset_names", "cola"], capsys,
             "is not a folder")  # fmt: skip
    assert not out.exists()
    # MNLI's JSONL with texts that are not strings, and a row that is not an object
    links = tmp_path / "links"
    links.mkdir()
    (links / "mnli").symlink_to(world.models / "cola" / f"tiny_lr{LR}")
    for line in ('{"premise": 3, "hypothesis": "a", "label": "neutral"}\n', "[1, 2]\n"):
        glue = tmp_path / f"glue{len(line)}"
        (glue / "MNLI").mkdir(parents=True)
        (glue / "MNLI" / "dev_matched.jsonl").write_text(line)
        argv = ["--dataset_names", "mnli", *_common(world, out, glue=glue), "--finetuned_model_template",
                str(links / "{task}")]  # fmt: skip
        _refused(inference_plms_glue.main, argv, capsys, "dev_matched.jsonl:1")
    assert not out.exists()
    _unchanged(world, snapshot)


# ----------------------------------------------------------------------------------------------- folders
def test_models_dir_that_is_a_file(world, tmp_path, capsys, snapshot):
    a_file = tmp_path / "models.txt"
    a_file.write_text("not a folder")
    out = tmp_path / "out"
    _refused(train_plms_glue.main, ["--dataset_name", "cola", *_common(world, out, models=a_file), "--num_runs", "1"],
             capsys, "models.txt", "not a folder")  # fmt: skip
    _refused(inference_plms_glue.main, [*_common(world, out, models=a_file), "--dataset_names", "cola"], capsys,
             "--models_dir", "is not a folder")  # fmt: skip
    _refused(merge_plms_glue.main, [*_common(world, out, models=a_file), "--dataset_names", "cola", "rte"], capsys,
             "--models_dir", "is not a folder")  # fmt: skip
    assert a_file.read_text() == "not a folder" and not out.exists()
    _unchanged(world, snapshot)


def test_output_folder_that_is_a_file(world, tmp_path, capsys, snapshot):
    a_file = tmp_path / "results"
    a_file.write_text("keep me")
    _refused(train_plms_glue.main, ["--dataset_name", "cola", *_common(world, a_file), "--num_runs", "1"], capsys,
             "--results_dir", "is not a folder")  # fmt: skip
    _refused(inference_plms_glue.main, [*_common(world, a_file), "--dataset_names", "cola"], capsys,
             "--results_dir", "is not a folder")  # fmt: skip
    for mode in ("pairs", "all"):
        _refused(merge_plms_glue.main, [*_common(world, a_file), "--dataset_names", "cola", "rte", "--merge_mode", mode],
                 capsys, "--results_dir", "is not a folder")  # fmt: skip
    assert a_file.read_text() == "keep me"
    _unchanged(world, snapshot)


def test_outputs_that_touch_an_input(world, tmp_path, capsys, snapshot):
    # results inside the GLUE data, inside a fine-tuned model, or the pretrained model's folder itself
    for results, what in ((world.glue / "out", "--glue_data_dir"), (world.models / "rte" / f"tiny_lr{LR}", "rte model"),
                          (world.tiny, "--language_model_name")):  # fmt: skip
        _refused(merge_plms_glue.main, [*_common(world, results), "--dataset_names", "cola", "rte", "--merge_mode", "all"],
                 capsys, what)  # fmt: skip
        _refused(inference_plms_glue.main, [*_common(world, results), "--dataset_names", "rte"], capsys, what)
    # training into the pretrained model's folder
    _refused(train_plms_glue.main, ["--dataset_name", "cola", *_common(world, tmp_path / "r", models=world.tiny),
                                    "--num_runs", "1"], capsys, "lies inside input --language_model_name")  # fmt: skip
    assert not (world.glue / "out").exists()
    _unchanged(world, snapshot)


def test_training_into_someone_elses_folder(world, tmp_path, capsys, snapshot):
    foreign = tmp_path / "models" / "cola" / f"tiny_lr{LR}"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    (foreign / "checkpoint-7").mkdir()
    _refused(train_plms_glue.main, ["--dataset_name", "cola", *_common(world, tmp_path / "r", models=tmp_path / "models"),
                                    "--num_runs", "1"], capsys, "was not written by this toolkit")  # fmt: skip
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoint-7", "notes.txt"]
    assert not (tmp_path / "r").exists()
    _unchanged(world, snapshot)


def test_over_long_names_and_bad_numbers(world, tmp_path, capsys, snapshot):
    long = tmp_path / ("x" * 300)
    line = _refused(inference_plms_glue.main, [*_common(world, long), "--dataset_names", "cola"], capsys,
                    "cannot write", "File name too long")  # fmt: skip
    assert line.startswith("error: cannot write")
    assert sorted(tmp_path.iterdir()) == []  # the folders made on the way were removed again
    common = [*_common(world, tmp_path / "r"), "--dataset_names", "cola", "rte"]
    for flag, value, fragment in (("--scaling_coefficient", "nan", "finite"), ("--scaling_coefficient", "inf", "finite"),
                                  ("--weight_mask_rate", "1.5", "[0, 1]"), ("--max_seq_length", "0", "at least 2"),
                                  ("--nums_fisher_examples", "0", ">= 1"),
                                  ("--finetuned_model_template", "models/cola", "{task}"),
                                  ("--finetuned_model_template", "models/{tsk}", "only {task}")):  # fmt: skip
        _refused(merge_plms_glue.main, [*common, flag, value], capsys, fragment)
    _refused(merge_plms_glue.main, [*common, "--metric", "accuracy", "--dataset_names", "cola", "stsb"], capsys,
             "stsb is a regression task")  # fmt: skip
    assert not (tmp_path / "r").exists()
    _unchanged(world, snapshot)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare -m for a read-only / full mount")
def test_read_only_and_full_file_systems(world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    script = (
        f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} {ro} && mount -t tmpfs -o size=64k tmpfs {full} "
        f"|| exit 99; head -c 1000000 /dev/zero > {full}/filler 2>/dev/null; "
        f"{sys.executable} {REPO_ROOT / 'inference_plms_glue.py'} $ARGS --results_dir {ro}/out; echo rc=$?; "
        f"{sys.executable} {REPO_ROOT / 'inference_plms_glue.py'} $ARGS --results_dir {full}/a/b/c; echo rc=$?; "
        f"ls -A {full}"
    )
    args = " ".join(
        _common(world, tmp_path / "unused")[:-4] + ["--dataset_names", "cola", "--max_eval_samples", "8"]
    )
    before = _digest(world.models)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script.replace("$ARGS", args)], capture_output=True,
                          text=True, env=ENV, timeout=300)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.stdout.count("rc=2") == 2, (proc.stdout, proc.stderr)
    assert "read-only file system" in errors[0]
    assert errors[1].startswith("error: cannot write") and "No space left on device" in errors[1]
    assert proc.stdout.strip().splitlines()[-1] == "filler"  # a/b/c were removed again
    assert _digest(world.models) == before and not list(ro.iterdir())
