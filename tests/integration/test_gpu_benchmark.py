"""``benchmarks/train_throughput.py --device cuda`` keeps working: its rows run at ``--gpu_scale tiny`` on whatever
device there is and the table reports each with a ratio to the example row of its model."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def test_the_gpu_rows_run_on_tiny_models_and_report_ratios(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--gpu_scale", "tiny", "--batch_size", "2",
         "--rows", "build-sd15", "plain-sd15", "ours-sd15", "full-sd3", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((out / "gpu_throughput.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["build-sd15", "plain-sd15", "ours-sd15", "full-sd3"]
    build, plain, ours, unbuilt = rows
    assert build["params"] > 0
    for row in (plain, ours):
        assert row["steps"] == 14 and 0 < row["s_per_step"] < 30 and "error" not in row
    assert unbuilt["skipped"] == "not run: its model was not built"
    table = (out / "gpu_throughput.md").read_text()
    assert "| sd15 | diffusers example loop |" in table and "| 1.00x |" in table
    assert f"{plain['s_per_step'] / ours['s_per_step']:.2f}x" in table

