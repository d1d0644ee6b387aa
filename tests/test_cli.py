"""The grun-fast dispatcher: help lists every subcommand; a missing subcommand module says so honestly."""
import subprocess
import sys

import pytest

from grun_fast import cli


def test_help_lists_every_subcommand(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unavailable_subcommand_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "demo", ("grun_fast.not_a_module", "x"))
    assert cli.main(["demo"]) == 2
    assert "not yet available" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "grun_fast.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "grun_fast" in result.stdout


def test_unknown_argument_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--no-such-flag"])


def test_bad_demo_input_is_one_error_line_and_exit_2(capsys):
    from grun_fast.cli import main

    assert main(["demo", "--steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "grun-fast demo: error: --steps only apply to the real-model demo (--model)"


def test_serve_names_the_transformers_it_needs_before_loading(monkeypatch, capsys):
    """The core allows any transformers >= 5.24; serving subclasses 5.24's serving classes, which 5.25 removed."""
    import transformers

    import grun_fast.models

    monkeypatch.setattr(grun_fast.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    assert cli.main(["serve", "--model", "./missing", "--adapter", "./missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers 5.25.0 is installed" in err[0]
    assert "pip install 'transformers[serving]>=5.24,<5.25'" in err[0]
