"""benchmarks/throughput.py runs in one command on a CPU (--quick) and writes its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "throughput.py"


def test_quick_throughput_run_writes_every_row(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "tp"
    report = module.main([
        "--quick", "--device", "cpu", "--families", "deop", "clip", "--batches", "1", "2",
        "--iters", "1", "--max-seconds", "0.1", "--classes", "5", "--out", str(out),
    ])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert rows == report["rows"]
    keys = {(r["family"], r["mode"], r["batch"]) for r in rows}
    assert keys == {(f, m, b) for f in ("deop", "clip") for m in ("fp32", "fast", "segment") for b in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["ms_per_call"] > 0 for r in rows)
    assert all(abs(r["images_per_s"] - r["batch"] * 1e3 / r["ms_per_call"]) < 1e-6 * r["images_per_s"] for r in rows)
    table = out.with_suffix(".md").read_text()
    assert table.count("\n| deop | deop-tiny |") == 6 and "| clip | clip-tiny | fast | 2 |" in table
    assert "deop-tiny" in capsys.readouterr().out
