"""benchmarks/soak.py, short: ~25 s of steady greedy load on two groups of the tiny seeded
Llama, one group killed along the way -- nothing fails, every output equals the offline
engine's, no KV block is leaked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_short_soak_with_one_kill(tiny_model_dir, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import soak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    argv = ["--duration-s", "25", "--kill-every-s", "15", "--clients", "3", "--max-tokens", "24"]
    argv += ["--model", tiny_model_dir("llama"), "--dtype", "float32", "--out", str(tmp_path)]
    rc = soak.main(argv)
    print(capsys.readouterr().out)  # the report, for -s runs and failures
    report = json.loads((tmp_path / "report.json").read_text())
    assert rc == 0, report
    assert report["kills"] == 1
    assert report["failed"] == 0 and report["mismatched"] == 0 and report["leaked_blocks"] == 0
    assert report["completed"] == report["sent"] > 0
    assert len(report["blocks"]) == 2 and report["unbalanced_groups"] == []
    assert (tmp_path / "rss.csv").read_text().startswith("t_s,pid,process,rss_mib\n")
