"""The ``owm`` command line: ``serve`` runs the daemon, every other command talks to it.

The command set is the contract in DESIGN.md ("Command line"). Commands reach the daemon of
``--pool`` (default ``$OWM_POOL``, then ``./owm-pool``) through its control socket; with no
daemon they say so and exit 2. User mistakes are one sentence on stderr and a non-zero exit
(2 for a bad command line, 1 for a request the daemon refused), never a traceback. Every
command that reports state takes ``--json`` and then prints exactly one JSON document.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

import owm
from owm.cli.common import (
    DEFAULT_POOL,
    IMAGE,
    METHODS,
    SIZE,
    Fail,
    State,
    json_option,
    pool_option,
    print_json,
    state,
)
from owm.common.errors import DaemonNotRunning, OwmError
from owm.common.sizes import format_size

if TYPE_CHECKING:
    from owm.cli.quick import QuickClient
    from owm.control.client import ControlClient

# Start-up time is most of what a quick command costs (``bench/cli_latency.py``): asyncio,
# aiohttp, rich and the backup commands are imported by the commands that use them, and
# one-request commands talk to the daemon through ``owm.cli.quick`` instead of aiohttp.

T = TypeVar("T")
JSON = dict[str, Any]

def quick(call: Callable[[QuickClient], T]) -> T:
    """Run blocking requests to the pool's daemon; map their failures to exit codes."""
    from owm.cli.quick import QuickClient

    try:
        return call(QuickClient(state().pool))
    except DaemonNotRunning as exc:
        raise Fail(str(exc), 2) from None
    except OwmError as exc:
        raise Fail(str(exc), 1) from None


def _is_group(name: str) -> bool:
    """Whether ``name`` (or the G of ``G@N``) names a group of the daemon's pool."""
    from urllib.parse import quote

    from owm.cli.quick import QuickError

    group = name.partition("@")[0]

    def ask(c: QuickClient) -> bool:
        try:
            c.request("GET", f"/v1/groups/{quote(group, safe='')}", timeout=30)
        except QuickError as exc:
            if exc.status in (400, 404):
                return False
            raise
        return True

    return bool(group) and quick(ask)


def talk(call: Callable[[ControlClient], Awaitable[T]]) -> T:
    """Run one exchange with the pool's daemon over asyncio (for commands that show progress
    while they wait); map its failures to exit codes."""
    import asyncio

    from owm.control.client import ControlClient

    pool = state().pool

    async def go() -> T:
        async with ControlClient(pool) as client:
            return await call(client)

    try:
        return asyncio.run(go())
    except DaemonNotRunning as exc:
        raise Fail(str(exc), 2) from None
    except OwmError as exc:
        raise Fail(str(exc), 1) from None


# ----------------------------------------------------------------------------------------------
# The command group


