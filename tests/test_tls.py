"""TLS on the NBD data plane: STARTTLS in the pure machine, and a real ``owm serve --tls``
against qemu-io, nbdinfo and nbdcopy with x509 certificates made here with ``cryptography``.

The PKI (``make_pki``): a CA, a server certificate for 127.0.0.1 and localhost, client
certificates "alice" and "bob" from that CA, a second CA nobody trusts and a client
certificate "mallory" from it.  Client credentials are laid out as qemu's tls-creds-x509 and
libnbd's tls-certificates expect them: DIR/ca-cert.pem, DIR/client-cert.pem, DIR/client-key.pem.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Daemon, run_owm, start_daemon
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nbd_fixtures import MemoryExports, have, run

from owm.nbd import constants as c
from owm.nbd import protocol as p
from owm.nbd.server import NbdServer
from owm.nbd.tls import TlsSettings, server_context

MIB = 1024 * 1024
needs_tools = pytest.mark.skipif(
    not have("qemu-io", "nbdinfo", "nbdcopy"), reason="qemu-io, nbdinfo and nbdcopy are needed"
)

# ------------------------------------------------------------------------------------ the PKI


def _pem(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], name: str, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


@dataclass
class Pki:
    """Paths of the test PKI."""

    root: Path
    ca: Path  # the trusted CA certificate
    server_cert: Path
    server_key: Path

    def client_dir(self, name: str) -> Path:
        """Credentials of a client: alice, bob (trusted), mallory (untrusted CA's client),
        wrongca (alice's certificate, but trusting only the untrusted CA), anon (no client
        certificate)."""
        return self.root / name

    def serve_args(self, mode: str = "require", verify: bool = True) -> list[str]:
        args = [f"--tls={mode}", "--tls-cert", str(self.server_cert),
                "--tls-key", str(self.server_key), "--tls-ca", str(self.ca)]
        return [*args, "--tls-verify-peer"] if verify else args


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca = _ca("owm test CA")
    other = _ca("untrusted CA")
    server_key, server_cert = _leaf(ca, "localhost", server=True)
    _pem(root / "ca-cert.pem", _cert_pem(ca[1]))
    _pem(root / "server-cert.pem", _cert_pem(server_cert))
    _pem(root / "server-key.pem", _key_pem(server_key))
    clients = {
        "alice": (ca, _leaf(ca, "alice", server=False)),
        "bob": (ca, _leaf(ca, "bob", server=False)),
        "mallory": (ca, _leaf(other, "mallory", server=False)),
    }
    for name, (trusted, (key, cert)) in clients.items():
        d = root / name
        d.mkdir()
        _pem(d / "ca-cert.pem", _cert_pem(trusted[1]))
        _pem(d / "client-cert.pem", _cert_pem(cert))
        _pem(d / "client-key.pem", _key_pem(key))
    wrong = root / "wrongca"
    wrong.mkdir()
    _pem(wrong / "ca-cert.pem", _cert_pem(other[1]))
    for f in ("client-cert.pem", "client-key.pem"):
        (wrong / f).write_bytes((root / "alice" / f).read_bytes())
    anon = root / "anon"
    anon.mkdir()
    _pem(anon / "ca-cert.pem", _cert_pem(ca[1]))
    return Pki(root, root / "ca-cert.pem", root / "server-cert.pem", root / "server-key.pem")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ----------------------------------------------------------------------------- client helpers


def nbds_uri(address: str, export: str, creds: Path) -> str:
    return f"nbds://{address}/{export}?tls-certificates={creds}"


def qemu_io_tls(address: str, export: str, creds: Path, *commands: str,
                read_only: bool = False) -> list[str]:
    """A qemu-io command line reaching ``export`` over TLS with the credentials in ``creds``."""
    host, port = address.rsplit(":", 1)
    argv = ["qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
            "--image-opts"]
    if read_only:
        argv.append("-r")
    argv.append(f"driver=nbd,host={host},port={port},export={export},tls-creds=tls0")
    for command in commands:
        argv += ["-c", command]
    return argv


_OPT = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")


class PlainClient:
    """A hand-driven plain-text NBD client: greeting, client flags, then raw options."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        greeting = self._exact(18)
        assert greeting[:16] == struct.pack(">QQ", c.NBDMAGIC, c.IHAVEOPT)
        self.sock.sendall(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def option(self, option: int, data: bytes = b"") -> tuple[int, bytes]:
        """Send one option; return the type and payload of its (first) reply."""
        self.sock.sendall(_OPT.pack(c.IHAVEOPT, option, len(data)) + data)
        magic, opt, reply_type, length = _OPT_REPLY.unpack(self._exact(_OPT_REPLY.size))
        assert magic == c.OPTION_REPLY_MAGIC and opt == option
        return reply_type, self._exact(length)

    def option_replies(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; return every reply up to the final one (ACK or an error)."""
        self.sock.sendall(_OPT.pack(c.IHAVEOPT, option, len(data)) + data)
        out = []
        while True:
            magic, opt, reply_type, length = _OPT_REPLY.unpack(self._exact(_OPT_REPLY.size))
            assert magic == c.OPTION_REPLY_MAGIC and opt == option
            out.append((reply_type, self._exact(length)))
            if reply_type == c.REP_ACK or reply_type & c.REP_ERR_BIT:
                return out

    def starttls(self, creds: Path) -> None:
        """STARTTLS, then a TLS handshake with the credentials of a client directory."""
        reply_type, _ = self.option(c.OPT_STARTTLS)
        assert reply_type == c.REP_ACK, hex(reply_type)
        context = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
        if (creds / "client-cert.pem").exists():
            context.load_cert_chain(creds / "client-cert.pem", creds / "client-key.pem")
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")

    def request(self, command: int, offset: int, length: int, payload: bytes = b"") -> int:
        """One transmission request (simple replies); returns the reply's error number."""
        self.sock.sendall(
            struct.pack(">IHHQQI", c.REQUEST_MAGIC, 0, command, 7, offset, length) + payload
        )
        magic, error, handle = struct.unpack(">IIQ", self._exact(16))
        assert magic == c.SIMPLE_REPLY_MAGIC and handle == 7
        if command == c.CMD_READ and not error:
            self._exact(length)
        return int(error)

    def rest(self) -> bytes:
        """Everything the server still sends until it closes (bounded by the timeout)."""
        out = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        self.sock.close()


def _go_data(name: str) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)


# ---------------------------------------------------------------------- the machine alone


def _machine(mode: str) -> p.ServerConnection:
    m = p.ServerConnection(tls=mode)
    m.initiate()
    m.receive_data(struct.pack(">I", c.FLAG_C_FIXED_NEWSTYLE | c.FLAG_C_NO_ZEROES))
    return m


def _send_option(m: p.ServerConnection, option: int, data: bytes = b"") -> object:
    m.receive_data(_OPT.pack(c.IHAVEOPT, option, len(data)) + data)
    return m.next_event()


def test_require_refuses_every_option_but_starttls_and_abort_before_tls() -> None:
    m = _machine(p.TLS_REQUIRE)
    for option, data in [
        (c.OPT_LIST, b""),
        (c.OPT_STRUCTURED_REPLY, b""),
        (c.OPT_INFO, _go_data("vol")),
        (c.OPT_GO, _go_data("vol")),
        (c.OPT_SET_META_CONTEXT, b"\0" * 8),
        (99, b""),
    ]:
        event = _send_option(m, option, data)
        assert isinstance(event, p.OptionHandled), (option, event)
        assert event.reply_type == c.REP_ERR_TLS_REQD
    assert m.structured is False  # refused options change nothing
    event = _send_option(m, c.OPT_STARTTLS)
    assert isinstance(event, p.StartTLS)
    assert event.data == p.option_reply(c.OPT_STARTTLS, c.REP_ACK)
    assert m.next_event() is p.PAUSED
    m.tls_started()
    # Over TLS the same options get real answers, never TLS_REQD again.
    event = _send_option(m, c.OPT_STRUCTURED_REPLY)
    assert isinstance(event, p.OptionHandled) and event.reply_type == c.REP_ACK
    assert isinstance(_send_option(m, c.OPT_GO, _go_data("vol")), p.ExportInfoRequest)


def test_require_answers_an_oversize_option_with_tls_reqd_too() -> None:
    m = _machine(p.TLS_REQUIRE)
    length = c.MAX_OPTION_DATA + 1
    m.receive_data(_OPT.pack(c.IHAVEOPT, c.OPT_GO, length) + bytes(length))
    event = m.next_event()
    assert isinstance(event, p.OptionHandled) and event.reply_type == c.REP_ERR_TLS_REQD


def test_require_ends_the_session_on_export_name_before_tls() -> None:
    m = _machine(p.TLS_REQUIRE)
    m.receive_data(_OPT.pack(c.IHAVEOPT, c.OPT_EXPORT_NAME, 3) + b"vol")
    with pytest.raises(p.ProtocolError):
        m.next_event()


def test_abort_is_allowed_before_tls() -> None:
    m = _machine(p.TLS_REQUIRE)
    assert isinstance(_send_option(m, c.OPT_ABORT), p.AbortRequest)


def test_second_starttls_is_invalid_and_off_mode_refuses_by_policy() -> None:
    m = _machine(p.TLS_ON)
    assert isinstance(_send_option(m, c.OPT_STARTTLS), p.StartTLS)
    m.tls_started()
    event = _send_option(m, c.OPT_STARTTLS)
    assert isinstance(event, p.OptionHandled) and event.reply_type == c.REP_ERR_INVALID
    event = _send_option(_machine(p.TLS_OFF), c.OPT_STARTTLS)
    assert isinstance(event, p.OptionHandled) and event.reply_type == c.REP_ERR_POLICY


def test_on_mode_lets_plain_text_clients_negotiate() -> None:
    m = _machine(p.TLS_ON)
    assert isinstance(_send_option(m, c.OPT_GO, _go_data("vol")), p.ExportInfoRequest)


def test_plain_text_right_behind_starttls_is_a_protocol_error() -> None:
    m = _machine(p.TLS_REQUIRE)
    injected = _OPT.pack(c.IHAVEOPT, c.OPT_STRUCTURED_REPLY, 0)
    m.receive_data(_OPT.pack(c.IHAVEOPT, c.OPT_STARTTLS, 0) + injected)
    with pytest.raises(p.ProtocolError):
        m.next_event()


def test_what_was_negotiated_in_plain_text_is_forgotten_after_starttls() -> None:
    m = _machine(p.TLS_ON)
    _send_option(m, c.OPT_STRUCTURED_REPLY)
    assert m.structured
    assert isinstance(_send_option(m, c.OPT_STARTTLS), p.StartTLS)
    m.receive_data(b"\0")  # arrived before the upgrade: plain text, not TLS
    with pytest.raises(p.ProtocolError):
        m.tls_started()
    m2 = _machine(p.TLS_ON)
    _send_option(m2, c.OPT_STRUCTURED_REPLY)
    _send_option(m2, c.OPT_STARTTLS)
    m2.tls_started()
    assert not m2.structured and m2.tls_active


def test_bad_tls_settings_are_one_sentence(tmp_path: Path, pki: Pki) -> None:
    from owm.common.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="needs --tls-cert"):
        server_context(TlsSettings("require"))
    with pytest.raises(InvalidRequest, match="Cannot read"):
        server_context(TlsSettings("on", tmp_path / "missing.pem", pki.server_key))
    other = pki.client_dir("alice") / "client-key.pem"
    with pytest.raises(InvalidRequest, match="cannot be used together"):
        server_context(TlsSettings("on", pki.server_cert, other))
    with pytest.raises(InvalidRequest, match="needs --tls-ca"):
        server_context(TlsSettings("on", pki.server_cert, pki.server_key, verify_peer=True))


def test_cli_refuses_tls_options_that_do_not_fit(tmp_path: Path, pki: Pki) -> None:
    pool = tmp_path / "pool"
    for args, code, words in [
        (["--tls=on"], 2, "needs --tls-cert and --tls-key"),
        (["--tls=off", "--tls-cert", str(pki.server_cert)], 2, "no effect"),
        (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
          "--tls-verify-peer"], 2, "needs --tls-ca"),
        (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pki.server_key)], 1,
         "Cannot read the TLS certificate"),
    ]:
        result = run_owm("--pool", pool, "serve", "--listen", "127.0.0.1:0", *args, timeout=30)
        assert result.returncode == code, (args, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not pool.exists()  # refused before the pool was created or locked


# ------------------------------------------------------------------ a real daemon, --tls=require


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("tlsd") / "pool", *pki.serve_args("require"))
    try:
        result = d.owm("volume", "create", "vol", "--size", "8M")
        assert result.returncode == 0, result.stderr
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_text()


