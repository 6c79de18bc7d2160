"""Checks on a finished CLI subprocess that many test files share: it succeeded, or it was
refused with the expected exit code and one plain line on stderr (never a traceback)."""

from __future__ import annotations

import subprocess


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def one_sentence(result: subprocess.CompletedProcess[str], code: int = 1, *,
                 full_stop: bool = False) -> str:
    """The expected non-zero exit and one line on stderr (ending in a period if
    ``full_stop``); returns that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    if full_stop:
        assert lines[0].endswith("."), lines[0]
    return lines[0]