class OrderedGroup(click.Group):
    """Lists commands in the order they are defined (the story order), not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class RootGroup(OrderedGroup):
    """The top group: ``backup``, ``restore``, ``repo`` and ``group`` load only when used or
    listed."""

    LAZY = ("backup", "restore", "repo", "group")

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = [n for n in self.commands if n not in self.LAZY]
        at = names.index("demo") if "demo" in names else len(names)
        return [*names[:at], *self.LAZY, *names[at:]]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY and name not in self.commands:
            if name == "group":  # it loads rich (its tables): the backup commands need not
                from owm.cli.group import group

                self.add_command(group)
            else:
                from owm.cli.backup import backup, repo, restore

                self.add_command(backup)
                self.add_command(restore)
                self.add_command(repo)
        return super().get_command(ctx, name)


@click.group(
    cls=RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    "--pool", metavar="DIR", envvar="OWM_POOL", default=DEFAULT_POOL, show_default=True,
    help="Pool directory; defaults to $OWM_POOL, then ./owm-pool.",
)
@click.version_option(version=owm.__version__, prog_name="owm")
@click.pass_context
def cli(ctx: click.Context, pool: str) -> None:
    """owm: a one-way mirror block device served over NBD.

    Preserve a live volume without pausing it: sessions open at the preserve finish on the
    preserved image NAME@N, new sessions use the live volume, and NAME@N becomes a
    transaction-consistent image once the old sessions end.
    """
    ctx.obj = State(pool=Path(pool or DEFAULT_POOL))


# ----------------------------------------------------------------------------------------------
# serve


def parse_endpoint(text: str, what: str) -> tuple[str, int] | None:
    """'127.0.0.1:10809', '[::1]:10809', ':10809' (loopback) or 'none'."""
    if text.strip().lower() in ("none", "off", ""):
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if host.startswith("[") else host
    if not sep or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"'{text}' is not HOST:PORT", param_hint=what)
    return (host or "127.0.0.1", int(port))


@cli.command()
@pool_option
@click.option("--listen", default="127.0.0.1:10809", show_default=True, metavar="HOST:PORT",
              help="NBD over TCP ('none' for the Unix socket only; port 0 picks a free one).")
@click.option("--socket", "nbd_socket", metavar="PATH", type=click.Path(path_type=Path),
              help="NBD Unix socket [default: POOL/nbd.sock].")
@click.option("--control-listen", metavar="HOST:PORT",
              help="Also serve the control API on TCP (needs --control-token-file).")
@click.option("--control-token-file", metavar="FILE", type=click.Path(path_type=Path),
              help="File holding the bearer token the TCP control listener requires.")
@click.option("--grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds requests in flight get to finish at shutdown.")
@click.option("--etcd", metavar="URL[,URL...]",
              help="Keep the catalog in etcd at these endpoints instead of POOL/catalog.sqlite.")
@click.option("--etcd-prefix", metavar="PREFIX",
              help="The pool's keys in etcd [default: /owm/NAME/, NAME the pool directory's].")
@click.option("--tls", "tls_mode", type=click.Choice(["off", "on", "require"]),
              help="STARTTLS on the NBD TCP listener: off, on (offered) or require (no data "
                   "without it) [default: require with --tls-cert, else off].")
@click.option("--tls-cert", metavar="FILE", type=click.Path(path_type=Path),
              help="The server's x509 certificate (PEM).")
@click.option("--tls-key", metavar="FILE", type=click.Path(path_type=Path),
              help="The server's private key (PEM).")
@click.option("--tls-ca", metavar="FILE", type=click.Path(path_type=Path),
              help="CA bundle client certificates are checked against (PEM).")
@click.option("--tls-verify-peer", is_flag=True,
              help="Refuse TLS clients without a certificate signed by --tls-ca.")
@click.option("--access-file", metavar="FILE", type=click.Path(path_type=Path),
              help="Per-export access rules (TOML): which clients may open which exports.")
@click.option("--socket-group", metavar="GROUP",
              help="Make the NBD Unix socket 0660 for this group (default 0600).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Also serve /metrics (Prometheus, read-only, no token) on TCP.")
@click.option("--ready-file", metavar="PATH", type=click.Path(path_type=Path),
              help="Create PATH (holding the pid) once serving; removed when stopping.")
@click.option("--ceph-conf", metavar="FILE", type=click.Path(path_type=Path),
              help="Keep the pool's data in Ceph RADOS: the cluster's ceph.conf "
                   "(needs --rados-pool).")
@click.option("--rados-pool", metavar="NAME", help="The RADOS pool that holds the data.")
@click.option("--stripe-size", type=SIZE, metavar="SIZE",
              help="RADOS object size of a new pool's data [default: 4M].")
@click.option("--backup-repo", "backup_repos", metavar="PATH", multiple=True,
              type=click.Path(path_type=Path),
              help="Show this backup repository's backups on the dashboard and at /v1/repos "
                   "(repeatable).")
@click.option("--backup-key-file", "backup_key_files", metavar="FILE", multiple=True,
              type=click.Path(path_type=Path),
              help="Key file of an encrypted --backup-repo (repeatable; each is tried on "
                   "each; else the passphrase in $OWM_REPO_PASSWORD).")
@click.option("--daemon-id", metavar="ID",
              help="Cluster mode: serve, as daemon ID, the volumes this daemon owns among "
                   "several daemons sharing the pool (needs --etcd and the RADOS options).")
@click.option("--lease-ttl", type=click.IntRange(min=2, max=600), default=5, show_default=True,
              metavar="SECONDS",
              help="Cluster mode: seconds of this daemon's lease; another daemon takes its "
                   "volumes over once it has ended.")
@click.option("--workers", type=click.IntRange(min=1, max=256), default=1, show_default=True,
              metavar="N",
              help="Serve the volumes from N worker processes (a local pool; one core each).")
def serve(listen: str, nbd_socket: Path | None, control_listen: str | None,
          control_token_file: Path | None, grace: float, tls_mode: str | None,
          tls_cert: Path | None, tls_key: Path | None, tls_ca: Path | None,
          tls_verify_peer: bool, access_file: Path | None, socket_group: str | None,
          etcd: str | None, etcd_prefix: str | None, log_level: str,
          metrics_listen: str | None, ready_file: Path | None, ceph_conf: Path | None,
          rados_pool: str | None, stripe_size: int | None, backup_repos: tuple[Path, ...],
          backup_key_files: tuple[Path, ...], daemon_id: str | None,
          lease_ttl: int, workers: int) -> None:
    """Run the daemon (NBD and the control API) in the foreground.

    NBD is served on HOST:PORT and POOL/nbd.sock, the control API on POOL/control.sock.
    SIGTERM or Ctrl-C stops it cleanly.
    """
    from owm.daemon.serve import DaemonConfig, run
    from owm.nbd.tls import TlsSettings

    control_tcp = parse_endpoint(control_listen, "--control-listen") if control_listen else None
    if control_tcp is not None and control_token_file is None:
        raise click.UsageError("--control-listen needs --control-token-file")
    if etcd_prefix is not None and etcd is None:
        raise click.UsageError("--etcd-prefix needs --etcd")
    given = [n for n, v in (("--tls-cert", tls_cert), ("--tls-key", tls_key),
                            ("--tls-ca", tls_ca), ("--tls-verify-peer", tls_verify_peer)) if v]
    if tls_mode is None:
        tls_mode = "require" if tls_cert is not None else "off"
    if tls_mode == "off" and given:
        raise click.UsageError(f"{given[0]} has no effect with --tls=off")
    if tls_mode != "off" and (tls_cert is None or tls_key is None):
        raise click.UsageError(f"--tls={tls_mode} needs --tls-cert and --tls-key")
    if tls_verify_peer and tls_ca is None:
        raise click.UsageError("--tls-verify-peer needs --tls-ca")
    if (ceph_conf is None) != (rados_pool is None):
        raise click.UsageError("--ceph-conf and --rados-pool go together")
    if stripe_size is not None and ceph_conf is None:
        raise click.UsageError("--stripe-size needs --ceph-conf and --rados-pool")
    if daemon_id is not None:
        if etcd is None or ceph_conf is None:
            raise click.UsageError("--daemon-id needs --etcd, --ceph-conf and --rados-pool")
        if not daemon_id or "/" in daemon_id or not daemon_id.isprintable() or \
                any(c.isspace() for c in daemon_id) or len(daemon_id) > 64:
            raise click.UsageError("--daemon-id takes up to 64 printable characters, no '/' "
                                   "or blanks")
    config = DaemonConfig(
        pool=state().pool, nbd_listen=parse_endpoint(listen, "--listen"), nbd_socket=nbd_socket,
        control_listen=control_tcp, control_token_file=control_token_file, grace=grace,
        tls=TlsSettings(tls_mode, tls_cert, tls_key, tls_ca, tls_verify_peer),
        access_file=access_file, socket_group=socket_group, etcd=etcd, etcd_prefix=etcd_prefix,
        ceph_conf=ceph_conf, rados_pool=rados_pool, stripe_size=stripe_size,
        daemon_id=daemon_id, lease_ttl=lease_ttl, workers=workers,
    )
    if metrics_listen:
        config.metrics_listen = parse_endpoint(metrics_listen, "--metrics-listen")
    config.ready_file = ready_file
    if backup_key_files and not backup_repos:
        raise click.UsageError("--backup-key-file needs --backup-repo")
    if backup_repos:
        from owm.backup.listing import RepoListing

        try:
            config.backup_repos = RepoListing.open(backup_repos, backup_key_files)
        except OwmError as exc:
            raise Fail(f"the daemon did not start: {exc}", 1) from None
    if workers > 1:
        from owm.daemon.workers import run as run_workers

        run = run_workers
    try:
        run(config, log_level)
    except OwmError as exc:
        raise Fail(str(exc), 1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise Fail(f"the daemon could not start: {exc.strerror or exc}{where}", 1) from None


# ----------------------------------------------------------------------------------------------
# volume create | list | show | delete


@cli.group(cls=OrderedGroup)
def volume() -> None:
    """Create, list, show and delete volumes."""


@volume.command("create")
@pool_option
@click.argument("name")
@click.option("--size", type=SIZE, required=True, help="Volume size, e.g. 10G.")
@click.option("--method", type=click.Choice(METHODS), default="cow", show_default=True,
              help="How preserved images keep their data.")
@click.option("--chunk-size", type=SIZE, default="64K", show_default=True,
              help="Chunk size, a power of two from 4K to 1M.")
@click.option("--legs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Mirror legs (mirror method only).")
@click.option("--enospc-policy", type=click.Choice(["fail-write", "break-image"]),
              default="fail-write", show_default=True,
              help="On a full disk: fail the write, or break the preserved image.")
@json_option
def volume_create(name: str, size: int, method: str, chunk_size: int, legs: int,
                  enospc_policy: str, as_json: bool) -> None:
    """Create volume NAME."""

    def call(c: QuickClient) -> tuple[JSON, JSON]:
        created = c.create_volume(name, size, method=method, chunk_size=chunk_size,
                                  legs=legs, enospc_policy=enospc_policy)
        return created, c.health()

    created, health = quick(call)
    if as_json:
        print_json(created)
        return
    tcp = (health.get("nbd") or {}).get("tcp")
    where = f"; serve it as nbd://{tcp}/{name}" if tcp else ""
    state().out.print(
        f"Created volume {name}: {format_size(size)}, {method}, "
        f"{format_size(chunk_size)} chunks{where}", markup=False,
    )


@volume.command("list")
@pool_option
@json_option
def volume_list(as_json: bool) -> None:
    """List the volumes of the pool."""
    volumes = quick(lambda c: c.volumes())
    if as_json:
        print_json(volumes)
    elif not volumes:
        state().out.print(f"No volumes in pool {state().pool.absolute()}; create one with: "
                          "owm volume create NAME --size 1G", markup=False)
    else:
        from owm.cli.output import volumes_table

        state().out.print(volumes_table(volumes))


@volume.command("show")
@pool_option
@click.argument("name")
@json_option
def volume_show(name: str, as_json: bool) -> None:
    """Show volume NAME: its settings, sessions and preserved images."""
    found = quick(lambda c: c.volume(name))
    if as_json:
        print_json(found)
    else:
        from owm.cli.output import volume_detail

        state().out.print(volume_detail(found))


@volume.command("delete")
@pool_option
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Delete it even though it still has preserved images (they are lost).")
@json_option
def volume_delete(name: str, force: bool, as_json: bool) -> None:
    """Delete volume NAME.

    Refused while sessions or readers are open, and while preserved images exist (they may
    never have been backed up) unless --force.
    """
    result = quick(lambda c: c.delete_volume(name, force=force))
    if as_json:
        print_json(result)
    else:
        state().out.print(f"Deleted volume {name}.", markup=False)


@volume.command("move")
@pool_option
@click.argument("name")
@click.option("--to", "to", required=True, metavar="DAEMON-ID",
              help="The daemon of the cluster that is to serve the volume.")
@click.option("--force", is_flag=True,
              help="Move it even while a preserved image drains: the sessions holding it end "
                   "unclean (it becomes drained-unclean).")
@json_option
def volume_move(name: str, to: str, force: bool, as_json: bool) -> None:
    """Hand volume NAME over to daemon DAEMON-ID of the cluster (a planned move).

    The owner closes the volume (its sessions end; everything is flushed), marks it cleanly
    closed and lets it go; the target takes it. Refused while an image of it drains, unless
    --force. Clients reconnect to the volume's new owner.
    """
    endpoints, prefix = _cluster_catalog()
    from owm.daemon.serve import cluster_move

    try:
        result = cluster_move(endpoints, prefix, name, to, force)
    except OwmError as exc:
        raise Fail(str(exc), 1) from None
    if as_json:
        print_json(result)
    elif result["moved"]:
        state().out.print(f"Volume {name} moved from daemon {result['from']} to {to}.",
                          markup=False)
    else:
        state().out.print(f"Volume {name} is served by daemon {to} already.", markup=False)


def _cluster_catalog() -> tuple[list[str], str]:
    """The etcd endpoints and prefix of the cluster the pool's daemon belongs to."""
    health = quick(lambda c: c.health())
    catalog = health.get("catalog") or {}
    if not health.get("cluster") or catalog.get("kind") != "etcd":
        raise Fail(f"the daemon of pool {state().pool} is not part of a cluster (serve it with "
                   "--daemon-id)", 1)
    return list(catalog.get("endpoints") or []), str(catalog.get("prefix"))