@needs_tools
def test_tls_clients_read_and_write(tls_daemon: Daemon, pki: Pki, tmp_path: Path) -> None:
    address = tls_daemon.nbd_tcp
    alice = pki.client_dir("alice")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(2 * MIB) + bytes(6 * MIB))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(run("nbdcopy", str(src), nbds_uri(address, "vol", alice)))
        back = tmp_path / "back.raw"
        loop.run_until_complete(run("nbdcopy", nbds_uri(address, "vol", alice), str(back)))
        assert back.read_bytes() == src.read_bytes()
        loop.run_until_complete(
            run(*qemu_io_tls(address, "vol", pki.client_dir("bob"), "write -P 0x5a 4M 64k"))
        )
        result = loop.run_until_complete(
            run(*qemu_io_tls(address, "vol", alice, "read -P 0x5a 4M 64k"), check=False)
        )
        assert result.returncode == 0 and "Pattern verification failed" not in result.stdout, (
            result.stdout + result.stderr
        )
        info = loop.run_until_complete(run("nbdinfo", "--json", nbds_uri(address, "vol", alice)))
        assert '"export-size": 8388608' in info.stdout
    finally:
        loop.close()
    assert "TLSv1." in tls_daemon.log_text() and "client cn=alice" in tls_daemon.log_text()


