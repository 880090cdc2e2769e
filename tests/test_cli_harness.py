"""The bad-input harness notices what it must: a zero exit, a traceback, a changed directory."""

import pytest

import cli_errors
from cli_errors import assert_one_line_error


def test_a_missing_model_directory_is_one_line_and_changes_nothing(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert_one_line_error(["generate", "--model", tmp_path / "missing", "--prompt", "x"],
                          "does not exist", capsys=capsys, unchanged=[tmp_path])


def test_the_harness_fails_on_success(capsys):
    with pytest.raises(AssertionError, match="exit code 0"):
        assert_one_line_error(["presets"], capsys=capsys)


def test_the_harness_fails_on_an_escaping_exception(capsys, monkeypatch):
    def crash(argv):
        raise KeyError("deep inside")

    monkeypatch.setattr(cli_errors, "main", crash)
    with pytest.raises(pytest.fail.Exception, match="KeyError"):
        assert_one_line_error(["presets"], capsys=capsys)


def test_the_harness_fails_when_a_failing_command_changed_a_directory(tmp_path, capsys,
                                                                     monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    real = cli_errors.main
    monkeypatch.setattr(cli_errors, "main",
                        lambda argv: (victim.joinpath("new").write_text("x"), real(argv))[1])
    with pytest.raises(AssertionError, match="changed although the command failed"):
        assert_one_line_error(["generate", "--model", victim / "missing", "--prompt", "x"],
                              "does not exist", capsys=capsys, unchanged=[victim])
