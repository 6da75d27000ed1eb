"""Hostile output paths (issue 10, items 1, 2 and 7): every file a script writes is refused when it equals, contains
or lies inside an input (after resolving symlinks, ``..``, relative paths and registry names), ``--overwrite`` and
``--remove_saved_model`` only touch the toolkit's own folders, and write failures (disk full, read-only file system,
permission denied, over-long names, a file in the way) are one line with nothing left behind.

Every case runs a real entry script (``run_main(main)``, in process; a few as subprocesses) and checks: exit status
2, exactly one ``error:`` line, every input byte-identical (content, mode, links), nothing left behind. ENOSPC,
EROFS and EACCES are simulated by making ``os.pwritev`` / ``os.mkdir`` fail (CI runs as root on an ordinary disk);
the closing note has the same cases on a real tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import analyze_delta_parameters as analyze
import inference_llms_instruct_math_code as inf
import merge_llms_instruct_math_code as merge
from model_merging_methods.paths import OWNER_MARKER, is_toolkit_output
from tests.test_streaming_merge import build_family
from utils.cli import run_main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------------- helpers


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` (not following links): path -> (type, permission bits, sha256 or link target)."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [*dirnames, *filenames, ""]:
                p = Path(dirpath) / name if name else Path(dirpath)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    content = hashlib.sha256(p.read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    content = os.readlink(p)
                else:
                    content = None
                out[str(p)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), content)
    return out


def listing(root: Path) -> list[str]:
    """All paths under ``root`` (hidden ones included), for "nothing left behind"."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_cli(main, argv, capsys) -> tuple[int, list[str]]:
    """Run an entry script's ``main`` the way its ``__main__`` does; (exit status, stderr lines)."""
    capsys.readouterr()
    try:
        run_main(lambda: main([str(a) for a in argv]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code: int, err: list[str], pattern: str) -> None:
    import re

    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert re.search(pattern, err[0]), err[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``models/`` holding base, ft_a, ft_b (and ft_c, _side...), ``data/gsm8k.jsonl``, and a work folder."""
    root = tmp_path_factory.mktemp("hostile_paths")
    fam = build_family(root / "models")
    (root / "data").mkdir()
    rows = [{"question": f"What is {i}+1?", "answer": f"x\n#### {i + 1}"} for i in range(3)]
    (root / "data" / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "models": root / "models", "data": root / "data", **fam}


@pytest.fixture
def guarded(world, tmp_path, monkeypatch):
    """Work in ``tmp_path``; on exit, the models and data must be byte-identical."""
    before = snapshot(world["models"], world["data"])
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert snapshot(world["models"], world["data"]) == before, "an input changed"


def merge_models(world) -> list[str]:
    return [
        "--pretrained_model_name", world["base"], "--finetuned_model_names", world["ft_a"], world["ft_b"],
        "--skip_evaluation",
    ]  # fmt: skip


def infer_argv(world, *extra) -> list[str]:
    return [
        "--finetuned_model_name", world["ft_a"], "--pretrained_model_name", world["base"], "--dataset_name",
        "gsm8k", "--data_file", world["data"] / "gsm8k.jsonl", "--inference_backend", "hf", "--max_new_tokens",
        "3", "--end_index", "2", *extra,
    ]  # fmt: skip


# --------------------------------------------------------------------------- merge: outputs overlapping inputs


def test_merge_into_the_folder_holding_the_inputs_with_overwrite(world, guarded, capsys):
    """The issue's first case: it used to delete every input model and exit 0."""
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", world["models"], "--overwrite"], capsys
    )
    assert_refused(code, err, r"--merged_model_path .* contains input --pretrained_model_name .*base")
    assert listing(guarded) == []


def test_merge_into_dot_beside_the_inputs_with_overwrite(world, guarded, capsys, monkeypatch):
    monkeypatch.chdir(world["models"])
    argv = ["--pretrained_model_name", "base", "--finetuned_model_names", "ft_a", "ft_b", "--skip_evaluation",
            "--merged_model_path", ".", "--overwrite"]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(code, err, rf"--merged_model_path \. \(= {world['models']}\) contains input")


@pytest.mark.parametrize(
    "where, relation",
    [
        (lambda w: w["ft_a"], "is input"),
        (lambda w: w["ft_b"] / "merged", "lies inside input"),
        (lambda w: w["ft_a"] / ".." / "ft_b", "is input"),
        (lambda w: w["models"] / "ft_a" / ".." / ".." / "models", "contains input"),
    ],
    ids=["equal", "inside", "dotdot_equal", "dotdot_contains"],
)
def test_merge_output_overlapping_an_input(world, guarded, capsys, where, relation):
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", where(world), "--overwrite"], capsys
    )
    assert_refused(code, err, relation)
    assert listing(guarded) == []