def test_plain_client_against_require_gets_no_data(tls_daemon: Daemon) -> None:
    address = tls_daemon.nbd_tcp
    client = PlainClient(address)
    try:
        for option, data in [
            (c.OPT_LIST, b""),
            (c.OPT_STRUCTURED_REPLY, b""),
            (c.OPT_INFO, _go_data("vol")),
            (c.OPT_GO, _go_data("vol")),
        ]:
            reply_type, _ = client.option(option, data)
            assert reply_type == c.REP_ERR_TLS_REQD, option
        # EXPORT_NAME cannot be refused politely: the server ends the session, sending nothing.
        client.sock.sendall(_OPT.pack(c.IHAVEOPT, c.OPT_EXPORT_NAME, 3) + b"vol")
        assert client.rest() == b""
    finally:
        client.close()


@needs_tools
def test_plain_nbdinfo_against_require_fails(tls_daemon: Daemon) -> None:
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(
            run("nbdinfo", f"nbd://{tls_daemon.nbd_tcp}/vol", check=False)
        )
    finally:
        loop.close()
    assert result.returncode != 0
    assert "export-size" not in result.stdout


@needs_tools
@pytest.mark.parametrize("creds", ["wrongca", "mallory", "anon"])
def test_wrong_ca_or_missing_client_certificate_is_refused(
    tls_daemon: Daemon, pki: Pki, creds: str
) -> None:
    """wrongca: the client does not trust the server's CA; mallory: the server does not trust
    the client's CA; anon: no client certificate, and --tls-verify-peer wants one."""
    loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(
            run("nbdinfo", nbds_uri(tls_daemon.nbd_tcp, "vol", pki.client_dir(creds)),
                check=False)
        )
        qemu = loop.run_until_complete(
            run(*qemu_io_tls(tls_daemon.nbd_tcp, "vol", pki.client_dir(creds), "read 0 4k"),
                check=False)
        )
    finally:
        loop.close()
    assert result.returncode != 0 and "export-size" not in result.stdout
    assert qemu.returncode != 0 or "read 4096/4096" not in qemu.stdout
    if creds != "wrongca":
        assert "TLS handshake failed" in tls_daemon.log_text()


