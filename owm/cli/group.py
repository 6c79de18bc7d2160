"""``owm group create|list|show|delete`` and the set forms of preserve, status, wait, cutover and
release: ``owm preserve G`` cuts every member of group G at one instant and prints ``G@N`` (then
each member's image, one a line); ``owm wait|cutover|release G@N`` and ``owm status G`` act on
the set as a whole.  ``main`` asks the daemon whether a name is a group (``_is_group``, with
the quick client) before treating it as a volume's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click

from owm.cli.backup import with_daemon
from owm.cli.common import Fail, json_option, pool_option, print_json, state
from owm.cli.output import plural
from owm.common.sizes import format_size

JSON = dict[str, Any]


def _q(name: str) -> str:
    return quote(name, safe="@")


def _member_line(m: JSON) -> str:
    left = int(m.get("sessions_left") or 0)
    held = f", {plural(left, 'session')} left" if m.get("state") == "draining" else ""
    return f"  {m.get('name')}: {m.get('state')}{held}, {m.get('consistency')}"


def _set_lines(s: JSON) -> list[str]:
    lines = [f"{s.get('name')}: {s.get('state')}, {s.get('consistency')} "
             f"(preserved {s.get('preserved_at')})"]
    lines += [_member_line(m) for m in s.get("members", [])]
    return lines


def _group_lines(g: JSON) -> list[str]:
    sets = g.get("sets", [])
    lines = [f"Group {g.get('name')}: {', '.join(g.get('members', []))}; "
             f"{plural(len(sets), 'preserved set')}"]
    for s in sets:
        lines += ["  " + line for line in _set_lines(s)]
    return lines


# -- owm group ... --------------------------------------------------------------------------------


@click.group("group")
def group() -> None:
    """Create, list, show and delete consistency groups (volumes preserved as one set)."""


@group.command("create")
@pool_option
@click.argument("name")
@click.argument("volumes", nargs=-1, required=True)
@json_option
def group_create(name: str, volumes: tuple[str, ...], as_json: bool) -> None:
    """Create group NAME of VOLUMES (a volume is in at most one group)."""
    result: JSON = with_daemon(lambda c: c.request(
        "POST", "/v1/groups", {"name": name, "members": list(volumes)}, timeout=60))
    if as_json:
        print_json(result)
    else:
        state().out.print(f"Created group {name} of {', '.join(volumes)}; preserve it with "
                          f"'owm preserve {name}'.", markup=False)


@group.command("list")
@pool_option
@json_option
def group_list(as_json: bool) -> None:
    """List the groups of the pool and their preserved sets."""
    groups: list[JSON] = with_daemon(lambda c: c.request("GET", "/v1/groups", timeout=30))
    if as_json:
        print_json(groups)
    elif not groups:
        state().out.print("No groups; create one with: owm group create NAME VOL...",
                          markup=False)
    else:
        state().out.print("\n".join(line for g in groups for line in _group_lines(g)),
                          markup=False)


@group.command("show")
@pool_option
@click.argument("name")
@json_option
def group_show(name: str, as_json: bool) -> None:
    """Show group NAME: its members and preserved sets."""
    found: JSON = with_daemon(lambda c: c.request("GET", f"/v1/groups/{_q(name)}", timeout=30))
    if as_json:
        print_json(found)
    else:
        state().out.print("\n".join(_group_lines(found)), markup=False)


@group.command("delete")
@pool_option
@click.argument("name")
@json_option
def group_delete(name: str, as_json: bool) -> None:
    """Delete group NAME (refused while it has preserved sets); its volumes stay."""
    result: JSON = with_daemon(lambda c: c.request("DELETE", f"/v1/groups/{_q(name)}",
                                                   timeout=60))
    if as_json:
        print_json(result)
    else:
        state().out.print(f"Deleted group {name}.", markup=False)


# -- the set forms of the top-level commands -----------------------------------------------------


def preserve_set(name: str, instant: bool, as_json: bool) -> None:
    result: JSON = with_daemon(lambda c: c.request(
        "POST", f"/v1/groups/{_q(name)}/preserve", {"instant": instant}, timeout=120))
    if as_json:
        print_json(result)
        return
    click.echo(str(result["name"]))
    for member in result.get("members", []):
        click.echo(str(member.get("name")))
    err = state().err
    if err.is_terminal:
        left = int(result.get("sessions_left") or 0)
        held = f": {plural(left, 'session')} still hold it" if left else ""
        err.print(f"{result['name']} is {result.get('state')}{held}.", markup=False,
                  style="dim")


def status_group(name: str, as_json: bool) -> None:
    found: JSON = with_daemon(lambda c: c.request("GET", f"/v1/groups/{_q(name)}", timeout=30))
    if as_json:
        print_json(found)
    else:
        state().out.print("\n".join(_group_lines(found)), markup=False)


def wait_set(image: str, timeout: float | None, as_json: bool) -> None:
    result: JSON = with_daemon(lambda c: c.request(
        "POST", f"/v1/sets/{_q(image)}/wait", {"timeout": timeout},
        timeout=None if timeout is None else timeout + 30))
    drained = bool(result.get("drained"))
    status = result.get("status") or {}
    if as_json:
        print_json(result)
    elif drained:
        state().out.print(f"{image} is drained ({status.get('consistency')}).", markup=False)
    if not drained:
        if not as_json:
            lines = [f"{image} is still draining after {timeout:g}s:"]
            lines += [_member_line(m) for m in status.get("members", [])
                      if m.get("state") == "draining"]
            click.echo("\n".join(lines), err=True)
        raise Fail("", 1)


def cutover_set(image: str, as_json: bool) -> None:
    result: JSON = with_daemon(lambda c: c.request("POST", f"/v1/sets/{_q(image)}/cutover",
                                                   timeout=120))
    if as_json:
        print_json(result)
        return
    status = result.get("status") or {}
    if not result.get("cut_over"):
        state().out.print(f"{image} is already {status.get('state')} "
                          f"({status.get('consistency')}); nothing was cut over.", markup=False)
        return
    state().out.print(f"Cut over {image}: no member image changes any more; the set is "
                      f"{status.get('consistency')}.", markup=False)


def release_set(image: str, as_json: bool) -> None:
    result: JSON = with_daemon(lambda c: c.request("POST", f"/v1/sets/{_q(image)}/release",
                                                   timeout=None))
    if as_json:
        print_json(result)
        return
    members = ", ".join(result.get("members", []))
    freed = format_size(int(result.get("bytes_freed") or 0))
    state().out.print(f"Released {image} ({members}; {freed} freed).", markup=False)