def test_merge_output_through_a_symlink_into_an_input(world, guarded, capsys):
    (guarded / "link").symlink_to(world["models"])
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / "link" / "ft_a" / "x"], capsys
    )
    assert_refused(code, err, r"link/ft_a/x \(= .*models/ft_a/x\) lies inside input --finetuned_model_names")
    assert listing(guarded) == ["link"]


def test_merge_output_that_is_a_symlink_to_an_input(world, guarded, capsys):
    (guarded / "link").symlink_to(world["ft_b"])
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / "link", "--overwrite"], capsys
    )
    assert_refused(code, err, r"link \(= .*models/ft_b\) is input --finetuned_model_names")
    assert listing(guarded) == ["link"]


def test_merge_output_that_is_the_tokenizer_source(world, guarded, capsys):
    code, err = run_cli(
        merge.main,
        [*merge_models(world), "--tokenizer_source", world["ft_c"], "--merged_model_path", world["ft_c"], "--overwrite"],
        capsys,
    )  # fmt: skip
    assert_refused(code, err, "is input --tokenizer_source")


def test_merge_registry_name_resolved_through_the_hub_cache(world, tmp_path):
    """A registry name resolves to its HF-cache snapshot; writing into the cache's repository folder is refused
    (a subprocess: the cache location is read when huggingface_hub is imported)."""
    repo = tmp_path / "hf" / "hub" / "models--meta-llama--Llama-2-13b-hf"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / rev).mkdir(parents=True)
    for f in world["base"].iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (repo / "snapshots" / rev / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    before = snapshot(tmp_path / "hf")
    for out in (repo, repo / "blobs" / "merged"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "merge_llms_instruct_math_code.py"), "--pretrained_model_name",
             "Llama-2-13b-hf", "--finetuned_model_names", str(world["ft_a"]), str(world["ft_b"]), "--skip_evaluation",
             "--merged_model_path", str(out), "--overwrite"],
            env={**ENV, "HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert "input --pretrained_model_name Llama-2-13b-hf (in the Hugging Face cache)" in err[0]
    assert snapshot(tmp_path / "hf") == before


def test_merge_evaluation_folder_inside_an_input_model(world, guarded, capsys):
    argv = ["--pretrained_model_name", world["base"], "--finetuned_model_names", world["ft_a"], world["ft_b"],
            "--evaluate_tasks", "math", "--gsm8k_file", world["data"] / "gsm8k.jsonl", "--merged_model_path",
            guarded / "merged", "--evaluation_output_dir", world["ft_a"]]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(
        code, err, r"--evaluation_output_dir \(gsm8k\) .* lies inside input --finetuned_model_names"
    )
    assert listing(guarded) == []


def test_merge_evaluation_folder_holding_the_data_file(world, guarded, capsys):
    run_dir = guarded / "eval" / "gsm8k" / "ft_a_ft_b" / "average_merging_base_base"
    run_dir.mkdir(parents=True)
    shutil.copyfile(world["data"] / "gsm8k.jsonl", run_dir / "gsm8k.jsonl")
    argv = ["--pretrained_model_name", world["base"], "--finetuned_model_names", world["ft_a"], world["ft_b"],
            "--evaluate_tasks", "math", "--gsm8k_file", run_dir / "gsm8k.jsonl", "--merged_model_path",
            guarded / "merged", "--evaluation_output_dir", guarded / "eval"]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(code, err, r"--evaluation_output_dir \(gsm8k\) .* contains input --gsm8k_file")
    assert (run_dir / "gsm8k.jsonl").read_bytes() == (world["data"] / "gsm8k.jsonl").read_bytes()
    assert not (guarded / "merged").exists()


def test_merge_evaluation_folder_inside_the_merged_model(world, guarded, capsys):
    argv = ["--pretrained_model_name", world["base"], "--finetuned_model_names", world["ft_a"], world["ft_b"],
            "--evaluate_tasks", "math", "--gsm8k_file", world["data"] / "gsm8k.jsonl", "--merged_model_path",
            guarded / "merged", "--evaluation_output_dir", guarded / "merged"]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(code, err, r"lies inside input --merged_model_path")
    assert listing(guarded) == []


# ------------------------------------------------------------------------------- merge: --overwrite ownership


def test_merge_overwrite_refuses_a_users_folder(world, guarded, capsys):
    (guarded / "mine").mkdir()
    (guarded / "mine" / "thesis.tex").write_text("years of work")
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / "mine", "--overwrite"], capsys
    )
    assert_refused(code, err, "refusing to replace .*mine: it was not written by this toolkit")
    assert listing(guarded) == ["mine", "mine/thesis.tex"]


