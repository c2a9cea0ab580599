"""The allocator keeps activation memory between forward passes inside an analysis, and gives it back after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_landscape import allocator

GLIBC = allocator._glibc() is not None
ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter each (glibc's thresholds are process-wide), with the digits CNN on a batch of
# 1,024: glibc's own dynamic thresholds still hand the forward's activations back after each pass,
# so every pass faults thousands of pages in again.
SCRIPT = textwrap.dedent(
    """
    import json, resource
    import torch
    from examples.digits import digits_cnn
    from lightning_landscape.allocator import retained_memory

    torch.set_num_threads(1)
    model = digits_cnn(16).eval()
    x = torch.randn(1024, 1, 8, 8)

    def one_pass():
        with torch.no_grad():
            model(x).sum().item()

    def faults_per_pass(n=50):
        one_pass()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            one_pass()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    outside = faults_per_pass()
    with retained_memory():
        inside = faults_per_pass()
        rss_inside = rss()
    rss_after = rss()
    print(json.dumps({"outside": outside, "inside": inside, "rss_inside": rss_inside, "rss_after": rss_after}))
    """
)


def _run(**env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the retention works through glibc's dynamic thresholds")
def test_inside_an_analysis_passes_stop_faulting_and_the_memory_goes_back_after():
    got = _run(LIGHTNING_LANDSCAPE_RETAIN_MEMORY="1")
    assert got["outside"] > 1500  # measured 3,800-5,300 pages faulted in again each pass
    assert got["inside"] < 200  # measured ~40: one warm-up's worth spread over the 50 passes
    assert got["rss_after"] < got["rss_inside"] - (4 << 20)  # malloc_trim handed the kept activations back


@pytest.mark.skipif(not GLIBC, reason="the retention works through glibc's dynamic thresholds")
def test_the_environment_variable_switches_it_off():
    got = _run(LIGHTNING_LANDSCAPE_RETAIN_MEMORY="0")
    assert got["outside"] > 1500 and got["inside"] > 1500


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def malloc(self, size: int) -> int:
        self.calls.append(f"malloc {size}")
        return 1

    def free(self, block: int) -> None:
        self.calls.append("free")

    def malloc_trim(self, pad: int) -> None:
        self.calls.append(f"trim {pad}")


def test_nested_blocks_raise_the_thresholds_once_and_trim_at_the_outermost_exit(monkeypatch):
    fake = _FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    monkeypatch.setattr(allocator, "_raised", False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    with allocator.retained_memory():
        with allocator.retained_memory():
            pass
        assert fake.calls == [f"malloc {allocator.RAISE_BYTES}", "free"]
    assert fake.calls[-1] == "trim 0" and len(fake.calls) == 3
    with pytest.raises(RuntimeError), allocator.retained_memory():
        raise RuntimeError("an analysis that fails still gives the memory back")
    assert fake.calls[3:] == ["trim 0"]  # no second malloc: the thresholds stay raised


def test_elsewhere_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    assert not allocator.active()
    with allocator.retained_memory():
        pass
