"""How the CLI shows daemon answers to a person: rich tables, plain sentences, sizes.

Every function takes the JSON the control API returned and gives back something rich can
print; ``--json`` output bypasses this module entirely.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from owm.common.sizes import format_size

JSON = dict[str, Any]


def sentence(message: str) -> str:
    """'no such volume' -> 'No such volume.' (messages from errors are bare clauses)."""
    message = message.strip()
    if not message:
        return message
    message = message[0].upper() + message[1:]
    return message if message[-1] in ".!?" else message + "."


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def ago(stamp: str | None, now: datetime | None = None) -> str:
    """'2026-11-22T02:40:00Z' -> '02:40:00 (3m ago)' (UTC); older than a day: the date.

    Anything unparsable is shown as is.
    """
    if not stamp:
        return "-"
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    if seconds < 0:
        age = "just now"
    elif seconds < 60:
        age = f"{seconds}s ago"
    elif seconds < 3600:
        age = f"{seconds // 60}m ago"
    elif seconds < 86400:
        age = f"{seconds // 3600}h ago"
    else:
        age = f"{seconds // 86400}d ago"
    if seconds < 86400:
        return f"{when.astimezone(UTC):%H:%M:%S} ({age})"
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M}"


def sessions_of(volume: JSON) -> list[JSON]:
    return [
        {**s, "generation": g.get("generation")}
        for g in volume.get("generations", [])
        for s in g.get("sessions", [])
    ]


def image_state(image: JSON) -> Text:
    """A colored one-cell description of where an image is in its life."""
    state = str(image.get("state", "?"))
    if state == "draining":
        left = int(image.get("sessions_left") or 0)
        return Text(f"draining, {plural(left, 'session')} left", style="yellow", no_wrap=True)
    if state == "drained":
        return Text("drained", style="green")
    if state == "drained-unclean":
        unclean = int(image.get("unclean_sessions") or 0)
        return Text(f"drained-unclean ({unclean} ended without disconnect)", style="dark_orange")
    if state == "broken":
        return Text(f"broken: {image.get('broken_reason') or 'unknown reason'}", style="red")
    if state == "damaged":
        reason = image.get("broken_reason") or "a chunk table is corrupt"
        return Text(f"damaged, reads refused: {reason}", style="bold red")
    if state == "releasing":
        progress = image.get("release_progress") or {}
        total = int(progress.get("total") or 0)
        if total:
            return Text(f"releasing {100 * int(progress.get('done') or 0) // total}%", "cyan")
        return Text("releasing", style="cyan")
    return Text(state)


def resync_percent(volume: JSON) -> int | None:
    """How far a mirror's background resync after an unclean stop is (None: not running)."""
    progress = volume.get("resync_progress") or {}
    total = int(progress.get("total") or 0)
    return 100 * int(progress.get("done") or 0) // total if total else None


def legs_cell(volume: JSON) -> Text:
    percent = resync_percent(volume)
    if percent is None:
        return Text(str(volume.get("legs")))
    return Text(f"{volume.get('legs')} (resyncing {percent}%)", style="cyan")


