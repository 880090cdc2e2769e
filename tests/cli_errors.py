"""Running bad input through the real `hybridlm` entry point and checking how it ends.

    assert_one_line_error(["train", "--set", "lr=nan"], "lr", "nan", unchanged=[run_dir])

runs `hybridlm.cli.main(argv)` in-process and asserts: a non-zero exit, exactly one line on
stderr that names the problem (every word given), no traceback, and every directory in
`unchanged` byte-for-byte as it was before (files, their contents, nothing added or removed).
"""

from __future__ import annotations

import hashlib
import traceback
from pathlib import Path

import pytest

from hybridlm.cli import main


def snapshot(path: str | Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` ('<dir>' for directories); a file
    path snapshots that file alone; a missing path is an empty snapshot."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for item in sorted(path.rglob("*")):
        rel = str(item.relative_to(path))
        out[rel] = "<dir>" if item.is_dir() else hashlib.sha256(item.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `hybridlm argv`; an exception escaping main fails the
    test with its traceback (that is a traceback the user would see)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors exit 2 with their own message
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:  # reported as the failure itself: the user would see a traceback
        pytest.fail(f"hybridlm {' '.join(map(str, argv))} raised:\n{traceback.format_exc()}")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(
    argv: list, *words: str, capsys: pytest.CaptureFixture[str],
    unchanged: list[str | Path] = (),
) -> str:
    """Run `hybridlm argv`, expect a one-line error naming every word; returns that line."""
    before = {str(p): snapshot(p) for p in unchanged}
    code, _, err = run_cli(argv, capsys)
    # argparse's own errors come after its usage block (a first "usage:" line and indented
    # continuations): the error is the line after it.
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("usage:", " "))]
    assert code != 0, f"exit code 0 for {argv}; stderr: {err!r}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    for word in words:
        assert word in lines[0], f"{word!r} not in the error: {lines[0]!r}"
    for path, snap in before.items():
        assert snapshot(path) == snap, f"{path} changed although the command failed"
    return lines[0]
