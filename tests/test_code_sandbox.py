"""The code sandbox: programs that loop forever, fork, allocate 100 GB, delete files outside their directory or
call sys.exit(0) before their asserts are reported as failed, do not hang the run and touch nothing outside."""

import os
import time
from pathlib import Path

import pytest

from utils.code_sandbox import run_program, run_programs, sandbox_isolation

TIMEOUT = 2.0


@pytest.fixture(scope="module")
def victim(tmp_path_factory) -> Path:
    """A file and a folder outside the sandbox that hostile programs try to destroy."""
    root = tmp_path_factory.mktemp("outside")
    (root / "keep.txt").write_text("precious")
    (root / "dir").mkdir()
    (root / "dir" / "inner.txt").write_text("also precious")
    return root


def _programs(victim: Path) -> dict[str, str]:
    f, d = victim / "keep.txt", victim / "dir"
    return {
        "passes": "def add(a, b):\n    return a + b\nassert add(1, 2) == 3\n",
        "writes_inside": "open('out.txt', 'w').write('x')\nassert open('out.txt').read() == 'x'\n",
        "failing_assert": "assert 1 + 1 == 3\n",
        "infinite_loop": "while True:\n    pass\n",
        "sleeps_forever": "import time\ntime.sleep(1000)\n",
        "fork": "import os\npid = os.fork()\nassert True\n",
        "subprocess": "import subprocess\nsubprocess.run(['sleep', '1000'])\nassert True\n",
        "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()\nassert True\n",
        "alloc_100gb": "x = bytearray(100 * 1024 ** 3)\nassert len(x) > 0\n",
        "alloc_100gb_list": "x = [0] * (100 * 1024 ** 3 // 8)\nassert x\n",
        "os_remove": f"import os\nos.remove({str(f)!r})\nassert True\n",
        "pathlib_unlink": f"import pathlib\npathlib.Path({str(f)!r}).unlink()\nassert True\n",
        "rmtree": f"import shutil\nshutil.rmtree({str(d)!r})\nassert True\n",
        "overwrite": f"open({str(f)!r}, 'w').write('gone')\nassert True\n",
        "os_open_truncate": f"import os\nos.open({str(f)!r}, os.O_WRONLY | os.O_TRUNC)\nassert True\n",
        "os_system": f"import os\nos.system('rm -rf {d}')\nassert True\n",
        "sys_exit_0": "import sys\nsys.exit(0)\nassert 1 == 2\n",
        "exit_builtin": "exit(0)\nassert 1 == 2\n",
        "os_exit_0": "import os\nos._exit(0)\nassert 1 == 2\n",
        "raise_systemexit": "raise SystemExit\n",
    }


def test_hostile_programs_fail_without_hanging_or_touching_outside(victim):
    programs = _programs(victim)
    start = time.monotonic()
    results = dict(
        zip(programs, run_programs(list(programs.values()), timeout=TIMEOUT, workers=4), strict=True)
    )
    elapsed = time.monotonic() - start
    assert results["passes"].passed and results["passes"].status == "passed"
    assert results["writes_inside"].passed
    for name, r in results.items():
        if name not in ("passes", "writes_inside"):
            assert not r.passed, (name, r.status)
    assert results["failing_assert"].status.startswith("failed: AssertionError")
    assert results["infinite_loop"].status == "timed out"
    assert results["sleeps_forever"].status == "timed out"
    assert results["infinite_loop"].seconds < TIMEOUT + 3
    assert "MemoryError" in results["alloc_100gb"].status
    assert "SystemExit" in results["sys_exit_0"].status
    assert "exited with status 0" in results["os_exit_0"].status
    # two programs time out (2 s each) and the rest are quick: with 4 workers the run is far below 20 x 2 s
    assert elapsed < 3 * TIMEOUT + 10
    # nothing outside was touched
    assert (victim / "keep.txt").read_text() == "precious"
    assert (victim / "dir" / "inner.txt").read_text() == "also precious"
    # every program's working directory is gone
    for r in results.values():
        assert r.workdir and not os.path.exists(r.workdir)


def test_results_keep_input_order_and_parallel_workers_speed_things_up():
    programs = [f"assert {i} == {i}" if i % 3 else f"assert {i} == -1" for i in range(30)]
    results = run_programs(programs, timeout=5, workers=2)
    assert [r.passed for r in results] == [bool(i % 3) for i in range(30)]
    start = time.monotonic()
    sleepers = run_programs(["import time\ntime.sleep(1.0)"] * 6, timeout=10, workers=6)
    assert all(r.passed for r in sleepers)
    assert time.monotonic() - start < 4.0  # one after the other they would take 6 s


def test_the_program_runs_in_an_empty_private_directory_with_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN_FOR_TEST", "s3cr3t")
    program = (
        "import os, tempfile\n"
        "assert os.listdir('.') == []\n"
        "assert 'SECRET_TOKEN_FOR_TEST' not in os.environ\n"
        "assert tempfile.gettempdir() == os.environ['TMPDIR']\n"
        "assert __name__ != '__main__'\n"
    )
    result = run_program(program, timeout=5)
    assert result.passed, result.status


def test_bad_arguments():
    for timeout in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            run_programs(["pass"], timeout=timeout)
    with pytest.raises(ValueError):
        run_programs(["pass"], workers=0)
    with pytest.raises(ValueError, match="isolation"):
        run_programs(["pass"], isolation="docker")
    assert run_programs([]) == []


@pytest.mark.parametrize("isolation", ["auto", "guard"])
def test_results_say_how_the_programs_were_isolated(isolation):
    expected = sandbox_isolation(isolation)
    (result,) = run_programs(["assert True"], timeout=5, isolation=isolation)
    assert result.passed and result.isolation == expected.summary
    if expected.mode == "guard":
        assert "OFF: network isolation" in result.isolation


@pytest.mark.parametrize("isolation", ["auto", "guard"])
def test_printing_a_lot_is_buffered_and_output_is_discarded(isolation):
    program = (
        "import sys\n"
        "assert not sys.stdout.line_buffering and not sys.stdout.write_through\n"
        "for i in range(100_000):\n"
        "    print(i, 'x' * 20)\n"
        "print('to stderr', file=sys.stderr)\n"
        "assert input.__name__ == 'input'\n"
    )
    result = run_program(program, timeout=20, isolation=isolation)
    assert result.passed, result.status
    eof = run_program("input()", timeout=5, isolation=isolation)
    assert not eof.passed and "EOFError" in eof.status


@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="needs Linux /proc")
def test_resource_limits_are_applied_in_the_child():
    program = (
        "lines = {l[:26].strip(): l[26:].split() for l in open('/proc/self/limits').read().splitlines()[1:]}\n"
        "assert lines['Max address space'][:2] == [str(512 * 1024 * 1024)] * 2, lines['Max address space']\n"
        "assert lines['Max cpu time'][:2] == ['4', '4'], lines['Max cpu time']\n"
        "assert lines['Max file size'][:2] == [str(2 * 1024 * 1024)] * 2, lines['Max file size']\n"
        "assert lines['Max core file size'][:2] == ['0', '0']\n"
    )
    result = run_program(program, timeout=2.5, memory_limit_mb=512, file_size_limit_mb=2)
    assert result.passed, result.status
    big_file = "open('big.bin', 'wb').write(b'x' * (3 * 1024 * 1024))\n"
    assert not run_program(big_file, timeout=5, file_size_limit_mb=2).passed
