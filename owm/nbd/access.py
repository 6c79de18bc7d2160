"""Per-export access rules: which client may open which export, read-only or read-write.

The rules file (``owm serve --access-file F``) is TOML, a list of ``[[rule]]`` tables::

    [[rule]]
    client = "backup"          # a client certificate's subject CN, or "any", or "unix"
    exports = ["db-*@*"]       # export name patterns (fnmatch: * ? [...])
    access = "ro"              # "ro" or "rw"

``client = "any"`` matches every client; ``"unix"`` matches clients of the Unix NBD socket;
anything else matches a TLS client whose verified certificate has that subject common name
(so a certificate named "any" or "unix" only ever matches a rule for "any"). A pattern with
an ``@`` is matched against the whole export name (``vol@3``); one without is matched against
the volume's name, so ``"vol"`` covers the live volume and its preserved images.

The first rule whose client and one of whose patterns match decides; an export no rule grants
is refused. Preserved images are read-only whatever a rule says. Without a rules file every
client may open every export (as before).
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owm.common.errors import InvalidRequest

ANY = "any"
UNIX = "unix"
READ_ONLY = "ro"
READ_WRITE = "rw"
_KEYS = {"client", "exports", "access"}


@dataclass(frozen=True)
class Client:
    """Who is asking: the certificate's subject CN (None without one) and the transport."""

    common_name: str | None = None
    unix: bool = False

    def describe(self) -> str:
        if self.unix:
            return "unix"
        return f"cn={self.common_name}" if self.common_name else "anonymous"


@dataclass(frozen=True)
class Rule:
    client: str
    exports: tuple[str, ...]
    access: str

    def matches_client(self, who: Client) -> bool:
        if self.client == ANY:
            return True
        if self.client == UNIX:
            return who.unix
        return not who.unix and who.common_name == self.client

    def matches_export(self, name: str) -> bool:
        volume = name.split("@", 1)[0]
        for pattern in self.exports:
            subject = name if "@" in pattern else volume
            if fnmatch.fnmatchcase(subject, pattern):
                return True
        return False


@dataclass(frozen=True)
class AccessRules:
    """The rules of one file, in order."""

    rules: tuple[Rule, ...]
    source: str = ""

    def decide(self, who: Client, export: str) -> str | None:
        """``"rw"``, ``"ro"``, or None when the client may not open the export at all."""
        for rule in self.rules:
            if rule.matches_client(who) and rule.matches_export(export):
                return rule.access
        return None

    @classmethod
    def parse(cls, text: str, source: str = "the access rules") -> AccessRules:
        """Rules from TOML text; InvalidRequest names the first mistake in one sentence."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"{source} is not valid TOML ({exc}).") from None
        extra = set(doc) - {"rule"}
        if extra:
            raise InvalidRequest(
                f"{source} has unknown key {sorted(extra)[0]!r}; only [[rule]] tables are allowed."
            )
        raw = doc.get("rule", [])
        if not isinstance(raw, list):
            raise InvalidRequest(f"{source}: 'rule' must be a list of [[rule]] tables.")
        return cls(tuple(_rule(item, n, source) for n, item in enumerate(raw, 1)), source)

    @classmethod
    def load(cls, path: Path) -> AccessRules:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(
                f"Cannot read the access rules file {path}: {exc.strerror}."
            ) from None
        except UnicodeDecodeError:
            raise InvalidRequest(f"The access rules file {path} is not UTF-8 text.") from None
        return cls.parse(text, f"The access rules file {path}")


def _rule(item: Any, n: int, source: str) -> Rule:
    where = f"{source}, rule {n},"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where} is not a table.")
    extra = set(item) - _KEYS
    if extra:
        raise InvalidRequest(f"{where} has unknown key {sorted(extra)[0]!r}.")
    client = item.get("client")
    if not isinstance(client, str) or not client:
        raise InvalidRequest(f"{where} needs a client (a certificate CN, 'any' or 'unix').")
    exports = item.get("exports")
    if isinstance(exports, str):
        exports = [exports]
    if (
        not isinstance(exports, list)
        or not exports
        or not all(isinstance(e, str) and e for e in exports)
    ):
        raise InvalidRequest(f"{where} needs exports, a list of export name patterns.")
    access = item.get("access")
    if access not in (READ_ONLY, READ_WRITE):
        raise InvalidRequest(f"{where} needs access = 'ro' or 'rw'.")
    return Rule(client, tuple(exports), access)
