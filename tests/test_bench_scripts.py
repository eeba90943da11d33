"""The GPU session's end-to-end script (benchmarks/bench_cuda.py, run by benchmarks/gpu_session.sh)
works between GPU sessions: at a tiny shape on the CPU it builds ours and transformers + PEFT from
the same weights, finds their first-step losses equal (it refuses to time them otherwise) and
reports both. Nothing here looks at a time."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = [
    "--device", "cpu", "--layers", "1", "--hidden", "64", "--intermediate", "128",
    "--heads", "4", "--kv-heads", "4", "--vocab", "256", "--batch", "1", "--seq", "16",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench_cuda():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("bench_cuda")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-under-autocast"])
def test_bench_cuda_at_a_tiny_shape_on_the_cpu_reports_both_variants_with_equal_losses(
    bench_cuda, autocast, tmp_path
):
    argv = TINY + ["--json", str(tmp_path / "out.json")] + (["--autocast"] if autocast else [])
    report = bench_cuda.main(argv)
    assert report["autocast"] is autocast
    assert report["dtype"] == ("float32" if autocast else "bfloat16")
    assert (tmp_path / "out.json").is_file()
    for labels in ("all", "chat"):
        rows = report["labels"][labels]["variants"]
        assert set(rows) == {"ours", "peft"}
        ours, peft = rows["ours"]["losses"], rows["peft"]["losses"]
        assert len(ours) == len(peft) == 2 and all(math.isfinite(x) for x in ours + peft)
        assert ours[0] == pytest.approx(peft[0], rel=3e-2), labels
