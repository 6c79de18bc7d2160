#!/usr/bin/python3
"""Drive one libnbd connection from JSON commands on stdin; run it with Debian's /usr/bin/python3.

Debian's python3-libnbd is importable only by the system interpreter, so the tests start this
script as a subprocess and talk to it one JSON object per line: a command in, a result out.
One process holds one NBD handle for as long as the test wants (a long-lived session), and can
switch off libnbd's own checks (``"strict": false``) to send requests a careful client never
would.  Results are ``{"ok": true, ...}`` or ``{"ok": false, "errno": N, "error": "..."}``.

Commands (``op``): connect(uri, strict), info, pwrite(off, len, byte, flags), pread(off, len,
flags) -> sha256 and distinct byte values, zero(off, len, flags), trim(off, len, flags),
flush, cache(off, len), block_status(off, len, flags) -> [[length, flags], ...],
pipelined(off, count, len, byte) -> many async writes in flight at once, shutdown, quit.
"""

import hashlib
import json
import sys

import nbd


def main() -> None:
    h = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            result = {"ok": True}
            if op == "connect":
                h = nbd.NBD()
                h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
                if not cmd.get("strict", True):
                    h.set_strict_mode(0)
                h.connect_uri(cmd["uri"])
                result.update(info(h))
            elif op == "info":
                result.update(info(h))
            elif op == "pwrite":
                h.pwrite(bytes([cmd.get("byte", 0)]) * cmd["len"], cmd["off"], cmd.get("flags", 0))
            elif op == "pread":
                data = h.pread(cmd["len"], cmd["off"], cmd.get("flags", 0))
                result["sha256"] = hashlib.sha256(data).hexdigest()
                result["bytes"] = sorted(set(data))
                result["len"] = len(data)
            elif op == "zero":
                h.zero(cmd["len"], cmd["off"], cmd.get("flags", 0))
            elif op == "trim":
                h.trim(cmd["len"], cmd["off"], cmd.get("flags", 0))
            elif op == "flush":
                h.flush()
            elif op == "cache":
                h.cache(cmd["len"], cmd["off"])
            elif op == "block_status":
                runs = []

                def extent(context, offset, entries, err, runs=runs):
                    if context == nbd.CONTEXT_BASE_ALLOCATION:
                        runs.extend([entries[i], entries[i + 1]] for i in range(0, len(entries), 2))
                    return 0

                h.block_status(cmd["len"], cmd["off"], extent, cmd.get("flags", 0))
                result["extents"] = runs
            elif op == "pipelined":
                buf = nbd.Buffer.from_bytearray(bytearray([cmd["byte"]]) * cmd["len"])
                for i in range(cmd["count"]):
                    h.aio_pwrite(buf, cmd["off"] + i * cmd["len"])
                result["max_in_flight"] = h.aio_in_flight()
                while h.aio_in_flight() > 0:
                    h.poll(-1)
            elif op == "shutdown":
                h.shutdown()
                h = None
            elif op == "quit":
                print(json.dumps(result), flush=True)
                return
            else:
                result = {"ok": False, "errno": 0, "error": f"unknown op {op}"}
        except nbd.Error as e:
            result = {"ok": False, "errno": e.errno or 0, "error": e.string}
        print(json.dumps(result), flush=True)


def info(h):
    return {
        "size": h.get_size(),
        "read_only": bool(h.is_read_only()),
        "multi_conn": bool(h.can_multi_conn()),
        "structured": bool(h.get_structured_replies_negotiated()),
        "max_block": h.get_block_size(nbd.SIZE_MAXIMUM),
    }


if __name__ == "__main__":
    main()