def test_merge_overwrite_refuses_a_symlink(world, guarded, capsys):
    out = guarded / "merged"
    assert run_cli(merge.main, [*merge_models(world), "--merged_model_path", out], capsys)[0] == 0
    (guarded / "link").symlink_to(out)
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / "link", "--overwrite"], capsys
    )
    assert_refused(code, err, "is a symbolic link")
    assert is_toolkit_output(out) and (guarded / "link").is_symlink()


def test_merge_overwrite_replaces_its_own_output(world, guarded, capsys):
    out = guarded / "merged"
    assert run_cli(merge.main, [*merge_models(world), "--merged_model_path", out], capsys)[0] == 0
    assert (stat.S_IMODE(out.stat().st_mode)) == 0o777 & ~_umask()  # ordinary permissions, not 0700
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", out, "--overwrite", "--merging_method_name",
                     "task_arithmetic"], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "merge_manifest.json").read_text())["kind"] == "task_arithmetic"
    assert listing(guarded) == sorted(["merged", *(f"merged/{p.name}" for p in out.iterdir())])


def _umask() -> int:
    from model_merging_methods.publish import current_umask

    return current_umask()


# ------------------------------------------------------------------ merge: outputs that cannot be written (item 7)


def test_merge_output_is_a_file(world, guarded, capsys):
    (guarded / "f").write_text("x")
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / "f", "--overwrite"], capsys
    )
    assert_refused(code, err, "exists and is not a folder")
    assert (guarded / "f").read_text() == "x" and listing(guarded) == ["f"]


def test_merge_output_below_a_file(world, guarded, capsys):
    (guarded / "f").write_text("x")
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / "f" / "sub" / "m"], capsys
    )
    assert_refused(code, err, r"cannot create .*f/sub/m: .*/f is not a folder")
    assert listing(guarded) == ["f"]


def test_merge_over_long_name(world, guarded, capsys):
    code, err = run_cli(
        merge.main, [*merge_models(world), "--merged_model_path", guarded / ("x" * 300)], capsys
    )
    assert_refused(code, err, "is 300 bytes long, more than the file system's limit of 255")
    assert listing(guarded) == []


def test_merge_long_name_that_fits_gets_a_short_temporary_name(world, guarded, capsys):
    out = guarded / ("y" * 250)  # valid; ".<name>.tmp-<pid>-<token>" would not be
    code, err = run_cli(merge.main, [*merge_models(world), "--merged_model_path", out], capsys)
    assert code == 0, err
    assert listing(guarded)[0] == out.name and is_toolkit_output(out)


def test_merge_max_shard_size_with_400_digits(world, guarded, capsys):
    code, err = run_cli(merge.main, [*merge_models(world), "--merged_model_path", guarded / "m", "--max_shard_size",
                                     "9" * 400], capsys)  # fmt: skip
    assert_refused(code, err, r"size 9{20}\.\.\. \(400 characters\) is too large")
    assert listing(guarded) == []


