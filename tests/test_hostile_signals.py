"""Signals during a merge (issue 10, item 2): SIGTERM, SIGHUP and Ctrl-C remove the partial output and exit with
128 + the signal; SIGKILL cannot be caught and leaves a temporary folder named with the dead process's pid, which the
next run for the same target removes (and only that: a live process's folder, or a folder that is not the toolkit's,
is kept). The merge runs as a real process through ``merge_llms_instruct_math_code.py``'s ``main``; a test hook
slows its writes down (0.6 s per write) so that the signal arrives mid-way, even on a loaded machine (at 0.2 s a
merge once finished before the signal under a load of 3 on 2 cores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import merge_llms_instruct_math_code as merge
from model_merging_methods.paths import OWNER_MARKER, is_toolkit_output
from model_merging_methods.publish import remove_stale_temporaries
from tests.test_hostile_paths import ENV, listing, run_cli, snapshot
from tests.test_streaming_merge import build_family

REPO = Path(__file__).resolve().parents[1]

SLOW_MERGE = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from model_merging_methods import checkpoint_io
_write_at = checkpoint_io.ShardedSafetensorsWriter.write_at
def slow(self, *args):
    print("writing", flush=True)
    time.sleep(0.6)
    return _write_at(self, *args)
checkpoint_io.ShardedSafetensorsWriter.write_at = slow
import merge_llms_instruct_math_code as script
from utils.cli import run_main
run_main(script.main)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_signals")
    return {"root": root, "models": root / "models", **build_family(root / "models")}


def argv(world, out: Path) -> list[str]:
    return ["--pretrained_model_name", str(world["base"]), "--finetuned_model_names", str(world["ft_a"]),
            str(world["ft_b"]), "--merged_model_path", str(out), "--skip_evaluation"]  # fmt: skip


def _default_sigint() -> None:
    """Run in the child before Python starts: SIGINT back to its default. A job started in the background by a
    non-interactive shell (``cmd &``, as CI wrappers and ``nohup`` do) inherits SIGINT ignored; Python then installs
    no KeyboardInterrupt handler, and the CLI rightly keeps an ignored SIGINT ignored, so the test would see the merge
    finish."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_slow_merge(world, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, *argv(world, out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=ENV, cwd=REPO, preexec_fn=_default_sigint,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert "writing" in line, proc.stderr.read() if proc.poll() is not None else line
    time.sleep(0.3)  # inside the first slowed write: the output folder exists, many writes are still to come
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, list[str]]:
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err.strip().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, code, line",
    [(signal.SIGTERM, 143, "terminated by SIGTERM"), (signal.SIGHUP, 129, "terminated by SIGHUP"),
     (signal.SIGINT, 130, "interrupted")],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)  # fmt: skip
def test_catchable_signal_mid_merge_leaves_nothing(world, tmp_path, sig, code, line):
    before = snapshot(world["models"])
    out = tmp_path / "new" / "merged"  # the parent folder is made by the run, and must go too
    proc = start_slow_merge(world, out)
    assert any(p.name.startswith(f".merged.tmp-{proc.pid}-") for p in (tmp_path / "new").iterdir())
    proc.send_signal(sig)
    rc, err = finish(proc)
    assert rc == code and err[-1] == line, err
    assert listing(tmp_path) == []
    assert snapshot(world["models"]) == before


@pytest.mark.slow
def test_sigkill_leaves_a_pid_named_folder_that_the_next_run_removes(world, tmp_path, capsys):
    before = snapshot(world["models"])
    out = tmp_path / "merged"
    proc = start_slow_merge(world, out)
    proc.send_signal(signal.SIGKILL)
    rc, _ = finish(proc)
    assert rc == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].name.startswith(f".merged.tmp-{proc.pid}-"), left
    marker = json.loads((left[0] / OWNER_MARKER).read_text())
    assert marker["pid"] == proc.pid and marker["target"] == str(out)
    assert (left[0] / "model.safetensors").stat().st_size > 0  # a partial model was there
    # the next run for the same target removes it, says so, and publishes
    code, err = run_cli(merge.main, argv(world, out), capsys)
    assert code == 0, err
    assert any(
        f"removed the stale temporary folder {left[0]} (its process {proc.pid} is gone)" in e for e in err
    )
    assert [p.name for p in tmp_path.iterdir()] == ["merged"] and is_toolkit_output(out)
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert any(str(left[0]) in h for h in manifest["housekeeping"])
    assert snapshot(world["models"]) == before


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _fake_temporary(parent: Path, name: str, tag: str, pid: int, marker: bool = True) -> Path:
    folder = parent / f".{name}.{tag}-{pid}-0123abcd"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"partial")
    if marker:
        (folder / OWNER_MARKER).write_text(json.dumps({"tool": "dare-merging-toolkit", "pid": pid}))
    return folder


def test_a_live_process_temporary_folder_is_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = _fake_temporary(tmp_path, "merged", "tmp", sleeper.pid)
        dead = _fake_temporary(tmp_path, "merged", "tmp", _dead_pid())
        done = remove_stale_temporaries(tmp_path / "merged")
        assert live.is_dir() and not dead.exists() and len(done) == 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(tmp_path / "merged") and not live.exists()


def test_a_folder_that_is_not_the_toolkits_is_kept(tmp_path):
    """Only folders with the toolkit's marker (or empty ones, killed before the marker was written) are removed."""
    foreign = _fake_temporary(tmp_path, "merged", "tmp", _dead_pid(), marker=False)
    empty = tmp_path / f".merged.tmp-{_dead_pid()}-89abcdef"
    empty.mkdir()
    other_target = _fake_temporary(tmp_path, "other", "tmp", _dead_pid())
    remove_stale_temporaries(tmp_path / "merged")
    assert foreign.is_dir() and not empty.exists() and other_target.is_dir()


def test_a_replaced_output_whose_replacement_never_arrived_is_restored(tmp_path, capsys, world):
    """Killed between renaming the old output away and renaming the new one in: the next run restores the old
    output first (so without --overwrite it is refused, as the output exists)."""
    old = _fake_temporary(tmp_path, "merged", "old", _dead_pid())
    (old / "merge_manifest.json").write_text(json.dumps({"tool": "dare-merging-toolkit streaming engine"}))
    code, err = run_cli(merge.main, argv(world, tmp_path / "merged"), capsys)
    assert code == 2 and err[-1].startswith("error: output path") and "already exists" in err[-1], err
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == b"partial"
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_stale_temporary_files_of_atomic_writes_are_removed(tmp_path):
    from model_merging_methods.publish import write_json

    stale = tmp_path / f".r.json.{_dead_pid()}.abcd1234.tmp"
    stale.write_text("{")
    live = tmp_path / f".r.json.{os.getpid()}.efgh5678.tmp"
    live.write_text("{")
    write_json(tmp_path / "r.json", {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "r.json"])
