"""bench/protocol_steps.py: the steps of each session, read back from a receive protocol log."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from protocol_steps import read_sessions, step_table

HEADER = "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context\n"


def _session(sid: str, start_ms: int, data_ms: int) -> list[str]:
    """One message's session as Exchange writes it, the message's data read in `data_ms`."""

    def at(ms: int) -> str:
        s, m = divmod(start_ms + ms, 1000)
        return f"2026-12-06T12:00:{s:02d}.{m:03d}Z"

    local, remote = "127.0.0.1:25", "127.0.0.1:40000"
    rows = [
        (0, "+", "", ""),
        (0, ">", '"220 relay ready"', ""),
        (1, "<", "HELO vm", ""),
        (1, ">", "250 relay Hello", ""),
        (2, "<", "DATA", ""),
        (2, ">", "354 Start mail input", ""),
        (2 + data_ms, "*", f"{sid};x;1", "receiving message"),
        (3 + data_ms, ">", '"250 2.6.0 <a@b> Queued mail for delivery"', ""),
        (4 + data_ms, "-", "", "Local"),
    ]
    return [
        f"{at(ms)},BENCH01\\Relay,{sid},{i},{local},{remote},{event},{data},{context}\n"
        for i, (ms, event, data, context) in enumerate(rows)
    ]


def test_steps_are_timed_per_session_and_stalls_counted(tmp_path: Path) -> None:
    lines = [HEADER]
    for n in range(6):  # one message in six waits 45 ms for the end of its data
        lines += _session(f"S{n}", n * 100, 45 if n == 3 else 3)
    (tmp_path / "RECV2026120612-1.LOG").write_text("".join(lines), encoding="utf-8")
    table = step_table(read_sessions(tmp_path))
    data = table["> 354 → * receiving message"]
    assert data["n"] == 6 and data["p50_ms"] == 3 and data["max_ms"] == 45
    assert data["stalls"] == 1
    assert table["* receiving message → > 250 queued"]["mean_ms"] == 1
    assert table["whole session"]["n"] == 6 and table["whole session"]["stalls"] == 1
    assert table["< HELO → > 250"]["stalls"] == 0