@pytest.mark.parametrize(
    "err_no, message",
    [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
     (errno.EACCES, "Permission denied"), (errno.EDQUOT, "quota")],
    ids=["ENOSPC", "EROFS", "EACCES", "EDQUOT"],
)  # fmt: skip
def test_merge_write_failure_midway(world, guarded, capsys, monkeypatch, err_no, message):
    """The disk fills up (or turns read-only...) half-way through the shards: one line naming the file, no partial
    output, no temporary folder. Simulated: the 3rd positioned write fails with the error."""
    real, calls = os.pwritev, {"n": 0}

    def failing(fd, buffers, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(err_no, os.strerror(err_no))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", failing)
    out = guarded / "deep" / "er" / "merged"
    code, err = run_cli(merge.main, [*merge_models(world), "--merged_model_path", out], capsys)
    assert_refused(
        code, err, rf"cannot write .*/\.merged\.tmp-\d+-[0-9a-f]{{8}}/model\.safetensors: .*{message}"
    )
    assert listing(guarded) == []  # the parents made for the output are gone too


@pytest.mark.parametrize("err_no", [errno.EROFS, errno.EACCES], ids=["EROFS", "EACCES"])
def test_merge_cannot_create_the_output_folder(world, guarded, capsys, monkeypatch, err_no):
    def failing(path, *a, **k):
        raise OSError(err_no, os.strerror(err_no), str(path))

    monkeypatch.setattr(os, "mkdir", failing)
    code, err = run_cli(merge.main, [*merge_models(world), "--merged_model_path", guarded / "merged"], capsys)
    assert_refused(code, err, rf"cannot write .*merged.*: {os.strerror(err_no)}")
    assert listing(guarded) == []


def test_merge_output_on_a_read_only_file_system_is_refused_before_reading(
    world, guarded, capsys, monkeypatch
):
    """``statvfs`` reports a read-only file system: refused before any model is read."""
    real = os.statvfs

    class RO:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, name):
            return os.ST_RDONLY | self._st.f_flag if name == "f_flag" else getattr(self._st, name)

    monkeypatch.setattr(os, "statvfs", lambda p: RO(real(p)))
    from model_merging_methods import checkpoint_io

    monkeypatch.setattr(
        checkpoint_io.CheckpointReader, "__init__", lambda *a, **k: pytest.fail("read a model")
    )
    code, err = run_cli(merge.main, [*merge_models(world), "--merged_model_path", guarded / "merged"], capsys)
    assert_refused(code, err, "is on a read-only file system")


def test_merge_non_finite_result_publishes_nothing(world, guarded, capsys):
    argv = [*merge_models(world), "--merged_model_path", guarded / "m", "--merging_method_name", "task_arithmetic",
            "--scaling_coefficient", "1e300"]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(code, err, r"the result is not finite \(NaN or Inf\) in tensor .*nothing was written")
    assert listing(guarded) == []


# --------------------------------------------------------------------------------------------- inference script


def test_inference_save_model_path_is_an_input_with_resume_and_remove(world, guarded, capsys):
    """The issue's second case: it evaluated the un-DARE'd input, labelled it DARE, then deleted it."""
    argv = infer_argv(world, "--weight_mask_rate", "0.5", "--save_model_path", world["ft_a"], "--resume",
                      "--remove_saved_model", "--output_dir", guarded / "out")  # fmt: skip
    code, err = run_cli(inf.main, argv, capsys)
    assert_refused(code, err, r"--save_model_path .*ft_a is input --finetuned_model_name")
    assert listing(guarded) == []


def test_inference_save_model_path_is_the_backbone(world, guarded, capsys):
    argv = infer_argv(world, "--weight_mask_rate", "0.5", "--save_model_path", world["base"], "--resume",
                      "--remove_saved_model", "--output_dir", guarded / "out")  # fmt: skip
    code, err = run_cli(inf.main, argv, capsys)
    assert_refused(code, err, r"--save_model_path .*base is input --pretrained_model_name")


def test_inference_resume_refuses_a_users_folder_as_the_dare_model(world, guarded, capsys):
    shutil.copytree(world["ft_b"], guarded / "someone_elses")
    argv = infer_argv(world, "--weight_mask_rate", "0.5", "--save_model_path", guarded / "someone_elses",
                      "--resume", "--remove_saved_model", "--output_dir", guarded / "out")  # fmt: skip
    before = snapshot(guarded / "someone_elses")
    code, err = run_cli(inf.main, argv, capsys)
    assert_refused(code, err, "exists but was not written by this toolkit")
    assert snapshot(guarded / "someone_elses") == before and not (guarded / "out").exists()


def test_inference_resume_refuses_a_dare_model_with_other_settings(world, guarded, capsys):
    masked = guarded / "masked"
    make = infer_argv(world, "--weight_mask_rate", "0.5", "--save_model_path", masked, "--skip_evaluation",
                      "--output_dir", guarded / "out")  # fmt: skip
    assert run_cli(inf.main, make, capsys)[0] == 0 and is_toolkit_output(masked)
    before = snapshot(masked)
    argv = infer_argv(world, "--weight_mask_rate", "0.9", "--save_model_path", masked, "--resume",
                      "--remove_saved_model", "--output_dir", guarded / "out")  # fmt: skip
    code, err = run_cli(inf.main, argv, capsys)
    assert_refused(code, err, r"holds a DARE'd model made with weight_mask_rate=0.5 \(now 0.9\)")
    assert snapshot(masked) == before


