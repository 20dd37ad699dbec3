"""The bounded chaos soak: ``benches/chaos.py --profile bounded`` must pass.

The same soak as ``make chaos`` (a real ``shardgate run`` process, the fake Discord in
bot-wide mode, every fault kind, the per-event accounting), with about 30,000 events
instead of a million: about a minute on a quiet machine. Its hard deadline is generous
(300 s + 3x the stream's own length) so a busy shared machine slows it without failing
it; only an accounting check, a crash or a truly stuck run fails it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bounded_chaos_soak_accounts_for_every_event(tmp_path: Path) -> None:
    report = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benches" / "chaos.py"), "--profile", "bounded",
         "--log-dir", str(tmp_path / "logs"), "--json", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=850, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["ok"] and not doc["timed_out"]
    assert [leg["report"]["leg"] for leg in doc["legs"]] == ["workers", "reshard"]
    for leg in doc["legs"]:
        assert all(leg["checks"].values()), leg["checks"]
        accounting = leg["report"]["accounting"]
        assert accounting.get("lost", 0) == 0
        assert accounting["delivered"] > 0.8 * leg["report"]["events_requested"]
        fired = leg["report"]["faults_fired"]
        assert fired.get("worker_kill" if leg["report"]["leg"] == "workers" else "reshard")
    total = doc["total"]
    assert total["delivered"] + total.get("unfurl_filtered", 0) + total.get(
        "lost_by_discord", 0
    ) + total.get("no_session", 0) == total["generated"]