@cli.group("cluster", cls=OrderedGroup)
def cluster_group() -> None:
    """The cluster of daemons sharing this pool (owm serve --daemon-id)."""


@cluster_group.command("status")
@pool_option
@json_option
def cluster_status(as_json: bool) -> None:
    """Show the cluster's daemons, their addresses and leases, and the volumes each owns."""
    endpoints, prefix = _cluster_catalog()
    from owm.daemon.serve import cluster_status as read_status

    try:
        result = read_status(endpoints, prefix)
    except OwmError as exc:
        raise Fail(str(exc), 1) from None
    if as_json:
        print_json(result)
        return
    out = state().out
    out.print(f"Cluster {prefix} in etcd: {len(result['daemons'])} daemon(s).", markup=False)
    for d in result["daemons"]:
        left = d["lease_left"]
        lease = f"lease {left} of {d['lease_ttl']} s left" if left >= 0 else "lease ended"
        age = f", up {d['age_seconds']:.0f} s" if d.get("age_seconds") is not None else ""
        vols = ", ".join(d["volumes"]) or "no volumes"
        out.print(f"  {d['id']}: NBD {d['nbd']}, control {d['control'] or '-'}, pid "
                  f"{d['pid']} on {d['host']}{age}, {lease}; owns {vols}", markup=False)
    if result["unowned"]:
        out.print(f"  not served right now: {', '.join(result['unowned'])}", markup=False)


