"""`alignfast --help`, `bench`, `info`: complete help, one-line errors, exit codes."""

import subprocess
import sys

import pytest

from alignfast.cli import COMMAND_NAMES, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for name in COMMAND_NAMES:
        assert f"    {name}" in out


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert f"usage: alignfast {name}" in capsys.readouterr().out


def test_unknown_benchmark_is_one_line(capsys):
    assert main(["bench", "no_such_bench"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alignfast bench: error:") and "\n" not in err


def test_console_script_info():
    out = subprocess.run([sys.executable, "-m", "alignfast.cli", "info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "extension alignfast._C" in out.stdout