def test_inference_remove_saved_model_removes_only_its_own_folder(world, guarded, capsys, monkeypatch):
    from utils import generation_backends

    class Echo:
        name = "fake"

        def generate(self, prompts, max_tokens, stop):
            return ["The answer is: 1"] * len(prompts)

        def close(self):
            pass

    monkeypatch.setattr(generation_backends, "create_backend", lambda *a, **k: Echo())
    masked = guarded / "masked"
    argv = infer_argv(world, "--weight_mask_rate", "0.5", "--save_model_path", masked, "--remove_saved_model",
                      "--output_dir", guarded / "out")  # fmt: skip
    code, err = run_cli(inf.main, argv, capsys)
    assert code == 0, err
    assert not masked.exists() and (guarded / "out" / "gsm8k").is_dir()


def test_inference_results_folder_inside_an_input_model(world, guarded, capsys):
    argv = infer_argv(world, "--output_dir", world["ft_a"])
    code, err = run_cli(inf.main, argv, capsys)
    assert_refused(
        code, err, r"--output_dir \(this run's results\) .* lies inside input --finetuned_model_name"
    )


def test_inference_results_folder_holding_the_data_file(world, guarded, capsys):
    run_dir = guarded / "out" / "gsm8k" / "ft_a_inference_mask_0.0"
    run_dir.mkdir(parents=True)
    shutil.copyfile(world["data"] / "gsm8k.jsonl", run_dir / "data.jsonl")
    argv = [a if a != world["data"] / "gsm8k.jsonl" else run_dir / "data.jsonl" for a in infer_argv(world)]
    code, err = run_cli(inf.main, [*argv, "--output_dir", guarded / "out"], capsys)
    assert_refused(code, err, r"contains input --data_file")
    assert listing(guarded) == [
        "out",
        "out/gsm8k",
        f"out/gsm8k/{run_dir.name}",
        f"out/gsm8k/{run_dir.name}/data.jsonl",
    ]


def test_inference_dare_model_inside_the_results_folder(world, guarded, capsys):
    out = guarded / "out"
    argv = infer_argv(world, "--weight_mask_rate", "0.5", "--output_dir", out, "--save_model_path",
                      out / "gsm8k" / "ft_a_inference_mask_0.5_rescale_False" / "model")  # fmt: skip
    code, err = run_cli(inf.main, argv, capsys)
    assert_refused(code, err, r"lies inside input --save_model_path|contains input --save_model_path")
    assert listing(guarded) == []


@pytest.mark.parametrize(
    "flag, value, message",
    [("--code_timeout", "0", r"in \(0, 3600\]"), ("--code_timeout", "nan", "finite"), ("--code_timeout", "inf", "finite"),
     ("--max_new_tokens", "0", ">= 1"), ("--generation_batch_size", "0", ">= 1"),
     ("--gpu_memory_utilization", "1.5", r"\(0, 1\]"), ("--start_index", "-1", ">= 0"),
     ("--weight_mask_rate", "nan", "in \\[0, 1\\]")],
)  # fmt: skip
def test_inference_bad_flags_write_nothing(world, guarded, capsys, flag, value, message):
    """Arguments are validated before the results folder and run.log are created."""
    code, err = run_cli(inf.main, [*infer_argv(world), "--output_dir", guarded / "out", flag, value], capsys)
    assert_refused(code, err, message)
    assert listing(guarded) == []


def test_inference_results_folder_is_a_file(world, guarded, capsys):
    (guarded / "out").write_text("x")
    code, err = run_cli(inf.main, [*infer_argv(world), "--output_dir", guarded / "out"], capsys)
    assert_refused(code, err, r"cannot write .*out/gsm8k/ft_a_inference_mask_0.0: Not a directory")
    assert listing(guarded) == ["out"]


# ---------------------------------------------------------------------------------------- delta analysis script


def analyze_argv(world, out, *fts) -> list:
    return ["--pretrained_model_name", world["base"], "--finetuned_model_names", *(fts or (world["ft_a"],)),
            "--output_dir", out, "--no_progress", "--no_plot"]  # fmt: skip