# ----------------------------------------------------------------------------------------------
# preserve, status, wait, cutover, release


@cli.command()
@pool_option
@click.argument("name")
@click.option("--instant", is_flag=True,
              help="Cut over at once: a classic crash-consistent snapshot.")
@json_option
def preserve(name: str, instant: bool, as_json: bool) -> None:
    """Preserve volume NAME without a pause; prints NAME@N.

    Sessions open now finish on NAME@N (their writes also reach the live volume); sessions
    opened from now on use the live volume only.
    """
    if _is_group(name):
        from owm.cli import group as groups

        groups.preserve_set(name, instant, as_json)
        return
    result = quick(lambda c: c.preserve(name, instant=instant))
    if as_json:
        print_json(result)
        return
    image = str(result["image"])
    click.echo(image)
    if sys.stderr.isatty():
        from owm.cli.output import plural

        err = state().err
        left = int((result.get("status") or {}).get("sessions_left") or 0)
        if left:
            verb = "holds" if left == 1 else "hold"
            err.print(f"{image} is draining: {plural(left, 'session')} still {verb} it; "
                      f"'owm wait {image}' returns once it is drained.", markup=False, style="dim")
        else:
            err.print(f"{image} is drained already (no session was open).", markup=False,
                      style="dim")


@cli.command()
@pool_option
@click.argument("name", required=False)
@json_option
def status(name: str | None, as_json: bool) -> None:
    """Show sessions per generation and preserved images.

    For every volume, or just NAME.
    """

    if name and _is_group(name):
        from owm.cli import group as groups

        groups.status_group(name, as_json)
        return

    def call(c: Any) -> tuple[list[JSON], JSON]:
        volumes = [c.volume(name)] if name else c.volumes()
        return volumes, c.health()

    volumes, health = quick(call)
    catalog = health.get("catalog") or {}
    where = health.get("storage") or {}
    if as_json:
        # Where the catalog lives, on every entry: the answer stays a list of volumes (each
        # volume of a pool on RADOS says so in its "storage").
        print_json([{**v, "catalog": catalog} for v in volumes] if catalog else volumes)
        return
    if catalog.get("kind") == "etcd":
        state().out.print(f"Catalog in etcd at {','.join(catalog.get('endpoints') or [])}, "
                          f"prefix {catalog.get('prefix')}.", markup=False)
    if where.get("kind") == "rados":
        state().out.print(
            f"Data in RADOS pool '{where.get('rados_pool')}' (namespace {where.get('namespace')}, "
            f"{format_size(int(where.get('stripe_size') or 0))} objects, Ceph configuration "
            f"{where.get('ceph_conf')}).", markup=False)
    if not volumes:
        state().out.print(f"No volumes in pool {state().pool.absolute()}.", markup=False)
    else:
        from owm.cli.output import status_view

        state().out.print(status_view(volumes))


