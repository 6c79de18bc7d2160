"""Hostile control-API input is one plain sentence and a 4xx, never a 500 (issue 9, item 10).

Deeply nested JSON, sizes of hundreds of digits, integers too long for Python to convert,
sizes past what a float holds exactly, and volumes larger than owm's documented maximum
(``owm.common.sizes.MAX_VOLUME_SIZE``, 4 PiB) each get a sentence, through the real control
socket of a real daemon and through the CLI.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import Daemon

from owm.common.errors import InvalidRequest
from owm.common.sizes import parse_size

pytestmark = pytest.mark.timeout(120)

DEEP = 100_000
MAX_VOLUME_SIZE = 1 << 52  # owm.common.sizes.MAX_VOLUME_SIZE, the documented maximum


def refused(daemon: Daemon, method: str, path: str, body: bytes | dict[str, Any],
            fragment: str, status: int = 400) -> str:
    got, answer = daemon.api(method, path, body, {"Content-Type": "application/json"})
    assert got == status, (got, answer)
    message = answer["error"]
    assert isinstance(message, str) and "\n" not in message and fragment in message, message
    return message


def test_sizes_are_parsed_exactly() -> None:
    assert parse_size("9007199254740993") == 9007199254740993
    assert parse_size("1.25K") == 1280
    assert parse_size("4P") == MAX_VOLUME_SIZE
    for bad in ("9" * 400, "1" * 5000, "٣", "1e5", "0x10", "1.5", "-1", "1K\n2"):
        with pytest.raises(InvalidRequest):
            parse_size(bad)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
        (b'{"name": ' + b"[" * DEEP + b"]" * DEEP + b', "size": 1}', "nested too deeply"),
        (b'{"name": "v", "size": ' + b"7" * 5000 + b"}", "too long"),
        ({"name": "v", "size": int("9" * 400)}, "too large"),
        ({"name": "v", "size": "9" * 400}, "too large"),
        ({"name": "v", "size": "9007199254740993"}, "at most 4P"),
        ({"name": "v", "size": "1024P"}, "at most 4P"),
        ({"name": "v", "size": MAX_VOLUME_SIZE + 1}, "at most 4P"),
        ({"name": "v", "size": 1 << 80}, "too large"),
        ({"name": "v", "size": "1M", "chunk_size": "9" * 400}, "too large"),
        ({"name": "v", "size": "1M", "legs": int("9" * 400), "method": "mirror"}, "legs"),
        ({"name": "v", "size": 1e300}, "'size'"),
    ],
)
def test_create_volume_refuses_hostile_input(daemon: Daemon, body: Any, fragment: str) -> None:
    refused(daemon, "POST", "/v1/volumes", body, fragment)
    assert daemon.api("GET", "/v1/volumes") == (200, [])
    assert "Traceback" not in daemon.log_text()


def test_hostile_numbers_elsewhere(daemon: Daemon) -> None:
    assert daemon.api("POST", "/v1/volumes", {"name": "v", "size": "1M"})[0] == 201
    assert daemon.api("POST", "/v1/volumes/v/preserve", {})[0] == 201
    refused(daemon, "POST", "/v1/images/v@0/wait", {"timeout": int("9" * 400)}, "'timeout'")
    refused(daemon, "POST", "/v1/images/v@0/wait",
            b'{"timeout": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply")
    refused(daemon, "POST", "/v1/images/v@0/wait", b'{"timeout": 1e999}', "'timeout'")
    assert "Traceback" not in daemon.log_text()


def test_a_volume_larger_than_the_maximum_is_refused_before_any_preserve(daemon: Daemon) -> None:
    """1 EiB was accepted and then made ``preserve`` fail with MemoryError."""
    refused(daemon, "POST", "/v1/volumes", {"name": "huge", "size": 1 << 60}, "at most 4P")
    refused(daemon, "POST", "/v1/volumes/huge/preserve", {}, "no volume", status=404)


def test_the_cli_says_one_sentence_for_hostile_sizes(daemon: Daemon) -> None:
    result = daemon.owm("volume", "create", "v", "--size", "9" * 400)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "too large" in result.stderr

    result = daemon.owm("volume", "create", "v", "--size", "1024P")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "at most 4P" in result.stderr

    result = daemon.owm("volume", "create", "v", "--size", "9007199254740993", "--json")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert json.loads(daemon.owm("volume", "list", "--json").stdout) == []