def volumes_table(volumes: list[JSON]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (("NAME", "left"), ("SIZE", "right"), ("METHOD", "left"),
                            ("CHUNK", "right"), ("LEGS", "right"), ("LIVE GEN", "right"),
                            ("SESSIONS", "right"), ("IMAGES", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for v in volumes:
        images = v.get("images", [])
        states: dict[str, int] = {}
        for image in images:
            states[str(image.get("state"))] = states.get(str(image.get("state")), 0) + 1
        table.add_row(
            Text(str(v.get("name"))), format_size(int(v.get("size", 0))), str(v.get("method")),
            format_size(int(v.get("chunk_size", 0))), legs_cell(v),
            str(v.get("live_generation")), str(len(sessions_of(v))),
            ", ".join(f"{n} {s}" for s, n in states.items()) or "-",
        )
    return table


def sessions_table(sessions: list[JSON], title: str = "Sessions") -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (("GEN", "right"), ("ID", "right"), ("PEER", "left"),
                            ("CONNECTED (UTC)", "left"), ("READ", "right"),
                            ("WRITTEN", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for s in sessions:
        table.add_row(
            str(s.get("generation")), str(s.get("id")), Text(str(s.get("peer", "-"))),
            ago(s.get("connected_since")), format_size(int(s.get("bytes_read") or 0)),
            format_size(int(s.get("bytes_written") or 0)),
        )
    return table


def images_table(images: list[JSON]) -> Table:
    table = Table(title="Preserved images", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for column, justify in (("IMAGE", "left"), ("STATE", "left"), ("CONSISTENCY", "left"),
                            ("PRESERVED (UTC)", "left"), ("DRAINED (UTC)", "left"),
                            ("ON DISK", "right"), ("READERS", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for image in images:
        table.add_row(
            Text(str(image.get("name"))), image_state(image),
            str(image.get("consistency", "-")).replace("-consistent", ""),
            ago(image.get("preserved_at")), ago(image.get("drained_at")),
            format_size(int(image.get("bytes_on_disk") or 0)), str(image.get("readers", 0)),
        )
    return table


def volume_detail(v: JSON) -> RenderableType:
    """One volume as ``owm status`` / ``owm volume show`` print it."""
    size = format_size(int(v.get("size", 0)))
    chunk = format_size(int(v.get("chunk_size", 0)))
    legs = plural(int(v.get("legs", 0)), "leg")
    head = Text.assemble(
        (str(v.get("name")), "bold"),
        f"  {size}, {v.get('method')}, {chunk} chunks, {legs}, "
        f"on full disk: {v.get('enospc_policy', '-')}, live generation {v.get('live_generation')}",
    )
    parts: list[RenderableType] = [head]
    percent = resync_percent(v)
    if percent is not None:
        parts.append(Text(f"  resyncing its in-sync legs after an unclean stop: {percent}%",
                          style="cyan"))
    restore = v.get("restore")
    if isinstance(restore, dict) and restore.get("live"):
        done, total = int(restore.get("filled") or 0), int(restore.get("chunks") or 0)
        source = ("filling from its source" if restore.get("source") == "attached" else
                  "waiting for its source: run that restore again")
        parts.append(Text(f"  LIVE RESTORE from {restore.get('from')}: usable, "
                          f"{done * 100 // max(1, total)}% filled ({done} of {total} chunks), "
                          f"{source}", style="cyan"))
    elif isinstance(restore, dict):
        parts.append(Text(f"  RESTORE INCOMPLETE from {restore.get('from')} (since "
                          f"{restore.get('since')}): not a copy of the backup until that "
                          "restore is run again to its end", style="bold red"))
    if v.get("damaged"):
        parts.append(Text(f"  DAMAGED, reads and writes refused: {v['damaged']}",
                          style="bold red"))
    for warning in v.get("warnings") or []:
        parts.append(Text(f"  warning: {warning}", style="yellow"))
    sessions = sessions_of(v)
    if sessions:
        parts.append(sessions_table(sessions))
    else:
        parts.append(Text("  no open sessions", style="dim"))
    images = v.get("images", [])
    if images:
        parts.append(images_table(images))
    else:
        parts.append(Text("  no preserved images", style="dim"))
    return Group(*parts)


def status_view(volumes: list[JSON]) -> RenderableType:
    return Group(*(Group(volume_detail(v), Text("")) for v in volumes))


def holding_lines(holding: list[JSON]) -> list[str]:
    """One line per session still keeping an image from draining."""
    return [
        f"  session {s.get('id')} from {s.get('peer', '?')} (generation {s.get('generation')}, "
        f"connected since {ago(s.get('connected_since'))}, "
        f"{format_size(int(s.get('bytes_written') or 0))} written)"
        for s in holding
    ]