@cli.command()
@pool_option
@click.argument("image", type=IMAGE)
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Give up after this long (exit 1). Default: wait as long as it takes.")
@json_option
def wait(image: str, timeout: float | None, as_json: bool) -> None:
    """Wait until IMAGE is drained (exit 0), or time out (exit 1).

    On a timeout it names the sessions still holding the image.
    """
    if _is_group(image):
        from owm.cli import group as groups

        groups.wait_set(image, timeout, as_json)
        return
    if not sys.stderr.isatty() or as_json:
        result = quick(lambda c: c.wait(image, timeout))
        return _waited(image, timeout, as_json, result)
    from owm.cli.output import plural

    err = state().err

    async def call(c: ControlClient) -> JSON:
        import asyncio

        waiter = asyncio.ensure_future(c.wait(image, timeout))
        with err.status(f"waiting for {image} to drain") as spinner:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=0.5)
                if waiter.done():
                    break
                try:
                    info = await c.image(image)
                except OwmError:
                    continue
                left = int(info.get("sessions_left") or 0)
                spinner.update(f"waiting for {image} to drain: {plural(left, 'session')} left")
        return await waiter

    _waited(image, timeout, as_json, talk(call))


def _waited(image: str, timeout: float | None, as_json: bool, result: JSON) -> None:
    from owm.cli.output import holding_lines, plural

    drained = bool(result.get("drained"))
    if as_json:
        print_json(result)
    elif drained:
        consistency = (result.get("status") or {}).get("consistency", "")
        state().out.print(f"{image} is drained{f' ({consistency})' if consistency else ''}.",
                          markup=False)
    if not drained:
        if not as_json:
            holding = result.get("holding") or []
            lines = [f"{image} is still draining after {timeout:g}s; "
                     f"{plural(len(holding), 'session')} still hold it:"]
            lines += holding_lines(holding) or ["  (none listed)"]
            click.echo("\n".join(lines), err=True)
        raise Fail("", 1)


