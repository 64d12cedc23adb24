"""`jowa bench`: the umbrella runs every benchmark (tiny sizes) in one process and reports every figure.

No timing asserts: the figures must exist, be positive and finite, and agree with their references' arithmetic.
"""

from __future__ import annotations

import io
import json
import math

import pytest
from click.testing import CliRunner
from rich.console import Console

from jowa_data.npy_stream import available_decoders
from pipelines.bench import OFFICIAL, SECTIONS, bench_config, render_table
from pipelines.cli import main

TINY = ["--size", "tiny", "--set", "threads=1"]


@pytest.fixture(scope="module")
def tiny_all() -> dict:
    """One run of every section at the tiny size, through the CLI, as JSON."""
    r = CliRunner().invoke(main, ["bench", "all", *TINY, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_all_sections_report_positive_figures(tiny_all):
    res = tiny_all
    assert res["sections"] == list(SECTIONS)
    assert res["errors"] == {}
    assert set(res["results"]) == set(SECTIONS)
    m = res["machine"]
    for k in ("cpu", "cores", "torch", "torch_threads", "gpu", "load_avg_start", "load_avg_end", "loaded"):
        assert k in m, k
    assert m["cores"] >= 1 and len(m["load_avg_start"]) == 3 and m["torch_threads"] == 1
    assert res["config"]["size"] == "tiny"

    figs = {f["key"]: f for f in res["figures"]}
    assert len(figs) == len(res["figures"]), "figure keys must be unique"
    expected = [f"read.stream.{d}.frames_per_s" for d in available_decoders()] + [
        "read.stream.isal.peak_rss_MB",
        "record.env.steps_per_s", "record.env.frames_per_s", "record.record.steps_per_s",
        "record.record.frames_per_s",
        "build.frames_per_s", "build.read_s", "build.tokenize_s", "build.write_s",
        "build.tiny_encode_fp32_frames_per_s", "build.tiny_encode_bf16_frames_per_s",
        "build.tiny_build_fp32_frames_per_s",
        "stream.zarr.segments_per_s", "stream.wds.segments_per_s", "stream.zarr.mib_per_1M", "stream.wds.mib_per_1M",
        "stream.on_the_fly.segments_per_s",
        "train.tiny.fp32.tokens_per_s", "train.tiny.bf16.tokens_per_s", "train.tiny.bf16.matmul_ms",
        "tokenizer.tiny.encode.fp32.frames_per_s", "tokenizer.tiny.decode.bf16.frames_per_s",
        "tokenizer.tiny.encode.fp32.1frame_ms",
        "plan.float32.greedy", "plan.float32.beam_k2", "plan.float32.beam_k3", "plan.float32.beam_k4",
        "plan.float32.mcts"]
    missing = [k for k in expected if k not in figs]
    assert not missing, missing
    for k, f in figs.items():
        assert f["section"] in SECTIONS and f["unit"] and f["figure"], k
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]) and f["value"] > 0, (k, f["value"])
        if f["reference"] is not None:
            want = f["value"] / f["reference"] if f["higher_is_better"] else f["reference"] / f["value"]
            assert f["ratio"] == pytest.approx(want), k
    # official references where one exists: the loader figures and RAM per 1M transitions
    assert figs["stream.zarr.segments_per_s"]["reference"] == OFFICIAL["segments_per_s"][0]
    assert figs["stream.wds.mib_per_1M"]["reference"] == 310.0 and not figs["stream.wds.mib_per_1M"]["higher_is_better"]
    # the tiny model and tiny tokenizer have no official counterpart: no invented reference
    assert figs["train.tiny.fp32.tokens_per_s"]["reference"] is None
    assert figs["plan.float32.greedy"]["reference"] is None
    # the build split is the build's own timing
    b = res["results"]["build"]
    assert b["rows"] > 0 and b["frames_per_s"] == pytest.approx(b["rows"] / b["run_s"])
    # every decoder read every row of the generated file, and they agree
    assert res["results"]["read"]["agree"]
    assert {x["frames"] for x in res["results"]["read"]["results"]} == {3000}
    # peak RSS is the reader's own address space (not the parent's, which ru_maxrss would carry across exec)
    assert all(x["peak_rss_MB"] < 1024 for x in res["results"]["read"]["results"])


def test_table_renders_every_figure_and_the_machine(tiny_all):
    buf = io.StringIO()
    render_table(tiny_all, Console(file=buf, width=260))
    out = buf.getvalue()
    for s in SECTIONS:
        assert s in out
    for unit in ("frames/s", "agent steps/s", "segments/s", "tokens/s", "decisions/s", "MiB/1M transitions"):
        assert unit in out
    assert tiny_all["machine"]["cpu"] in out and "load avg" in out and "torch" in out
    assert "official token-in-memory loader" in out  # a reference column entry


def test_section_command_prints_table():
    r = CliRunner().invoke(main, ["bench", "record", *TINY, "--set", "record.steps=30"])
    assert r.exit_code == 0, r.output
    assert "agent steps/s" in r.stdout and "emulator frames/s" in r.stdout and "load avg" in r.stdout
    assert "record" in r.stdout and "plan" not in r.stdout


def test_section_command_json():
    r = CliRunner().invoke(main, ["bench", "read", *TINY, "--set", "read.rows=500", "--set", 'read.decoders=["gzip"]',
                                  "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["sections"] == ["read"] and [f["key"] for f in res["figures"]] == [
        "read.stream.gzip.frames_per_s", "read.stream.gzip.peak_rss_MB"]


def test_failing_section_is_reported_and_others_still_run(monkeypatch):
    import pipelines.bench as bench

    def broken(cfg, work, state, log):
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(bench.RUNNERS, "read", broken)
    r = CliRunner().invoke(main, ["bench", "all", "--only", "read,record", *TINY, "--set", "record.steps=30", "--json"])
    assert r.exit_code == 1
    res = json.loads(r.stdout)
    assert res["errors"] == {"read": "RuntimeError: disk on fire"}
    assert any(f["key"] == "record.env.steps_per_s" for f in res["figures"])


@pytest.mark.parametrize("args, message", [
    (["all", "--only", "read,nope"], "unknown section 'nope'"),
    (["read", "--set", "read.rowz=5"], "unknown config key 'read.rowz'"),
    (["train", "--set", "train.dtypes=[\"fp16\"]", "--set", "train.configs=[\"tiny\"]"], "'fp16' is not fp32 or bf16"),
    (["record", "--set", "record.game=NoSuchGame"], "NoSuchGame"),
    (["read", "--set", 'read.decoders=["zstd"]'], "'zstd' is not an installed gzip decoder"),
])
def test_bad_input_is_one_line_exit_1(args, message):
    r = CliRunner().invoke(main, ["bench", *args, "--size", "tiny"])
    assert r.exit_code == 1, r.output
    assert message in r.output and "Traceback" not in r.output


def test_sizes():
    assert bench_config("quick").train.configs == ("tiny", "40M")
    full = bench_config("full")
    assert "150M" in full.train.configs and full.read.rows == 1_000_000 and "bfloat16" in full.plan.dtypes
    assert bench_config("tiny", {"read": {"rows": 7}}).read.rows == 7
    r = CliRunner().invoke(main, ["bench", "--size", "huge"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["bench", "--json", "record"])  # would be silently ignored
    assert r.exit_code == 2 and "after the sub-command" in r.output
