"""Writes the fuzz seeds (fuzz/seeds/): real-shaped gateway messages in each input case.

    .venv/bin/python fuzz/make_seeds.py

Small seeds on purpose: AFL mutates faster the shorter they are (one MESSAGE_CREATE is
1-2 KB; the seeds keep a few short messages of each kind the scanner tells apart).
"""

from __future__ import annotations

import pathlib

from shardgate._native import StreamCompressor
from shardgate.testing import payloads

OUT = pathlib.Path(__file__).parent / "seeds"


def frames(data: bytes, size: int, fin_last: bool = True) -> bytes:
    """The raw-frames layout: a length byte (fin in bit 0) before each piece."""
    out = bytearray()
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    for i, piece in enumerate(pieces):
        fin = fin_last and i == len(pieces) - 1
        out.append(len(piece) << 1 | int(fin))
        out += piece
    return bytes(out)


def main() -> None:
    OUT.mkdir(exist_ok=True)
    messages = [
        payloads.envelope(None, None, 10, {"heartbeat_interval": 41250}),
        payloads.envelope(None, None, 11, None),
        payloads.envelope(None, None, 9, True),
        payloads.dispatch("READY", 1, {"session_id": "abc", "resume_gateway_url": "wss://x",
                                       "guilds": [{"id": "1", "unavailable": True}]}),
        payloads.dispatch("GUILD_CREATE", 2, {"id": "41771983423143937", "name": "g"}),
        payloads.dispatch("GUILD_DELETE", 3, {"id": "41771983423143937", "unavailable": True}),
        payloads.dispatch("MESSAGE_CREATE", 4, {"id": "5", "content": "hi \"x\" \\u00e9",
                                                "edited_timestamp": None}),
        payloads.dispatch("MESSAGE_UPDATE", 5, {"id": "5", "content": "hi \"x\" \\u00e9",
                                                "edited_timestamp": None}),
        payloads.dispatch("MESSAGE_DELETE", 6, {"id": "5"}),
        b'{ "op" : 0 , "d" : {"a":[1,{"b":"\\u0041"}]}, "t":"TYPING_\\u0053TART", "s":7}',
    ]
    count = 0
    for i, m in enumerate(messages):
        # case 0: plain frames, one message, in 40-byte frames
        (OUT / f"plain-{i}").write_bytes(bytes([0]) + frames(m, 40))
        count += 1
    for case, name in ((1, "zlib-stream"), (2, "zstd-stream")):
        comp = StreamCompressor(name)
        wire = b"".join(comp.compress(m) for m in messages[:4])
        (OUT / f"raw-{name}").write_bytes(bytes([case]) + frames(wire, 50))
        count += 1
    # round trip: messages separated by 0xFF, the last segment the cuts
    for case in (3, 7, 11, 15):
        data = b"\xff".join(messages[3:8]) + b"\xff" + bytes([7, 31, 2, 90])
        (OUT / f"roundtrip-{case}").write_bytes(bytes([case]) + data)
        count += 1
    print(f"{count} seeds in {OUT}")


if __name__ == "__main__":
    main()