@cli.command()
@pool_option
@click.argument("image", type=IMAGE)
@json_option
def cutover(image: str, as_json: bool) -> None:
    """Stop waiting for IMAGE: rebind its sessions to the live volume.

    IMAGE stops changing at once and is then only crash-consistent.
    """
    if _is_group(image):
        from owm.cli import group as groups

        groups.cutover_set(image, as_json)
        return
    result = quick(lambda c: c.cutover(image))
    if as_json:
        print_json(result)
        return
    if result.get("cut_over") is False:
        state().out.print(f"{result.get('message') or image + ' was not cut over'}.",
                          markup=False)
        return
    from owm.cli.output import plural

    rebound = result.get("rebound") or []
    state().out.print(
        f"Cut over {image}: {plural(len(rebound), 'session')} moved to the live volume; "
        f"{image} no longer changes and is crash-consistent.", markup=False,
    )


@cli.command()
@pool_option
@click.argument("image", type=IMAGE)
@json_option
def release(image: str, as_json: bool) -> None:
    """Discard the drained IMAGE and reclaim its storage."""
    if _is_group(image):
        from owm.cli import group as groups

        groups.release_set(image, as_json)
        return
    if not sys.stderr.isatty() or as_json:
        return _released(image, as_json, quick(lambda c: c.release(image)))
    err = state().err

    async def call(c: ControlClient) -> JSON:
        import asyncio

        from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

        releaser = asyncio.ensure_future(c.release(image))
        with Progress("[progress.description]{task.description}", BarColumn(),
                      TaskProgressColumn(), TimeRemainingColumn(), console=err,
                      transient=True) as bar:
            task = bar.add_task(f"releasing {image}", total=None)
            while not releaser.done():
                await asyncio.wait({releaser}, timeout=0.2)
                if releaser.done():
                    break
                try:
                    progress = (await c.image(image)).get("release_progress") or {}
                except OwmError:
                    continue
                if progress.get("total"):
                    bar.update(task, completed=progress.get("done", 0), total=progress["total"])
        return await releaser

    _released(image, as_json, talk(call))


