"""Per-export access rules and the Unix socket's mode, through a real ``owm serve``.

One daemon serves ``--tls=on`` with a CA (client certificates are asked for and checked, not
required) and these rules: alice may write every ``vol*`` export, bob may only read ``vol`` and
its images, Unix-socket clients may only read preserved images, and nobody else gets anything.
Clients are real ones (nbdinfo, qemu-io) and a hand-driven one that ignores the read-only flag,
to see the server itself refuse writes with EPERM.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, run_owm, start_daemon
from nbd_fixtures import have, run
from test_tls import Pki, PlainClient, make_pki, nbds_uri, qemu_io_tls

from owm.common.errors import InvalidRequest
from owm.nbd import constants as c
from owm.nbd.access import AccessRules, Client

RULES = """
[[rule]]
client = "alice"
exports = ["vol*"]
access = "rw"

[[rule]]
client = "bob"
exports = "vol"
access = "ro"

[[rule]]
client = "unix"
exports = ["*@*"]
access = "ro"
"""

needs_tools = pytest.mark.skipif(
    not have("qemu-io", "nbdinfo"), reason="qemu-io and nbdinfo are needed"
)


def _go(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


def _names(replies: list[tuple[int, bytes]]) -> list[str]:
    out = []
    for reply_type, payload in replies:
        if reply_type == c.REP_SERVER:
            (n,) = struct.unpack_from(">I", payload)
            out.append(payload[4 : 4 + n].decode())
    return out


def _tool(*argv: str) -> tuple[int, str, str]:
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(run(*argv, check=False))
    finally:
        loop.close()
    return result.returncode, result.stdout, result.stderr


# ------------------------------------------------------------------------------ the rules alone


def test_first_matching_rule_decides_and_unmatched_is_refused() -> None:
    rules = AccessRules.parse(RULES + '[[rule]]\nclient = "any"\nexports = ["pub"]\naccess = "rw"')
    alice, bob = Client("alice"), Client("bob")
    unix, anon = Client(unix=True), Client()
    assert rules.decide(alice, "vol2") == "rw"
    assert rules.decide(bob, "vol") == "ro" and rules.decide(bob, "vol@3") == "ro"
    assert rules.decide(bob, "vol2") is None
    assert rules.decide(unix, "vol") is None and rules.decide(unix, "vol2@0") == "ro"
    assert rules.decide(anon, "vol") is None and rules.decide(anon, "pub") == "rw"
    # A certificate named like a keyword is only ever that name, never the Unix socket.
    assert rules.decide(Client("unix"), "vol@0") is None


@pytest.mark.parametrize(
    "text, words",
    [
        ("[[rule]]\nclient = 'a'\nexports = ['x']\naccess = 'rwx'", "access = 'ro' or 'rw'"),
        ("[[rule]]\nclient = 'a'\naccess = 'ro'", "needs exports"),
        ("[[rule]]\nexports = ['x']\naccess = 'ro'", "needs a client"),
        ("[[rule]]\nclient = 'a'\nexports = ['x']\naccess = 'ro'\nmode = 1", "unknown key 'mode'"),
        ("[rules]\n", "unknown key 'rules'"),
        ("[[rule]\n", "not valid TOML"),
    ],
)
def test_bad_rules_are_one_sentence(text: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=words.replace("(", r"\(")):
        AccessRules.parse(text)


def test_serve_with_a_bad_rules_file_exits_1_in_one_sentence(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text("[[rule]]\nclient = 'a'\n")
    for path in (bad, tmp_path / "missing.toml"):
        result = run_owm("--pool", tmp_path / "pool", "serve", "--listen", "127.0.0.1:0",
                         "--access-file", path, timeout=30)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert str(path) in result.stderr


# --------------------------------------------------------------------------- a real daemon


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def access_daemon(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("accessd")
    rules = root / "rules.toml"
    rules.write_text(RULES)
    d = start_daemon(root / "pool", *pki.serve_args("on", verify=False), "--access-file", rules)
    try:
        for name in ("vol", "vol2", "other"):
            result = d.owm("volume", "create", name, "--size", "4M")
            assert result.returncode == 0, result.stderr
        assert d.owm("preserve", "vol").returncode == 0
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_text()


def test_unix_socket_is_0600_by_default(access_daemon: Daemon) -> None:
    mode = os.stat(access_daemon.nbd_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_list_shows_only_what_the_client_may_open(access_daemon: Daemon, pki: Pki) -> None:
    seen = {}
    for who in ("alice", "bob", "anon"):
        client = PlainClient(access_daemon.nbd_tcp)
        try:
            client.starttls(pki.client_dir(who))
            seen[who] = sorted(_names(client.option_replies(c.OPT_LIST)))
        finally:
            client.close()
    assert seen["alice"] == ["vol", "vol2", "vol@0"]
    assert seen["bob"] == ["vol", "vol@0"]
    assert seen["anon"] == []


def test_denied_export_is_refused_by_policy_with_a_log_line(
    access_daemon: Daemon, pki: Pki
) -> None:
    client = PlainClient(access_daemon.nbd_tcp)
    try:
        client.starttls(pki.client_dir("bob"))
        for option in (c.OPT_INFO, c.OPT_GO):
            reply_type, message = client.option(option, _go("vol2"))
            assert reply_type == c.REP_ERR_POLICY
            assert b"cn=bob is not allowed to open export 'vol2'" in message
        # bob may still go on and open what he is allowed to.
        replies = client.option_replies(c.OPT_GO, _go("vol"))
        assert replies[-1][0] == c.REP_ACK
    finally:
        client.close()
    assert "(cn=bob) refused export 'vol2' by the access rules" in access_daemon.log_text()
    # A plain-text client (no identity) gets no rule at all.
    plain = PlainClient(access_daemon.nbd_tcp)
    try:
        assert plain.option(c.OPT_GO, _go("vol"))[0] == c.REP_ERR_POLICY
    finally:
        plain.close()


def test_read_only_client_cannot_write_even_ignoring_the_flag(
    access_daemon: Daemon, pki: Pki
) -> None:
    client = PlainClient(access_daemon.nbd_tcp)
    try:
        client.starttls(pki.client_dir("bob"))
        replies = client.option_replies(c.OPT_GO, _go("vol"))
        assert replies[-1][0] == c.REP_ACK
        export = next(p for t, p in replies if t == c.REP_INFO and p[:2] == b"\0\0")
        flags = struct.unpack_from(">H", export, 10)[0]
        assert flags & c.FLAG_READ_ONLY
        assert client.request(c.CMD_WRITE, 0, 512, b"\xee" * 512) == c.EPERM
        assert client.request(c.CMD_READ, 0, 512) == 0
        client.sock.sendall(struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, c.CMD_DISC, 8, 0, 0))
    finally:
        client.close()


@needs_tools
def test_real_clients_get_what_the_rules_say(access_daemon: Daemon, pki: Pki) -> None:
    address = access_daemon.nbd_tcp
    alice, bob = pki.client_dir("alice"), pki.client_dir("bob")
    code, out, err = _tool(*qemu_io_tls(address, "vol2", alice, "write -P 0x42 0 64k"))
    assert code == 0 and "wrote 65536/65536" in out, err
    code, out, err = _tool("nbdinfo", "--json", nbds_uri(address, "vol", bob))
    assert code == 0, err
    assert json.loads(out)["exports"][0]["is_read_only"] is True
    code, out, err = _tool(*qemu_io_tls(address, "vol", bob, "write -P 0x42 0 64k"))
    assert "wrote 65536/65536" not in out
    code, out, err = _tool("nbdinfo", nbds_uri(address, "vol2", bob))
    assert code != 0 and "export-size" not in out
    # The Unix socket may read preserved images only.
    sock = access_daemon.nbd_socket
    code, out, err = _tool("nbdinfo", "--json", f"nbd+unix:///vol@0?socket={sock}")
    assert code == 0 and json.loads(out)["exports"][0]["is_read_only"] is True, err
    code, out, err = _tool("nbdinfo", f"nbd+unix:///vol?socket={sock}")
    assert code != 0


def _other_group() -> grp.struct_group | None:
    for name in ("nogroup", "daemon", "users", "adm"):
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        if group.gr_gid != os.getgid():
            return group
    return None


def test_socket_group_makes_the_socket_0660_for_that_group(short_tmp: Path) -> None:
    group = _other_group()
    if group is None:
        pytest.skip("no second group on this machine")
    d = start_daemon(short_tmp / "pool", "--socket-group", group.gr_name)
    try:
        st = os.stat(d.nbd_socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == group.gr_gid
    finally:
        assert d.stop() == 0
    result = run_owm("--pool", short_tmp / "pool2", "serve", "--listen", "127.0.0.1:0",
                     "--socket-group", "no-such-group-here", timeout=30)
    assert result.returncode == 1 and "There is no group named" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
