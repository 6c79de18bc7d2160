"""Reading and checking JSON request bodies, so that every malformed request is a plain 400.

Handlers never index raw JSON: they ask a :class:`Body` for typed fields, and anything missing,
misspelled or of the wrong type becomes an ``InvalidRequest`` with one sentence naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from owm.common.errors import InvalidRequest
from owm.common.sizes import parse_size

MAX_SECONDS = 10**9  # about 30 years: longer waits are a mistake, not a plan


class Body:
    """A JSON object from a request body, read field by field with type checks."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._seen: set[str] = set()

    @classmethod
    async def read(cls, request: web.Request) -> Body:
        """Parse the body as a JSON object; an empty body counts as ``{}``."""
        raw = await request.read()
        if not raw.strip():
            return cls({})
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON ({exc})") from None
        except RecursionError:
            raise InvalidRequest("the request body is nested too deeply") from None
        except ValueError:
            # E.g. an integer of thousands of digits (Python refuses to convert it).
            raise InvalidRequest("the request body holds a number that is too long") from None
        if not isinstance(data, dict):
            raise InvalidRequest("the request body must be a JSON object")
        return cls(data)

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        return self._data.get(key)

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self._get(key)
        if value is None:
            if required:
                raise InvalidRequest(f"the field '{key}' is required")
            return default
        if not isinstance(value, str):
            raise InvalidRequest(f"the field '{key}' must be a string")
        return value

    def text_list(self, key: str, *, required: bool = False) -> list[str] | None:
        """A JSON array of strings (e.g. lock names)."""
        value = self._get(key)
        if value is None:
            if required:
                raise InvalidRequest(f"the field '{key}' is required")
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidRequest(f"the field '{key}' must be a list of strings")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        assert value is not None
        if value not in choices:
            raise InvalidRequest(f"the field '{key}' must be one of {', '.join(choices)}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidRequest(f"the field '{key}' must be true or false")
        return value

    def whole(self, key: str, default: int | None = None, *, minimum: int = 0) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"the field '{key}' must be a whole number")
        if value < minimum:
            raise InvalidRequest(f"the field '{key}' must be at least {minimum}")
        return value

    def size(self, key: str, default: int | None = None, *, required: bool = False) -> int | None:
        """A byte count given as a number or a string with a K/M/G/T suffix."""
        value = self._get(key)
        if value is None:
            if required:
                raise InvalidRequest(f"the field '{key}' is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise InvalidRequest(f"the field '{key}' must be a size such as 1073741824 or \"1G\"")
        size = parse_size(value)
        if size <= 0:
            raise InvalidRequest(f"the field '{key}' must be greater than zero")
        return size

    def seconds(self, key: str) -> float | None:
        """A non-negative duration in seconds, or None (no limit)."""
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"the field '{key}' must be a number of seconds")
        if not value >= 0 or value > MAX_SECONDS:
            raise InvalidRequest(
                f"the field '{key}' must be a number of seconds from 0 to {MAX_SECONDS}"
            )
        return float(value)

    def done(self) -> None:
        """Refuse fields the endpoint does not know (a misspelt option must not pass silently)."""
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise InvalidRequest(f"unknown field '{unknown[0]}' in the request body")
