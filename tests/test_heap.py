"""The C heap's settings (lora._heap): freed pages reused, and where the Phi-3 model asks for it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import TINY_PHI3

import lora._heap as heap
from lora.models import phi3

glibc = pytest.mark.skipif(
    heap._mallopt() is None or heap._malloc_trim() is None, reason="needs glibc's mallopt"
)


def test_reuse_sets_both_thresholds_once_and_says_whether_it_took(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_reusing", False)
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda p, v: calls.append((p, v)) or 1)
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append("trim") or True)
    assert heap.reuse_freed_pages() is True
    # mmap threshold 1 GiB, trim threshold the largest C int (free() never trims the top)
    assert calls == [(-3, 1 << 30), (-1, (1 << 31) - 1), "trim"]
    assert heap.reuse_freed_pages() is True and len(calls) == 3  # once per process
    assert heap.reusing_freed_pages()


@pytest.mark.parametrize("refused", ["none", "mallopt fails"])
def test_reuse_reports_false_where_the_c_library_cannot(monkeypatch, refused):
    monkeypatch.setattr(heap, "_reusing", False)
    monkeypatch.setattr(
        heap, "_mallopt", (lambda: None) if refused == "none" else (lambda: lambda p, v: 0)
    )
    assert heap.reuse_freed_pages() is False
    assert not heap.reusing_freed_pages()


@glibc
def test_after_reuse_a_freed_large_tensor_s_pages_come_back_without_faults():
    # In a fresh process: a 64 MiB tensor freed and allocated again faults all of its pages in
    # again under glibc's own setting (an mmapped block), and (nearly) none once freed pages are
    # reused, as in a training loop's steady state.
    code = textwrap.dedent(
        """
        import resource, sys, torch
        import lora._heap as heap
        if sys.argv[1] == "reuse":
            assert heap.reuse_freed_pages()
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        n = 16 << 20  # 64 MiB of fp32
        def round_trip():
            t = torch.empty(n).fill_(1.0)  # allocated, every page touched, freed
            del t
        for _ in range(3):  # the heap settles (a small block may first take the freed space)
            round_trip()
        before = faults()
        for _ in range(3):
            round_trip()
        print(faults() - before)
        """
    )
    got = {}
    for mode in ("default", "reuse"):
        run = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        got[mode] = int(run.stdout.split()[-1])
    pages = (64 << 20) // 4096
    assert got["default"] >= 2 * pages, got  # at least two of the three re-faulted (4 KiB pages)
    assert got["reuse"] < pages // 8, got


@pytest.mark.parametrize(
    "dtype,mode,expected",
    [
        (torch.bfloat16, "train", 1),
        (torch.float16, "train", 1),
        (torch.float32, "train", 0),  # fp32 trims between layers instead (release_heap_every)
        (torch.float32, "autocast", 1),  # an fp32 model whose steps run in bf16
        (torch.bfloat16, "eval", 0),
        (torch.bfloat16, "no_grad", 0),
        (torch.bfloat16, "off", 0),
    ],
)
def test_a_16_bit_training_forward_on_cpu_asks_for_reuse(monkeypatch, dtype, mode, expected):
    calls = []
    monkeypatch.setattr(phi3, "reuse_freed_pages", lambda: calls.append(1) or True)
    torch.manual_seed(0)
    model = phi3.Phi3ForCausalLM(phi3.Phi3Config(**TINY_PHI3)).to(dtype)
    model.train(mode != "eval")
    if mode == "off":
        model.model.reuse_heap = False
    ids = torch.randint(3, 60, (2, 9))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with torch.set_grad_enabled(mode != "no_grad"), autocast:
        model(ids, labels=ids)
    assert len(calls) == expected