def _released(image: str, as_json: bool, result: JSON) -> None:
    if as_json:
        print_json(result)
    else:
        freed = int(result.get("bytes_freed") or 0)
        state().out.print(f"Released {image} ({format_size(freed)} freed).", markup=False)


# ----------------------------------------------------------------------------------------------
# Backups: `owm backup NAME@N --to PATH ...`, `owm backup list|verify|delete` and
# `owm restore REPO ID --to PATH|NAME` live in owm/cli/backup.py (loaded by RootGroup).


# ----------------------------------------------------------------------------------------------
# demo


@cli.command()
@click.option("--writers", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Worker sessions before the preserve (their running transfers finish on "
                   "the preserved image).")
@click.option("--new-writers", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Worker sessions opened at the preserve (they use the live volume).")
@click.option("--ceph", "on_ceph", is_flag=True,
              help="Run it on a throw-away Ceph cluster (data in RADOS) and etcd (the catalog), "
                   "started and removed by the demo.")
@json_option
def demo(writers: int, new_writers: int, on_ceph: bool, as_json: bool) -> None:
    """Run the end-to-end story on a throw-away pool.

    A bank workload runs transfers on worker sessions; the volume is preserved mid-work; the
    running transfers finish on the preserved image while new ones start at once on new
    sessions; the drained image is backed up, the checker finds it consistent, the live
    volume is checked against the ledger, and the image is released.
    """
    from owm.cli.demo import run_demo

    try:
        summary = run_demo(old_sessions=writers, new_sessions=new_writers, quiet=as_json,
                           on_ceph=on_ceph)
    except OwmError as exc:
        raise Fail(f"the demo failed: {exc}", 1) from None
    if as_json:
        print_json(summary)


# ----------------------------------------------------------------------------------------------
# Entry point


def _sentence(message: str) -> str:
    from owm.cli.output import sentence  # rich comes with it: only once something failed

    return sentence(message)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``owm`` console script: run the command, turn every failure into a sentence."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = 0
    try:
        result = cli.main(args=args, prog_name="owm", standalone_mode=False)
        if isinstance(result, int):
            code = result
    except Fail as exc:
        if exc.message:
            click.echo(_sentence(exc.message), err=True)
        code = exc.code
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "owm"
        click.echo(f"{_sentence(exc.format_message())} See '{where} --help'.", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        click.echo(_sentence(exc.format_message()), err=True)
        code = exc.exit_code
    except OwmError as exc:
        click.echo(_sentence(str(exc)), err=True)
        code = 1
    except (click.Abort, KeyboardInterrupt):
        click.echo("Interrupted.", err=True)
        code = 130
    except BrokenPipeError:
        # The reader went away (e.g. `owm status | head`): say nothing more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
