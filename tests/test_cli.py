"""The `t2i` command line: help, `verify` (table, JSON, exit codes) and the installed console script."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import verify
from models.cli import main


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `t2i argv...`, run in-process."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits for --help, --version and bad arguments
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_top_level_help_lists_verify(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "usage: t2i" in out and "verify" in out


def test_verify_help_lists_its_options(capsys):
    code, out, _ = run(capsys, "verify", "--help")
    assert code == 0
    for opt in ("--trials", "--seed", "--op", "--json"):
        assert opt in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.startswith("t2i ")


def test_verify_json_parses_and_passes(capsys):
    code, out, _ = run(capsys, "verify", "--op", "add", "--trials", "2", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ops"] == 1 and report["passed"] == 1 and report["failed"] == 0
    (r,) = report["results"]
    assert r["op"] == "add" and r["pass"] is True
    assert r["max_abs_error"] <= 1e-12


def test_verify_table_has_aligned_columns_and_summary(capsys):
    code, out, _ = run(capsys, "verify", "--op", "add", "--op", "mul", "--trials", "1")
    assert code == 0
    lines = out.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["op", "max abs error", "max rel error", "pass"]
    table = [ln for ln in lines if " | " in ln]
    assert len(table) == 3 and {ln.split()[0] for ln in table[1:]} == {"add", "mul"}
    for k in range(3):  # every separator lines up on every row
        assert len({[i for i in range(len(ln)) if ln.startswith(" | ", i)][k] for ln in table}) == 1
    assert lines[-1] == "2 ops, 2 passed, 0 failed"


@pytest.fixture
def broken_add(monkeypatch):
    """The `add` case with a wrong lambda on core's side (a - b) while PyTorch still runs a + b."""
    cases = verify.all_cases()
    add = next(c for c in cases if c.name == "add")

    def wrong(lib, F, a, b, **kw):
        return a - b if lib.__name__ == "core" else add.fn(lib, F, a, b, **kw)

    broken = [dataclasses.replace(c, fn=wrong) if c is add else c for c in cases]
    monkeypatch.setattr(verify, "all_cases", lambda: broken)


def test_verify_failure_exits_1_and_names_the_op(capsys, broken_add):
    code, out, _ = run(capsys, "verify", "--op", "add", "mul", "--trials", "1")
    assert code == 1
    assert "FAILED add" in out and "FAILED mul" not in out
    assert out.splitlines()[-1] == "2 ops, 1 passed, 1 failed"
    code, out, _ = run(capsys, "verify", "--op", "add", "--trials", "1", "--json")
    assert code == 1
    (r,) = json.loads(out)["results"]
    assert r["op"] == "add" and r["pass"] is False and r["message"]


def test_unknown_subcommand_exits_2(capsys):
    code, _, err = run(capsys, "bogus")
    assert code == 2 and "invalid choice" in err


def test_no_subcommand_exits_2(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "required" in err


@pytest.mark.parametrize("argv", [["--trials", "0"], ["--seed", "-1"], ["--op", "no_such_op"], ["--bogus"]])
def test_verify_bad_arguments_exit_2(capsys, argv):
    code, _, err = run(capsys, "verify", *argv)
    assert code == 2 and "error" in err


def test_verify_without_torch_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    code, _, err = run(capsys, "verify", "--op", "add")
    assert code == 1
    assert "t2i verify needs PyTorch: pip install -e '.[test]'" in err


def test_console_script_is_installed():
    # next to this interpreter (the venv's bin/) even when that folder is not on PATH
    exe = shutil.which("t2i", path=str(Path(sys.executable).parent)) or shutil.which("t2i")
    assert exe, "the console script t2i is not installed (pip install -e '.[test]')"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "verify" in proc.stdout


def test_case_names_are_unique():
    """`t2i verify --op NAME` and the test ids select a case by name: two cases must never share one."""
    from collections import Counter

    from core.verify import all_cases

    dup = [n for n, k in Counter(c.name for c in all_cases()).items() if k > 1]
    assert not dup, f"duplicate case names: {dup}"