# ---------------------------------------------- --tls=on in process (asyncio's own start_tls)


@needs_tools
async def test_tls_on_serves_plain_and_tls_clients(tmp_path: Path, pki: Pki) -> None:
    settings = TlsSettings("on", pki.server_cert, pki.server_key, pki.ca)
    server = NbdServer(MemoryExports(size=4 * MIB), tls_context=server_context(settings),
                       tls_mode="on")
    await server.start(tcp=("127.0.0.1", 0), unix_path=str(tmp_path / "nbd.sock"))
    try:
        address = f"127.0.0.1:{server.tcp_port}"
        await run(*qemu_io_tls(address, "vol", pki.client_dir("anon"), "write -P 0x11 0 64k"))
        plain = await run("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 64k",
                          f"nbd://{address}/vol")
        assert "Pattern verification failed" not in plain.stdout
        info = await run("nbdinfo", "--json", nbds_uri(address, "vol", pki.client_dir("bob")))
        assert '"export-size": 4194304' in info.stdout
        # The Unix socket never offers TLS: STARTTLS there is refused by policy.
        unix = await run("nbdinfo", f"nbds+unix:///vol?socket={tmp_path / 'nbd.sock'}"
                         f"&tls-certificates={pki.client_dir('bob')}", check=False)
        assert unix.returncode != 0
    finally:
        await server.stop(grace=5.0)
