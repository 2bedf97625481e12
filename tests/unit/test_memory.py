"""Per-stage memory (`memory.py`): the high-water mark is reset when a stage starts, so each stage's
summary gives its own peak, and the pipeline's headline lists them."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from constitutional import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")


@linux
def test_peak_is_reset_and_counts_what_was_touched_since():
    block = bytearray(200 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])  # touch every page: resident
    now = memory.current_mb()  # read before the mark: the mark can only be at or above it
    high = memory.peak_mb()
    assert high >= now >= 200
    del block
    memory.trim()
    assert memory.reset_peak()
    after = memory.peak_mb()
    assert after < high - 150  # the 200 MB block is gone from the new mark
    assert after >= memory.current_mb() - 1


@linux
def test_each_stage_summary_has_its_own_peak(tmp_path):
    from constitutional import pipeline
    from constitutional.run import RunDir

    class Big:  # a stage that holds 300 MB for a moment
        @staticmethod
        def run(cfg, run_dir):
            block = bytearray(300 * 2**20)
            block[:: 4096] = b"x" * len(block[:: 4096])
            return {"held": len(block)}

    @dataclasses.dataclass
    class Cfg:
        seed: int = 0

    class Small:
        @staticmethod
        def run(cfg, run_dir):
            return {}

    run_dir = RunDir(tmp_path / "run")
    with run_dir.locked():
        big = pipeline.run_stage("redteam", Big, Cfg(), run_dir, force=True)
        small = pipeline.run_stage("sample", Small, Cfg(), run_dir, force=True)
    assert big["peak_rss_mb"] >= small["peak_rss_mb"] + 250
    lines = pipeline.headline(run_dir, ["redteam", "sample"])
    line = next(x for x in lines if x.startswith("== peak memory"))
    assert "redteam" in line and "sample" in line and line.endswith("(redteam)")