@pytest.mark.parametrize(
    "out, relation",
    [(lambda w: w["ft_a"], "is input"), (lambda w: w["base"] / "stats", "lies inside input"),
     (lambda w: w["models"], "contains input")],
    ids=["equal", "inside", "contains"],
)  # fmt: skip
def test_analyze_output_overlapping_a_model(world, guarded, capsys, out, relation):
    code, err = run_cli(analyze.main, analyze_argv(world, out(world)), capsys)
    assert_refused(code, err, f"--output_dir .* {relation}")


def test_analyze_second_model_fails_leaves_nothing(world, guarded, capsys):
    code, err = run_cli(
        analyze.main, analyze_argv(world, guarded / "o", world["ft_a"], guarded / "missing"), capsys
    )
    assert_refused(code, err, "model folder not found")
    assert listing(guarded) == []


def test_analyze_write_failure_leaves_nothing(world, guarded, capsys, monkeypatch):
    (guarded / "o").mkdir()
    (guarded / "o" / "older.json").write_text("{}")
    from utils import results_io

    real, calls = results_io.write_table, {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(results_io, "write_table", failing)
    code, err = run_cli(
        analyze.main, analyze_argv(world, guarded / "o", world["ft_a"], world["ft_b"]), capsys
    )
    assert_refused(code, err, "No space left on device")
    assert listing(guarded) == ["o", "o/older.json"]


def test_analyze_models_with_the_same_folder_name_keep_their_own_files(world, guarded, capsys):
    (guarded / "x").mkdir()
    shutil.copytree(world["ft_b"], guarded / "x" / "ft_a")  # another model, also called ft_a
    code, err = run_cli(
        analyze.main, analyze_argv(world, guarded / "o", world["ft_a"], guarded / "x" / "ft_a"), capsys
    )
    assert code == 0, err
    a = json.loads((guarded / "o" / "ft_a_delta_stats.json").read_text())
    b = json.loads((guarded / "o" / "ft_a_2_delta_stats.json").read_text())
    assert a["finetuned_model"] == str(world["ft_a"]) and b["finetuned_model"] == str(guarded / "x" / "ft_a")
    assert not any(".tmp-" in p for p in listing(guarded))


def test_analyze_output_folder_is_a_file(world, guarded, capsys):
    (guarded / "o").write_text("x")
    code, err = run_cli(analyze.main, analyze_argv(world, guarded / "o"), capsys)
    assert_refused(code, err, "exists and is not a folder")
    assert (guarded / "o").read_text() == "x"


# ----------------------------------------------------------------------------------- the headline cases, for real


@pytest.mark.slow
def test_issue_cases_as_processes(world, tmp_path):
    """The issue's two headline cases run as a user runs them: exit 2, one line, every input unchanged."""
    before = snapshot(world["models"], world["data"])
    cases = [
        (["merge_llms_instruct_math_code.py", "--pretrained_model_name", "base", "--finetuned_model_names", "ft_a",
          "ft_b", "--merged_model_path", ".", "--overwrite", "--skip_evaluation"], world["models"]),
        (["inference_llms_instruct_math_code.py", "--finetuned_model_name", "models/ft_a", "--pretrained_model_name",
          "models/base", "--dataset_name", "gsm8k", "--data_file", "data/gsm8k.jsonl", "--weight_mask_rate", "0.5",
          "--save_model_path", "models/ft_a", "--resume", "--remove_saved_model", "--output_dir",
          str(tmp_path / "out")], world["root"]),
    ]  # fmt: skip
    for argv, cwd in cases:
        proc = subprocess.run([sys.executable, str(REPO / argv[0]), *argv[1:]], cwd=cwd, env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: output --"), proc.stderr
    assert snapshot(world["models"], world["data"]) == before
    assert list(tmp_path.iterdir()) == []
    assert not any(OWNER_MARKER in str(p) for p in world["models"].rglob("*"))


def test_model_name_too_long_for_the_file_system(world, guarded, capsys):
    argv = ["--pretrained_model_name", world["base"], "--finetuned_model_names", world["ft_a"], "x" * 300,
            "--skip_evaluation", "--merged_model_path", guarded / "m"]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(code, err, r"model path x{60}\.\.\. \(300 characters\): File name too long")
    assert listing(guarded) == []
