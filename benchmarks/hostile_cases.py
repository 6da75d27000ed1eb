"""Issue 10's closing-note tables: every hostile case, run for real, with what it did to the machine.

    python benchmarks/hostile_cases.py --out /tmp/hostile_table.md      # ~5-10 minutes on 2 CPU cores
    python benchmarks/hostile_cases.py --only 'checkpoints|signals'    # a subset (regex on "area: case")

It builds a scratch world in a temporary folder (the tiny LLaMA family of ``tests/test_streaming_merge.py``,
GSM8K data and generations files, results files for ``make_report.py``, GLUE TSVs with a tiny BERT and two
fine-tuned classifiers as in ``tests/test_hostile_glue.py``), then runs each case as a subprocess of the real
script (``sys.executable script.py ...``, ``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1``, cwd the repository unless
the case needs another) and records:

* the exit status (``-N``: killed by signal N; ``hang``: killed by this script after its time limit);
* the first stderr line that starts with ``error:`` (else the first ``warning:`` line, else the last line);
* whether every input is unchanged: type, permission bits and sha256 (or link target) of every entry under the
  shared input folders (models, data, generations, results, GLUE data and models) and the case's own inputs,
  none deleted;
* what was left behind: new entries anywhere under the scratch world (and new top-level entries of the
  repository) that are not the case's expected output, e.g. hidden ``.*.tmp-*`` folders or partial files, and
  entries that disappeared;
* whether the case meets the issue's demand (by default: exit 2, exactly one ``error:`` line, no traceback,
  the expected reason, inputs unchanged, nothing left behind; some cases expect success or a signal's status).

Signals use the test hook of ``tests/test_hostile_signals.py`` (each tensor write of the real merge script is
slowed to 0.2 s) so that the signal arrives while the staging folder exists. Read-only and full file systems are
provoked for real where ``unshare -m`` works (a read-only bind mount, a 64 KiB tmpfs); ``chmod 0555`` is also
tried, which root ignores (reported as "n/a as root").

A second table runs hostile programs of ``tests/test_hostile_sandbox.py`` one at a time through
``utils.code_sandbox.run_programs`` (under bubblewrap where it works, and under the Python-level guard alone),
each with fresh victim folders outside the sandbox: verdict, reason, whether a file outside was touched, and
whether a process or temporary folder outlived it. Fork bombs run under bubblewrap only (as root the guard alone
has no process cap, as the issue says).

Prints the Markdown tables; with ``--out X.md`` also writes them to ``X.md`` and every detail (argv, full
stderr tail, changed inputs, leftovers) to ``X.json``. ``--keep`` keeps the scratch world.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
LR = "0.001"  # the learning rate in the GLUE model folder names (tiny_lr0.001)
TIMEOUT_S = 300
OVERFLOW = "The answer is: " + "9" * 400 + "/7"


def _use_repo_imports() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM"):
        os.environ.setdefault(key, ENV[key])


# ================================================================================================ the world


def _jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_world(root: Path) -> SimpleNamespace:
    """Tiny models, data, generations, results and GLUE folders under ``root`` (the shared inputs)."""
    _use_repo_imports()
    from tests.test_hostile_glue import _glue
    from tests.test_streaming_merge import build_family
    from utils.tiny_models import build_tiny_classifier, build_word_tokenizer

    w = SimpleNamespace(root=root, models=root / "models", data=root / "data", gens=root / "gens")
    fam = build_family(w.models)  # base, ft_a (safetensors), ft_b (3 shards + index), ft_c (.bin, +[PAD])
    for k, v in fam.items():
        setattr(w, k, v)
    w.gsm8k = _jsonl(
        w.data / "gsm8k.jsonl",
        [{"question": f"What is {i}+1?", "answer": f"x\n#### {i + 1}"} for i in range(3)],
    )
    # generations to score, and their data (a gold answer with two #### markers is read at the first)
    w.gens_data = _jsonl(
        w.gens / "gsm8k.jsonl",
        [{"question": "q0", "answer": "so\n#### 3"}, {"question": "q1", "answer": "so\n#### 5\nlater\n#### 7"},
         {"question": "q2", "answer": "so\n#### 1,234"}],
    )  # fmt: skip
    w.gens_file = _jsonl(
        w.gens / "gens.jsonl",
        [{"task_id": 0, "completion": OVERFLOW}, {"task_id": 1, "completion": "The answer is: 5"},
         {"task_id": 2, "completion": "The answer is: 1,234"}],
    )  # fmt: skip
    w.ddir = w.gens / "ddir"
    w.ddir.mkdir()
    shutil.copyfile(w.gens_data, w.ddir / "gsm8k_test.jsonl")
    w.he_gens = _jsonl(w.gens / "he.jsonl", [{"task_id": "HumanEval/0", "completion": "    return []"}])
    # make_report inputs
    w.results = root / "results"
    _result(w.results / "gsm8k" / "good_inference_mask_0.0" / "results.json", accuracy=0.5)
    # GLUE: data, a tiny BERT, CoLA and RTE classifiers fine-tuned from it
    w.glue, w.tiny, w.glue_models = root / "glue", root / "tiny", root / "glue_models"
    _glue(w.glue)
    tok = build_word_tokenizer(["the a cat dog man runs sees big small red blue house car park"], "bert", 100)
    build_tiny_classifier("bert", len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, pad_token_id=tok.pad_token_id, save_dir=w.tiny, tokenizer=tok)  # fmt: skip
    for task in ("cola", "rte"):
        proc = subprocess.run(
            [sys.executable, "train_plms_glue.py", "--dataset_name", task, "--language_model_name", str(w.tiny),
             "--num_runs", "1", "--num_epochs", "1", "--learning_rate", LR, "--glue_data_dir", str(w.glue),
             "--models_dir", str(w.glue_models), "--results_dir", str(root / "glue_train_results"),
             "--max_train_samples", "16", "--max_eval_samples", "8"],
            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"training the tiny {task} model failed:\n{proc.stderr[-3000:]}")
    w.shared_inputs = [w.models, w.data, w.gens, w.results, w.glue, w.tiny, w.glue_models]
    return w


def _result(path: Path, **metrics) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "gsm8k", "save_name": path.parent.name, **metrics}))
    return path


# ================================================================================== snapshots and listings


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "link"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"),
                       (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return name
    return "other"


def _walk(root: Path) -> list[str]:
    """``root`` and every entry under it, not following symbolic links."""
    out = [str(root)]
    if os.path.isdir(root) and not os.path.islink(root):
        for dirpath, dirnames, filenames in os.walk(root):
            out.extend(os.path.join(dirpath, n) for n in [*dirnames, *filenames])
    return out


def snapshot(roots: list[Path], skip: list[Path] = ()) -> dict[str, tuple]:
    """path -> (type, permission bits, sha256 or link target); ``("missing",)`` for a root that is gone."""
    out: dict[str, tuple] = {}
    for root in roots:
        if not os.path.lexists(root):
            out[str(root)] = ("missing",)
            continue
        for p in _walk(root):
            if any(_under(p, s) for s in skip):
                continue
            st = os.lstat(p)
            kind = _kind(st.st_mode)
            if kind == "file":
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
                content = h.hexdigest()
            elif kind == "link":
                content = os.readlink(p)
            else:
                content = None
            out[p] = (kind, stat.S_IMODE(st.st_mode), content)
    return out


def listing(root: Path) -> set[str]:
    return set(_walk(root)) - {str(root)}


def _under(path: str | Path, top: str | Path) -> bool:
    path, top = str(path), str(top)
    return path == top or path.startswith(top.rstrip("/") + "/")


def _topmost(paths: set[str]) -> list[str]:
    """The paths none of whose parents is in the set (a new folder stands for everything in it)."""
    return sorted(p for p in paths if not any(_under(p, q) and p != q for q in paths))


def _repo_entries() -> set[str]:
    return {n for n in os.listdir(REPO) if n != "__pycache__"}


# ======================================================================================================= cases


@dataclass
class Spec:
    """One case: the command, its inputs and expected outputs, and what the issue demands of it."""

    argv: list  # [script, args...] (the script relative to the repository) or a full command with wrapper
    cwd: Path = REPO
    inputs: list = field(default_factory=list)  # besides the world's shared inputs
    outputs: list = field(default_factory=list)  # expected new paths (anything under them is expected)
    exit: int | None = 2  # the status the issue demands
    pattern: str | None = None  # regex the first line must match
    one_error_line: bool = True  # when exit == 2: exactly one "error:" line, no traceback
    allow_removed: list = field(default_factory=list)  # paths the case is expected to remove
    check: Callable | None = None  # (spec, result) -> (problems, notes)
    runner: Callable | None = None  # (spec) -> (exit, stderr); default: a subprocess of argv
    wrapper: list | None = None  # command prefix (e.g. unshare ... sh -c ...)
    timeout: int = TIMEOUT_S
    na: str | None = None  # "n/a as root": the case cannot be provoked here
    first: str = "error"  # the line shown: "error", "last" or "none" (see :func:`_first_line`)
    leftovers_judged_by_check: bool = False  # a leftover is expected (SIGKILL) and judged by ``check``
    note: str = ""


def _cmd(spec: Spec) -> list[str]:
    script, *args = (str(a) for a in spec.argv)
    return [*(spec.wrapper or []), sys.executable, str(REPO / script), *args]


def _run_subprocess(spec: Spec) -> tuple[int | str, str]:
    try:
        proc = subprocess.run(_cmd(spec), cwd=spec.cwd, env=ENV, capture_output=True, text=True,
                              errors="replace", timeout=spec.timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return "hang", err
    return proc.returncode, proc.stderr


def _lines(stderr: str) -> list[str]:
    return [ln.split("\r")[-1].rstrip() for ln in stderr.splitlines() if ln.split("\r")[-1].strip()]


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - (\S+) - ([A-Z]+) - (.*)$")


def _log(line: str) -> str:
    """A logging line without its time stamp: ``[LEVEL logger] message``."""
    m = LOG_LINE.match(line)
    return f"[{m.group(2)} {m.group(1)}] {m.group(3)}" if m else line


def _first_line(stderr: str, which: str = "error") -> str:
    """``error``: the first ``error:`` line, else the first ``warning:`` line, else the first WARNING/ERROR log
    line, else the last line that is not a log line, else the last log line; ``last``: the last line."""
    lines = _lines(stderr)
    if which == "last":
        return _log(lines[-1]) if lines else "(nothing on stderr)"
    for prefix in ("error:", "warning:"):
        for ln in lines:
            if ln.startswith(prefix):
                return ln
    for ln in lines:
        m = LOG_LINE.match(ln)
        if m and m.group(2) in ("WARNING", "ERROR", "CRITICAL"):
            return _log(ln)
    plain = [ln for ln in lines if not LOG_LINE.match(ln)]
    return plain[-1] if plain else (_log(lines[-1]) if lines else "(nothing on stderr)")


class Cases:
    """Builds the cases; each builder gets a fresh case folder and returns a :class:`Spec`."""

    def __init__(self, w: SimpleNamespace):
        self.w = w
        self.shared: dict = {}  # state passed between cases (the SIGKILL run's leftover)
        self.items: list[tuple[str, str, Callable[[Path], Spec]]] = []

    def add(self, area: str, name: str, build: Callable[[Path], Spec]) -> None:
        self.items.append((area, name, build))

    # --------------------------------------------------------------------------------------- argv helpers
    def merge(self, out, *extra, fts=None) -> list:
        w = self.w
        return ["merge_llms_instruct_math_code.py", "--pretrained_model_name", w.base, "--finetuned_model_names",
                *(fts or (w.ft_a, w.ft_b)), "--skip_evaluation", "--merged_model_path", out, *extra]  # fmt: skip

    def infer(self, *extra, data=None) -> list:
        w = self.w
        return ["inference_llms_instruct_math_code.py", "--finetuned_model_name", w.ft_a, "--pretrained_model_name",
                w.base, "--dataset_name", "gsm8k", "--data_file", data or w.gsm8k, "--inference_backend", "hf",
                "--max_new_tokens", "3", "--end_index", "2", *extra]  # fmt: skip

    def analyze(self, out, *fts) -> list:
        w = self.w
        return ["analyze_delta_parameters.py", "--pretrained_model_name", w.base, "--finetuned_model_names",
                *(fts or (w.ft_a,)), "--output_dir", out, "--no_progress", "--no_plot"]  # fmt: skip

    def glue(self, script, results, glue=None, models=None, *extra) -> list:
        w = self.w
        return [script, "--language_model_name", w.tiny, "--learning_rate", LR, "--glue_data_dir", glue or w.glue,
                "--models_dir", models or w.glue_models, "--results_dir", results, "--max_eval_samples", "8", *extra]  # fmt: skip

    def evaluate(self, *extra, data=None) -> list:
        w = self.w
        return ["evaluate_generations.py", "--dataset_name", "gsm8k", "--generations_file", w.gens_file,
                "--data_file", data or w.gens_data, *extra]  # fmt: skip


def _paths_cases(c: Cases) -> None:
    w = c.w
    A = "paths"
    c.add(A, "merge: --merged_model_path = the folder holding base/ and the fine-tuned folders, --overwrite",
          lambda d: Spec(c.merge(w.models, "--overwrite"), pattern="contains input"))  # fmt: skip
    c.add(A, "merge: --merged_model_path . (cwd = the folder of the inputs), --overwrite",
          lambda d: Spec(["merge_llms_instruct_math_code.py", "--pretrained_model_name", "base",
                          "--finetuned_model_names", "ft_a", "ft_b", "--skip_evaluation", "--merged_model_path", ".",
                          "--overwrite"], cwd=w.models, pattern=r"\. \(= .*\) contains input"))  # fmt: skip
    c.add(A, "merge: output = an input (ft_a), --overwrite",
          lambda d: Spec(c.merge(w.ft_a, "--overwrite"), pattern="is input"))  # fmt: skip
    c.add(A, "merge: output inside an input (ft_b/merged)",
          lambda d: Spec(c.merge(w.ft_b / "merged"), pattern="lies inside input"))  # fmt: skip
    c.add(A, "merge: output = ft_a/../ft_b (`..`), --overwrite",
          lambda d: Spec(c.merge(w.ft_a / ".." / "ft_b", "--overwrite"), pattern="is input"))  # fmt: skip
    c.add(A, "merge: output = models/ft_a/../../models (`..`, contains), --overwrite",
          lambda d: Spec(c.merge(w.models / "ft_a" / ".." / ".." / "models", "--overwrite"),
                         pattern="contains input"))  # fmt: skip

    def through_link(d: Path) -> Spec:
        (d / "link").symlink_to(w.models)
        return Spec(c.merge(d / "link" / "ft_a" / "x"), pattern="lies inside input")

    c.add(A, "merge: output link/ft_a/x where link -> models/ (symlink)", through_link)

    def link_to_input(d: Path) -> Spec:
        (d / "link").symlink_to(w.ft_b)
        return Spec(c.merge(d / "link", "--overwrite"), pattern=r"\(= .*ft_b\) is input")

    c.add(A, "merge: output is a symlink to an input (ft_b), --overwrite", link_to_input)
    c.add(A, "merge: output = the --tokenizer_source folder, --overwrite",
          lambda d: Spec(c.merge(w.ft_c, "--tokenizer_source", w.ft_c, "--overwrite"),
                         pattern="is input --tokenizer_source"))  # fmt: skip
    c.add(A, "merge: --evaluation_output_dir inside an input model",
          lambda d: Spec(["merge_llms_instruct_math_code.py", "--pretrained_model_name", w.base,
                          "--finetuned_model_names", w.ft_a, w.ft_b, "--evaluate_tasks", "math", "--gsm8k_file",
                          w.gsm8k, "--merged_model_path", d / "merged", "--evaluation_output_dir", w.ft_a],
                         pattern="lies inside input"))  # fmt: skip

    def users_folder(d: Path) -> Spec:
        (d / "mine").mkdir()
        (d / "mine" / "thesis.tex").write_text("years of work")
        return Spec(c.merge(d / "mine", "--overwrite"), inputs=[d / "mine"],
                    pattern="not written by this toolkit")  # fmt: skip

    c.add(A, "merge: --overwrite on a user's folder (mine/thesis.tex)", users_folder)

    def premerged(d: Path) -> Path:
        proc = subprocess.run(_cmd(Spec(c.merge(d / "merged"))), cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=TIMEOUT_S)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"setup merge failed: {proc.stderr[-2000:]}")
        return d / "merged"

    def overwrite_link(d: Path) -> Spec:
        out = premerged(d)
        (d / "link").symlink_to(out)
        return Spec(c.merge(d / "link", "--overwrite"), inputs=[out], pattern="symbolic link")

    c.add(A, "merge: --overwrite on a symlink to a toolkit output", overwrite_link)

    def overwrite_own(d: Path) -> Spec:
        out = premerged(d)

        def check(spec, r):
            manifest = json.loads((out / "merge_manifest.json").read_text())
            mode = stat.S_IMODE(out.stat().st_mode)
            probs = (
                [] if manifest.get("kind") == "task_arithmetic" else [f"manifest kind {manifest.get('kind')}"]
            )
            if mode == 0o700:
                probs.append("output folder is 0700")
            return probs, [f"replaced; manifest kind {manifest.get('kind')}; folder mode {mode:o}"]

        return Spec(c.merge(out, "--overwrite", "--merging_method_name", "task_arithmetic"), outputs=[out], exit=0,
                    allow_removed=[out], check=check)  # fmt: skip

    c.add(A, "merge: --overwrite on its own earlier output (control: allowed)", overwrite_own)

    # inference
    c.add(A, "inference: --save_model_path = the input model, --weight_mask_rate 0.5 --resume --remove_saved_model",
          lambda d: Spec(c.infer("--weight_mask_rate", "0.5", "--save_model_path", w.ft_a, "--resume",
                                 "--remove_saved_model", "--output_dir", d / "out"),
                         pattern="--save_model_path .* is input --finetuned_model_name"))  # fmt: skip
    c.add(A, "inference: --save_model_path = the backbone, --resume --remove_saved_model",
          lambda d: Spec(c.infer("--weight_mask_rate", "0.5", "--save_model_path", w.base, "--resume",
                                 "--remove_saved_model", "--output_dir", d / "out"),
                         pattern="is input --pretrained_model_name"))  # fmt: skip

    def someone_elses(d: Path) -> Spec:
        shutil.copytree(w.ft_b, d / "someone_elses")
        return Spec(c.infer("--weight_mask_rate", "0.5", "--save_model_path", d / "someone_elses", "--resume",
                            "--remove_saved_model", "--output_dir", d / "out"),
                    inputs=[d / "someone_elses"], pattern="not written by this toolkit")  # fmt: skip

    c.add(
        A,
        "inference: --save_model_path = a user's model folder, --resume --remove_saved_model",
        someone_elses,
    )
    c.add(A, "inference: --output_dir inside the input model",
          lambda d: Spec(c.infer("--output_dir", w.ft_a), pattern="lies inside input"))  # fmt: skip

    # evaluate_generations
    c.add(A, "evaluate_generations: --output_file = the generations file",
          lambda d: Spec(c.evaluate("--output_file", w.gens_file), pattern="is input --generations_file"))  # fmt: skip
    c.add(A, "evaluate_generations: --output_file = the data file",
          lambda d: Spec(c.evaluate("--output_file", w.gens_data), pattern="is input --data_file"))  # fmt: skip
    c.add(A, "evaluate_generations: --output_file . (cwd = the inputs' folder)",
          lambda d: Spec(c.evaluate("--output_file", "."), cwd=w.gens, pattern="contains input"))  # fmt: skip

    def eval_dotdot(d: Path) -> Spec:
        (d / "sub").mkdir()
        (d / "gens.jsonl").symlink_to(w.gens_file)
        return Spec(c.evaluate("--output_file", d / "sub" / ".." / "gens.jsonl"), pattern="is input")

    c.add(A, "evaluate_generations: --output_file = a symlink to the generations file, via `..`", eval_dotdot)
    c.add(A, "evaluate_generations: --output_file inside --data_dir",
          lambda d: Spec(["evaluate_generations.py", "--dataset_name", "gsm8k", "--generations_file", w.gens_file,
                          "--data_dir", w.ddir, "--output_file", w.ddir / "r.json"],
                         pattern="lies inside input"))  # fmt: skip

    def default_output(d: Path) -> Spec:
        gens = _jsonl(d / "g.jsonl", [{"task_id": 0, "completion": "The answer is: 1"}])
        data = _jsonl(d / "g.results.json", [{"question": "q", "answer": "#### 1"}])
        return Spec(["evaluate_generations.py", "--dataset_name", "gsm8k", "--generations_file", gens,
                     "--data_file", data], inputs=[gens, data], pattern="is input --data_file")  # fmt: skip

    c.add(A, "evaluate_generations: default output <gens>.results.json = the data file", default_output)

    # make_report
    c.add(A, "make_report: --output_dir = the input folder",
          lambda d: Spec(["make_report.py", w.results, "--output_dir", w.results, "--quiet"],
                         pattern="is the input"))  # fmt: skip
    c.add(A, "make_report: --output_dir contains the input folder",
          lambda d: Spec(["make_report.py", w.results, "--output_dir", w.root, "--quiet"],
                         pattern="contains the input"))  # fmt: skip

    def report_inside(d: Path) -> Spec:
        res = d / "results"
        shutil.copytree(w.results, res)

        return Spec(["make_report.py", res, "--output_dir", res / "report", "--quiet"], inputs=[res],
                    pattern="lies inside the input")  # fmt: skip

    c.add(A, "make_report: --output_dir inside the input folder", report_inside)

    # analyze_delta_parameters
    c.add(A, "analyze_delta_parameters: --output_dir = an input model",
          lambda d: Spec(c.analyze(w.ft_a), pattern="is input"))  # fmt: skip
    c.add(A, "analyze_delta_parameters: --output_dir inside an input model (base/stats)",
          lambda d: Spec(c.analyze(w.base / "stats"), pattern="lies inside input"))  # fmt: skip
    c.add(A, "analyze_delta_parameters: --output_dir contains the inputs (models/)",
          lambda d: Spec(c.analyze(w.models), pattern="contains input"))  # fmt: skip

    # GLUE
    c.add(A, "merge_plms_glue: --results_dir inside the GLUE data",
          lambda d: Spec(c.glue("merge_plms_glue.py", w.glue / "out", None, None, "--dataset_names", "cola", "rte",
                                "--merge_mode", "all"), pattern="--glue_data_dir"))  # fmt: skip
    c.add(A, "train_plms_glue: --models_dir = the pretrained model's folder",
          lambda d: Spec(c.glue("train_plms_glue.py", d / "r", None, w.tiny, "--dataset_name", "cola",
                                "--num_runs", "1"), pattern="lies inside input --language_model_name"))  # fmt: skip


def _checkpoint_cases(c: Cases) -> None:
    _use_repo_imports()
    from tests.test_hostile_checkpoints import HEADER_CASES, split_safetensors, write_raw

    w = c.w
    A = "checkpoints"

    def broken(
        mutate: Callable[[Path], None], pattern: str, *extra: str, source=None
    ) -> Callable[[Path], Spec]:
        def build(d: Path) -> Spec:
            bad = d / "bad"
            shutil.copytree(source or w.ft_a, bad, symlinks=True)
            mutate(bad)
            return Spec(["merge_llms_instruct_math_code.py", "--pretrained_model_name", w.base,
                         "--finetuned_model_names", bad, w.ft_b, "--merged_model_path", d / "out",
                         "--skip_evaluation", "--merging_method_name", "task_arithmetic", *extra],
                        inputs=[bad], pattern=pattern, timeout=90)  # fmt: skip

        return build

    def header(mutator):
        def mutate(bad: Path) -> None:
            h, data = split_safetensors(bad / "model.safetensors")
            nh, nd = mutator(h, data)
            write_raw(bad / "model.safetensors", nh, nd, pad=not isinstance(nh, bytes))

        return mutate

    for name, (mutator, pattern) in HEADER_CASES.items():
        c.add(A, f"model.safetensors header: {name.replace('_', ' ')}", broken(header(mutator), pattern))

    def raw(content: bytes, fname="model.safetensors"):
        return lambda bad: (bad / fname).write_bytes(content)

    c.add(A, "model.safetensors header length 200,000,000 (above the library's limit)",
          broken(raw(struct.pack("<Q", 200_000_000) + b"{}"), "more than the safetensors limit"))  # fmt: skip
    c.add(A, "model.safetensors shorter than 8 bytes", broken(raw(b"\x01\x02"), "shorter than 8 bytes"))

    def replace(fname: str, how: str):
        def mutate(bad: Path) -> None:
            p = bad / fname
            if os.path.lexists(p):
                p.unlink()
            if how == "fifo":
                os.mkfifo(p)
            elif how == "folder":
                p.mkdir()
            elif how == "device":
                p.symlink_to("/dev/zero")

        return mutate

    c.add(A, "model.safetensors is a FIFO", broken(replace("model.safetensors", "fifo"), "is a FIFO"))
    c.add(A, "model.safetensors is a symlink to /dev/zero (device)",
          broken(replace("model.safetensors", "device"), "character device"))  # fmt: skip
    c.add(A, "model.safetensors is a folder", broken(replace("model.safetensors", "folder"), "is a folder"))

    def bin_fifo(bad: Path) -> None:
        (bad / "model.safetensors").unlink()
        os.mkfifo(bad / "pytorch_model.bin")

    c.add(A, "pytorch_model.bin is a FIFO", broken(bin_fifo, r"pytorch_model\.bin is a FIFO"))

    # indexes (ft_b: 3 shards + model.safetensors.index.json)
    def point_first_shard(target_of: Callable[[Path], str], make_outside: bool = True):
        def mutate(bad: Path) -> None:
            if make_outside:
                (bad.parent / "outside").mkdir()
                shutil.copyfile(
                    bad / "model-00001-of-00003.safetensors", bad.parent / "outside" / "x.safetensors"
                )
            path = bad / "model.safetensors.index.json"
            index = json.loads(path.read_text())
            first = sorted(set(index["weight_map"].values()))[0]
            target = target_of(bad)
            index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
            path.write_text(json.dumps(index))

        return mutate

    def with_outside(build):
        def wrapped(d: Path) -> Spec:
            spec = build(d)
            spec.inputs.append(d / "outside")
            return spec

        return wrapped

    c.add(A, "index points outside the folder (../outside/x.safetensors)",
          with_outside(broken(point_first_shard(lambda b: "../outside/x.safetensors"),
                              "points outside its model folder", source=w.ft_b)))  # fmt: skip
    c.add(A, "index points to an absolute path",
          with_outside(broken(point_first_shard(lambda b: str(b.parent / "outside" / "x.safetensors")),
                              "points outside its model folder", source=w.ft_b)))  # fmt: skip

    def shard_symlink_out(bad: Path) -> None:
        shard = bad / "model-00001-of-00003.safetensors"
        (bad.parent / "outside").mkdir()
        shutil.move(shard, bad.parent / "outside" / "elsewhere.safetensors")
        shard.symlink_to(bad.parent / "outside" / "elsewhere.safetensors")

    c.add(A, "index shard is a symlink out of the folder",
          with_outside(broken(shard_symlink_out, "a symbolic link out of the folder", source=w.ft_b)))  # fmt: skip
    for label, content, pattern in (
        (
            "index weight_map is a list",
            json.dumps({"weight_map": ["a"]}).encode(),
            "has no weight_map object",
        ),
        ("index is a JSON list", b"[1, 2]", "must hold a JSON object"),
        ("index is not JSON", b"{not json", "is not valid JSON"),
        ("index is not UTF-8", b"\xff\xfe{}", "is not UTF-8"),
    ):
        c.add(A, label, broken(raw(content, "model.safetensors.index.json"), pattern, source=w.ft_b))
    c.add(A, "index is a FIFO",
          broken(replace("model.safetensors.index.json", "fifo"), "is a FIFO", source=w.ft_b))  # fmt: skip

    # config.json
    for label, content, pattern in (
        ("a JSON list", b"[]", "must hold a JSON object, not a list"),
        ("a JSON string", b'"llama"', "not a string"),
        ("null", b"null", "not null"),
        ("not UTF-8", b"\xff{}", "not UTF-8"),
        ("not JSON", b"{", "is not valid JSON"),
        ("nested 100,000 deep", b"[" * 100_000 + b"]" * 100_000, "nests JSON too deeply"),
    ):
        c.add(A, f"config.json is {label}", broken(raw(content, "config.json"), "config.json .*" + pattern))
    c.add(A, "config.json is a FIFO", broken(replace("config.json", "fifo"), r"config.json .* is a FIFO"))

    # dtypes and results
    def mixed(d: Path) -> Spec:
        import torch
        from safetensors.torch import load_file, save_file

        bad = d / "bf16"
        shutil.copytree(w.ft_a, bad)
        sd = load_file(bad / "model.safetensors")
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, bad / "model.safetensors")
        out = d / "out"

        def check(spec, r):
            probs = []
            if not any(
                ln.startswith("warning: the input models have different dtypes") for ln in _lines(r["stderr"])
            ):
                probs.append("no dtype warning")
            try:
                dt = json.loads((out / "merge_manifest.json").read_text())["dtype"]
            except (OSError, ValueError, KeyError) as exc:
                return [*probs, f"no dtype in the manifest ({exc})"], []
            inputs = ",".join(sorted("/".join(v) for v in dt.get("inputs", {}).values()))
            return probs, [f"manifest dtype: chosen {'/'.join(dt.get('chosen', []))} by {dt.get('chosen_by')}; "
                           f"inputs {inputs}; folder mode {stat.S_IMODE(out.stat().st_mode):o}"]  # fmt: skip

        return Spec(["merge_llms_instruct_math_code.py", "--pretrained_model_name", w.base, "--finetuned_model_names",
                     bad, w.ft_b, "--merged_model_path", out, "--skip_evaluation", "--merging_method_name",
                     "task_arithmetic"], inputs=[bad], outputs=[out], exit=0, check=check,
                    pattern="^warning: the input models have different dtypes")  # fmt: skip

    c.add(A, "mixed input dtypes (ft_a in bfloat16, others float32)", mixed)
    for coef, extra, pattern in (("1e300", (), "not finite"), ("1e39", (), "not finite"),
                                 ("1e7", ("--dtype", "float16"), "not finite .* output dtype float16")):  # fmt: skip
        label = f"task_arithmetic λ={coef}" + (" --dtype float16" if extra else "") + " (non-finite result)"
        c.add(A, label, broken(lambda bad: None, pattern, "--scaling_coefficient", coef, *extra))


def _signal_cases(c: Cases) -> None:
    A = "signals"

    def slow_merge(out: Path, sig: int, keep: dict) -> Callable[[Spec], tuple]:
        def runner(spec: Spec) -> tuple:
            from tests.test_hostile_signals import SLOW_MERGE

            args = [str(a) for a in c.merge(out)[1:]]
            with tempfile.TemporaryFile("w+") as errf:
                proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *args], cwd=REPO, env=ENV,
                                        stdout=subprocess.DEVNULL, stderr=errf, text=True)  # fmt: skip
                staging, deadline = [], time.monotonic() + 120
                while not staging and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    staging = glob.glob(str(out.parent / f".{out.name}.tmp-{proc.pid}-*"))
                if staging:
                    time.sleep(0.5)  # a few tensors into the output
                    proc.send_signal(sig)
                else:
                    keep["note"] = "the staging folder never appeared (the signal was not sent)"
                try:
                    rc = proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc = "hang"
                errf.seek(0)
                err = errf.read()
            keep["pid"], keep["staging"] = proc.pid, staging
            return rc, err

        return runner

    for sig, code, line in ((signal.SIGTERM, 143, "terminated by SIGTERM"), (signal.SIGHUP, 129,
                            "terminated by SIGHUP"), (signal.SIGINT, 130, "interrupted")):  # fmt: skip

        def build(d: Path, sig=sig, code=code, line=line) -> Spec:
            keep: dict = {}
            out = d / "new" / "merged"  # the parent is made by the run and must go too

            def check(spec, r):
                notes = [f"staging folder seen: {', '.join(Path(s).name for s in keep.get('staging', []))}"]
                return ([keep["note"]] if "note" in keep else []), notes

            return Spec(c.merge(out), exit=code, pattern=f"^{line}$", one_error_line=False, first="last",
                        runner=slow_merge(out, sig, keep), check=check)  # fmt: skip

        c.add(A, f"{signal.Signals(sig).name} during a merge (staging folder present)", build)

    def sigkill(d: Path) -> Spec:
        keep: dict = {}
        out = d / "merged"
        c.shared["stale"] = (d, out, keep)

        def check(spec, r):
            left = [Path(p).name for p in r["new"]]
            ok = len(left) == 1 and left[0].startswith(f".merged.tmp-{keep.get('pid')}-")
            return ([] if ok else [f"expected one .merged.tmp-{keep.get('pid')}-* folder, found {left}"]), [
                "SIGKILL cannot be caught: the pid-named folder is left for the next run"
            ]

        return Spec(c.merge(out), exit=-signal.SIGKILL, one_error_line=False, first="none",
                    runner=slow_merge(out, signal.SIGKILL, keep), check=check, leftovers_judged_by_check=True)  # fmt: skip

    c.add(A, "SIGKILL during a merge", sigkill)

    def next_run(d: Path) -> Spec:
        kd, out, keep = c.shared["stale"]
        stale = [Path(s) for s in keep.get("staging", [])]

        def check(spec, r):
            probs = []
            if not any("removed the stale temporary folder" in ln for ln in _lines(r["stderr"])):
                probs.append("no 'removed the stale temporary folder' line")
            if any(s.exists() for s in stale):
                probs.append("the stale folder is still there")
            return probs, [f"stale folder {', '.join(s.name for s in stale)} (pid {keep.get('pid')}, dead) removed: "
                           f"{'no' if any(s.exists() for s in stale) else 'yes'}"]  # fmt: skip

        return Spec(c.merge(out), exit=0, outputs=[out], allow_removed=stale, check=check,
                    pattern="removed the stale temporary folder")  # fmt: skip

    c.add(A, "next merge to the same target after the SIGKILL (stale temp folder of a dead pid)", next_run)


def _error_cases(c: Cases) -> None:
    w = c.w
    A = "errors"

    def bad_tsv(content: bytes, script: str, pattern: str) -> Callable[[Path], Spec]:
        def build(d: Path) -> Spec:
            glue = d / "glue"
            shutil.copytree(w.glue, glue)
            (glue / "RTE" / "train.tsv").write_bytes(content)
            if script == "train_plms_glue.py":
                argv = c.glue(
                    script, d / "out" / "r", glue, d / "out" / "m", "--dataset_name", "rte", "--num_runs", "1"
                )
            else:
                argv = c.glue(script, d / "out" / "r", glue, None, "--dataset_names", "cola", "rte")
            return Spec(argv, inputs=[glue], pattern=pattern)

        return build

    one_row = b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
    for script in ("train_plms_glue.py", "merge_plms_glue.py"):
        c.add(
            A, f"{script.removesuffix('.py')}: GLUE train TSV of 0 bytes", bad_tsv(b"", script, "empty file")
        )
        c.add(A, f"{script.removesuffix('.py')}: GLUE train TSV with one data row",
              bad_tsv(one_row, script, "at least 2 are needed"))  # fmt: skip

    def a_file(d: Path, name: str) -> Path:
        (d / name).write_text("keep me")
        return d / name

    glue_scripts = (("train_plms_glue.py", ("--dataset_name", "cola", "--num_runs", "1")),
                    ("inference_plms_glue.py", ("--dataset_names", "cola")),
                    ("merge_plms_glue.py", ("--dataset_names", "cola", "rte")))  # fmt: skip
    for script, extra in glue_scripts:
        c.add(A, f"{script.removesuffix('.py')}: --models_dir is a file",
              lambda d, s=script, e=extra: Spec(c.glue(s, d / "out", None, a_file(d, "models.txt"), *e),
                                                inputs=[d / "models.txt"], pattern="not a folder"))  # fmt: skip
    for script, extra in glue_scripts:
        c.add(A, f"{script.removesuffix('.py')}: --results_dir is a file",
              lambda d, s=script, e=extra: Spec(c.glue(s, a_file(d, "results"), None, None, *e),
                                                inputs=[d / "results"], pattern="is not a folder"))  # fmt: skip
    c.add(A, "merge: --merged_model_path is a file",
          lambda d: Spec(c.merge(a_file(d, "f"), "--overwrite"), inputs=[d / "f"], pattern="not a folder"))  # fmt: skip
    c.add(A, "merge: --merged_model_path below a file (f/sub/m)",
          lambda d: Spec(c.merge(a_file(d, "f") / "sub" / "m"), inputs=[d / "f"], pattern="is not a folder"))  # fmt: skip
    c.add(A, "inference: --output_dir is a file",
          lambda d: Spec(c.infer("--output_dir", a_file(d, "out")), inputs=[d / "out"],
                         pattern="Not a directory|not a folder"))  # fmt: skip
    c.add(A, "analyze_delta_parameters: --output_dir is a file",
          lambda d: Spec(c.analyze(a_file(d, "o")), inputs=[d / "o"], pattern="not a folder"))  # fmt: skip
    c.add(A, "merge: --merged_model_path name of 300 bytes",
          lambda d: Spec(c.merge(d / ("x" * 300)), pattern="more than the file system's limit"))  # fmt: skip
    c.add(A, "merge: a fine-tuned model name of 300 characters",
          lambda d: Spec(c.merge(d / "m", fts=(w.ft_a, "x" * 300)), pattern="File name too long"))  # fmt: skip

    def chmod_ro(d: Path) -> Spec:
        ro = d / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        root = os.geteuid() == 0
        return Spec(c.merge(ro / "merged"), pattern="Permission denied|read-only", outputs=[ro / "merged"] if root else [],
                    na="n/a as root (permission bits ignored; the merge was written)" if root else None)  # fmt: skip

    c.add(A, "merge: output in a folder chmod 0555", chmod_ro)

    unshare_ok = (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    )
    if unshare_ok:

        def ro_mount(d: Path) -> Spec:
            ro = d / "ro"
            ro.mkdir()
            script = 'd=$1; shift; mount --bind "$d" "$d" && mount -o remount,ro,bind "$d" "$d" || exit 99; exec "$@"'
            return Spec(c.merge(ro / "merged"), wrapper=["unshare", "-m", "sh", "-c", script, "sh", str(ro)],
                        pattern="read-only file system")  # fmt: skip

        c.add(A, "merge: output on a read-only bind mount (unshare -m)", ro_mount)

        def full_fs(d: Path) -> Spec:
            full = d / "full"
            full.mkdir()
            lst = d / "inside_tmpfs_after.txt"
            script = ('d=$1; lst=$2; shift 2; mount -t tmpfs -o size=64k tmpfs "$d" || exit 99; "$@"; rc=$?; '
                      '(cd "$d" && find . -mindepth 1) > "$lst"; exit $rc')  # fmt: skip

            def check(spec, r):
                inside = lst.read_text().split() if lst.exists() else ["(no listing)"]
                return ([f"left on the full tmpfs: {inside}"] if inside else []), [
                    "left on the full tmpfs: " + (", ".join(inside) or "nothing")
                ]

            return Spec(c.merge(full / "a" / "b" / "merged"), outputs=[lst], check=check,
                        wrapper=["unshare", "-m", "sh", "-c", script, "sh", str(full), str(lst)],
                        pattern="No space left on device")  # fmt: skip

        c.add(A, "merge: output on a full file system (64 KiB tmpfs, unshare -m)", full_fs)
    c.add(A, "merge: --max_shard_size with 400 digits",
          lambda d: Spec(c.merge(d / "m", "--max_shard_size", "9" * 400), pattern="too large"))  # fmt: skip
    for v in ("0", "nan", "inf"):
        c.add(A, f"evaluate_generations: --code_timeout {v}",
              lambda d, v=v: Spec(["evaluate_generations.py", "--dataset_name", "human_eval", "--generations_file",
                                   w.he_gens, f"--code_timeout={v}"], pattern="--code_timeout"))  # fmt: skip
    for flag, v in (("--code_timeout", "0"), ("--code_timeout", "nan"), ("--code_timeout", "inf"),
                    ("--max_new_tokens", "0"), ("--weight_mask_rate", "nan")):  # fmt: skip
        c.add(A, f"inference: {flag} {v} (no run.log may be written)",
              lambda d, f=flag, v=v: Spec(c.infer("--output_dir", d / "out", f, v), pattern=re.escape(f)))  # fmt: skip

    def report(label: str, make: Callable[[Path], None], with_good: bool) -> Callable[[Path], Spec]:
        def build(d: Path) -> Spec:
            res = d / "results"
            make(res)
            if with_good:
                _result(res / "gsm8k" / "good_inference_mask_0.0" / "results.json", accuracy=0.5)

            def check(spec, r):
                warns = [ln for ln in _lines(r["stderr"]) if ln.startswith("warning:")]
                return [] if warns else ["no warning line"], [f"{len(warns)} warning line(s): " + " / ".join(
                    x for x in warns)]  # fmt: skip

            return Spec(["make_report.py", res, "--output_dir", d / "report", "--quiet"], inputs=[res],
                        outputs=[d / "report"] if with_good else [], exit=0 if with_good else 2,
                        pattern=None if with_good else "no results found", check=check)  # fmt: skip

        return build

    def null_metric(res):
        _result(res / "gsm8k" / "null" / "results.json", accuracy=None)

    def list_metric(res):
        _result(res / "gsm8k" / "list" / "results.json", accuracy=[0.5])

    def latin1(res):
        res.mkdir(parents=True, exist_ok=True)
        (res / "latin1.json").write_bytes(b'{"dataset": "gsm8k", "accuracy": 0.5, "note": "caf\xe9"}')

    for label, make in (("metric null", null_metric), ("metric a list", list_metric), ("not UTF-8", latin1)):
        c.add(A, f"make_report: the only results file has {label}", report(label, make, False))

    def all_three(res):
        null_metric(res)
        list_metric(res)
        latin1(res)

    c.add(A, "make_report: null / list / not-UTF-8 files beside a good one", report("all", all_three, True))

    def second_corrupt(d: Path) -> Spec:
        bad = d / "ft_bad"
        shutil.copytree(w.ft_a, bad)
        raw = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(raw[:-40])  # truncated: found only when it is read
        return Spec(c.analyze(d / "o", w.ft_a, bad), inputs=[bad], pattern="truncated")

    c.add(A, "analyze_delta_parameters: the second model is corrupt (truncated safetensors)",
          second_corrupt)  # fmt: skip
    c.add(A, "analyze_delta_parameters: the second model fails (missing)",
          lambda d: Spec(c.analyze(d / "o", w.ft_a, d / "missing"), pattern="model folder not found"))  # fmt: skip


def _scorer_cases(c: Cases) -> None:
    def overflow(d: Path) -> Spec:
        out = d / "r.json"

        def check(spec, r):
            try:
                res = json.loads(out.read_text())
                first = res["per_item"][0]
            except (OSError, ValueError, KeyError, IndexError) as exc:
                return [f"no results file ({exc})"], []
            probs = [] if first.get("correct") is False and "OverflowError" in str(first.get("error")) else [
                f"item 0: {first}"]  # fmt: skip
            return probs, [f"item 0 correct={first.get('correct')}, error: {_short(str(first.get('error')), d, 80)}; "
                           f"accuracy {res.get('accuracy')}, scoring_errors {res.get('scoring_errors')}"]  # fmt: skip

        return Spec(c.evaluate("--output_file", out), outputs=[out], exit=0, check=check)

    c.add("scorers", 'evaluate_generations: GSM8K completion "The answer is: " + "9"*400 + "/7"', overflow)


# ================================================================================================== running


def run_case(area: str, name: str, build: Callable[[Path], Spec], w: SimpleNamespace, case_dir: Path,
             pristine: Path) -> dict:  # fmt: skip
    case_dir.mkdir(parents=True)
    try:
        spec = build(case_dir)
    except Exception as exc:  # a broken setup is a row, not the end of the run
        return {"area": area, "case": name, "exit": "setup failed", "first_line": f"{type(exc).__name__}: {exc}",
                "inputs_unchanged": "n/a", "left_behind": [], "problems": ["setup failed"], "notes": []}  # fmt: skip
    outputs = [Path(p) for p in spec.outputs]
    roots = [*w.shared_inputs, *map(Path, spec.inputs)]
    inputs_before = snapshot(roots, skip=outputs)
    world_before = listing(w.root)
    repo_before = _repo_entries()
    start = time.monotonic()
    code, stderr = (spec.runner or _run_subprocess)(spec)
    seconds = time.monotonic() - start
    inputs_after = snapshot(roots, skip=outputs)
    world_after = listing(w.root)
    changed = sorted(
        p for p in set(inputs_before) | set(inputs_after) if inputs_before.get(p) != inputs_after.get(p)
    )
    new = {p for p in world_after - world_before if not any(_under(p, o) for o in outputs)}
    removed = {p for p in world_before - world_after
               if not any(_under(p, o) for o in [*outputs, *map(Path, spec.allow_removed)])}  # fmt: skip
    removed -= {p for p in removed if any(_under(p, c) for c in changed)}  # counted as changed inputs
    repo_new = sorted(_repo_entries() - repo_before)
    lines = _lines(stderr)
    first = "(no message)" if spec.first == "none" else _first_line(stderr, spec.first)
    result = {
        "area": area, "case": name, "argv": [str(a) for a in _cmd(spec)], "cwd": str(spec.cwd), "exit": code,
        "seconds": round(seconds, 1), "first_line": first, "stderr_tail": "\n".join(lines[-15:]), "stderr": stderr,
        "error_lines": sum(ln.startswith("error:") for ln in lines), "traceback": "Traceback" in stderr,
        "inputs_unchanged": not changed, "changed_inputs": changed[:20],
        "new": _topmost(new), "removed": _topmost(removed), "repo_new": repo_new,
    }  # fmt: skip
    left = [
        *result["new"],
        *(f"removed {p}" for p in result["removed"]),
        *(f"in the repo: {n}" for n in repo_new),
    ]
    result["left_behind"] = left
    problems: list[str] = []
    if spec.exit is not None and code != spec.exit:
        problems.append(f"exit {code}, the issue demands {spec.exit}")
    if spec.exit == 2 and spec.one_error_line:
        if result["error_lines"] != 1:
            problems.append(f"{result['error_lines']} error: lines")
        if result["traceback"]:
            problems.append("traceback")
    if spec.pattern and not re.search(spec.pattern, first):
        problems.append(f"first line does not match /{spec.pattern}/")
    if changed:
        problems.append(f"{len(changed)} input entries changed or deleted")
    notes: list[str] = [spec.note] if spec.note else []
    if spec.check is not None:
        p, n = spec.check(spec, {**result, "stderr": stderr})
        problems += p
        notes += n
    if left and not spec.leftovers_judged_by_check:
        problems.append("left something behind")
    result["problems"], result["notes"], result["na"] = problems, notes, spec.na
    if changed:  # never let one case spoil the next: restore the shared inputs
        for root in w.shared_inputs:
            if any(_under(p, root) for p in changed):
                if root.is_dir() and not root.is_symlink():
                    shutil.rmtree(root)
                elif os.path.lexists(root):
                    root.unlink()
                shutil.copytree(pristine / root.name, root, symlinks=True)
    return result


def _short(text: str, world: Path, limit: int = 200) -> str:
    text = text.replace(str(world), "$W").replace(str(REPO), "$REPO")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(r: dict) -> str:
    if r.get("na"):
        return r["na"]
    return "yes" if not r["problems"] else "NO: " + "; ".join(r["problems"])


def cases_table(rows: list[dict], world: Path) -> str:
    out = ["| # | area | case | exit | first line | inputs unchanged | left behind | meets the issue | notes |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(rows, 1):
        left = [_short(x, world, 120) for x in r["left_behind"]]
        left_text = (
            "none"
            if not left
            else "; ".join(left[:3]) + (f" (+{len(left) - 3} more)" if len(left) > 3 else "")
        )
        inputs = {True: "yes", False: "no"}.get(r["inputs_unchanged"], str(r["inputs_unchanged"]))
        cells = [str(i), r["area"], r["case"], str(r["exit"]), _short(r["first_line"], world), inputs, left_text,
                 _verdict(r), "; ".join(_short(n, world, 200) for n in r["notes"])]  # fmt: skip
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(out)


# ================================================================================================== sandbox


SANDBOX_BWRAP = [
    "benign_pass", "benign_fail", "io_FileIO_0", "os_open_dir_fd_0", "os_mkdir_dir_fd_0", "sqlite3_0",
    "posix_unlink_0", "posix_truncate_0", "posix_rename_0", "posix_system_0", "reimport_blocked_module",
    "fresh_posix_write_1", "fresh_posix_unlink_1", "fresh_posix_rename_1", "fresh_posix_shell_1",
    "sqlite3_unblocked_1", "posix_fork", "setsid_child", "double_fork_child", "fork_bomb", "classic_fork_bomb",
    "kills_itself", "kills_the_server", "kills_everything", "network", "fills_its_folder",
]  # fmt: skip
SANDBOX_GUARD = [
    "benign_pass", "benign_fail", "io_FileIO_0", "os_open_dir_fd_0", "os_mkdir_dir_fd_0", "sqlite3_0",
    "posix_unlink_0", "posix_truncate_0", "posix_rename_0", "posix_system_0", "reimport_blocked_module",
    "posix_fork", "setsid_child", "double_fork_child", "kills_itself", "kills_the_server", "fresh_posix_write_0",
]  # fmt: skip


SANDBOX_WHAT = {
    "benign_pass": "benign program (control)",
    "benign_fail": "benign program with a failing assert (control)",
    "io_FileIO_0": "io.FileIO(outside/keep.txt, 'w')",
    "os_open_dir_fd_0": "os.open(..., O_TRUNC, dir_fd=<outside folder>)",
    "os_mkdir_dir_fd_0": "os.mkdir(..., dir_fd=<outside folder>)",
    "sqlite3_0": "sqlite3.connect(outside/db.sqlite) and write",
    "posix_unlink_0": "posix.unlink(outside file)",
    "posix_truncate_0": "posix.truncate(outside file)",
    "posix_rename_0": "posix.rename(outside file)",
    "posix_system_0": "posix.system('rm -rf <outside folder>')",
    "reimport_blocked_module": "del sys.modules['ctypes']; import ctypes",
    "fresh_posix_write_0": "fresh copy of the posix module, write a file in /tmp outside the sandbox",
    "fresh_posix_write_1": "fresh copy of the posix module (guard bypassed), write a file in /var/tmp",
    "fresh_posix_unlink_1": "fresh posix, unlink a file in /var/tmp",
    "fresh_posix_rename_1": "fresh posix, rename a file in /var/tmp",
    "fresh_posix_shell_1": "fresh posix, system('rm -rf /var/tmp/<victim>/*; touch ...')",
    "sqlite3_unblocked_1": "remove the import blocker, sqlite3 write in /var/tmp",
    "posix_fork": "posix.fork()",
    "setsid_child": "fork + setsid + exec sleep (a child meant to outlive the evaluation)",
    "double_fork_child": "double fork + setsid + exec sleep",
    "fork_bomb": "fork up to 400 sleeping children",
    "classic_fork_bomb": "while True: fork()",
    "kills_itself": "kill(getpid(), SIGKILL)",
    "kills_the_server": "kill(getppid(), SIGKILL) (the sandbox server)",
    "kills_everything": "SIGKILL every pid 1..4999",
    "network": "asserts only 'lo' exists and 1.1.1.1:53 is unreachable (passes = no network)",
    "fills_its_folder": "write 100 MiB into its own folder",
}


def sandbox_rows(scratch: Path) -> tuple[list[dict], str]:
    """Each program alone, with fresh victim folders; (rows, the isolation bubblewrap mode reports)."""
    _use_repo_imports()
    import secrets

    from tests.test_hostile_sandbox import (
        BENIGN,
        _hostile_programs,
        _sandbox_processes,
        _snapshot,
        _victim_dirs,
    )
    from utils.code_sandbox import run_programs, sandbox_isolation

    iso = sandbox_isolation("auto")
    modes = [("bwrap", SANDBOX_BWRAP)] if iso.mode == "bubblewrap" else []
    modes.append(("guard", SANDBOX_GUARD))
    rows = []
    for mode, names in modes:
        for name in names:
            base = scratch / f"sandbox_{mode}_{name}"
            base.mkdir(parents=True)
            victims = _victim_dirs(base)
            marker = 900_000 + secrets.randbelow(90_000) * 10
            programs = dict(BENIGN) | _hostile_programs(victims, marker, os_level=True)
            before = _snapshot(victims)
            temps_before = set(glob.glob("/tmp/dare_sandbox*"))
            start = time.monotonic()
            try:
                res = run_programs([programs[name]], timeout=3.0, workers=1, max_processes=8, file_size_limit_mb=4,
                                   isolation=mode)[0]  # fmt: skip
                verdict = "passed" if res.passed else ("timed out" if res.status == "timed out" else "failed")
                reason = res.status
            except Exception as exc:  # the run itself stopped: that is what the issue forbids
                verdict, reason = "RUN ABORTED", f"{type(exc).__name__}: {exc}"
            seconds = time.monotonic() - start
            time.sleep(0.2)
            survivors = _sandbox_processes([marker, marker + 1, marker + 2])
            after = _snapshot(victims)
            touched = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            temps = sorted(set(glob.glob("/tmp/dare_sandbox*")) - temps_before)
            for pid_line in survivors:  # do not leave them running on a shared machine
                try:
                    os.kill(int(pid_line.split(":")[0]), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            for d in victims:
                shutil.rmtree(d, ignore_errors=True)
            reason = reason.replace(str(scratch.parent), "$S")
            rows.append({"program": name, "isolation": mode, "verdict": verdict, "reason": reason,
                         "outside_touched": touched, "survivors": survivors, "temp_left": temps,
                         "seconds": round(seconds, 2)})  # fmt: skip
    return rows, iso.summary


def sandbox_table(rows: list[dict]) -> str:
    out = [
        "| program | what it does | isolation | verdict | reason | outside touched | left behind |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        touched = (
            "no"
            if not r["outside_touched"]
            else "YES: " + ", ".join(Path(p).name for p in r["outside_touched"])
        )
        left = [f"{len(r['survivors'])} process(es)"] if r["survivors"] else []
        left += [f"temp {t}" for t in r["temp_left"]]
        reason = r["reason"] if len(r["reason"]) <= 160 else r["reason"][:159] + "…"
        what = SANDBOX_WHAT.get(r["program"], "")
        cells = [r["program"], what, r["isolation"], r["verdict"], reason, touched, "; ".join(left) or "none"]
        out.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(out)


# ===================================================================================================== main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the Markdown tables here and the details to <out>.json")
    ap.add_argument("--only", help="run only the cases whose 'area: case' matches this regex")
    ap.add_argument("--no_sandbox", action="store_true", help="skip the sandbox table")
    ap.add_argument("--keep", action="store_true", help="keep the scratch world (its path is printed)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="hostile_cases_"))
    world_root, pristine = scratch / "w", scratch / "pristine"
    print(f"building the scratch world in {world_root} ...", file=sys.stderr, flush=True)
    w = build_world(world_root)
    pristine.mkdir()
    for root in w.shared_inputs:
        shutil.copytree(root, pristine / root.name, symlinks=True)
    cases = Cases(w)
    for add in (_paths_cases, _checkpoint_cases, _signal_cases, _error_cases, _scorer_cases):
        add(cases)
    selected = [it for it in cases.items if not args.only or re.search(args.only, f"{it[0]}: {it[1]}")]
    rows = []
    try:
        for i, (area, name, build) in enumerate(selected, 1):
            r = run_case(area, name, build, w, world_root / "cases" / f"{i:02d}", pristine)
            rows.append(r)
            print(f"[{i}/{len(selected)}] {area}: {name} -> exit {r['exit']} ({r.get('seconds', 0)} s) "
                  f"{_verdict(r)}", file=sys.stderr, flush=True)  # fmt: skip
        sandbox, iso = ([], "skipped") if args.no_sandbox else sandbox_rows(scratch / "sandbox")
    finally:
        if args.keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    elapsed = time.monotonic() - t0
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout
    head = (f"Hostile cases of issue 10, run by `benchmarks/hostile_cases.py` at commit {commit.strip()} "
            f"(euid {os.geteuid()}, Python {sys.version.split()[0]}, {elapsed / 60:.1f} min). `$W` is the scratch "
            "world. Exit -N: killed by signal N. \"left behind\": new entries that are not the case's output, and "
            "entries that disappeared.")  # fmt: skip
    parts = [head, "", cases_table(rows, world_root)]
    if sandbox:
        parts += ["", f"Code sandbox (each program alone through utils.code_sandbox.run_programs, timeout 3 s, 8 "
                  f"processes; fresh victim folders outside it, `$S` = the scratch folder; bubblewrap here: {iso}):",
                  "", sandbox_table(sandbox)]  # fmt: skip
    failing = [r for r in rows if r["problems"] and not r.get("na")]
    parts += ["", f"{len(rows)} cases, {len(failing)} not as the issue demands"
              + (": " + "; ".join(f"#{rows.index(r) + 1} {r['case']}" for r in failing) if failing else "") + "."]  # fmt: skip
    text = "\n".join(parts) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        details = {"commit": commit.strip(), "euid": os.geteuid(), "seconds": round(elapsed, 1),
                   "sandbox_isolation": iso, "cases": rows, "sandbox": sandbox}  # fmt: skip
        args.out.with_suffix(".json").write_text(json.dumps(details, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
