"""`jowa scores`: the paper's aggregates from its returns, the official layout, trim_mean, CLI errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from jowa_data.manifest import default_manifest_dir, load_manifests
from pipelines.cli import main
from pipelines.scores import (RAW_FORMAT, GameReturns, RawScoresError, ScoresConfig, compute_scores, iqm,
                              load_raw_scores, load_runs, normalize, read_raw_scores, trim_mean)

DATA = Path(__file__).resolve().parents[1] / "data"
PAPER = json.loads((DATA / "paper_raw_scores.json").read_text())
OFFICIAL = DATA / "official_jowa150m_raw_scores.json"


@pytest.fixture(scope="module")
def reg():
    return load_manifests()


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# --- trim_mean / normalize ------------------------------------------------------------------------

def test_trim_mean_matches_scipy_definition_on_tiny_inputs():
    assert trim_mean([1, 2, 3]) == 2.0  # n=3: int(0.75) = 0 cut -> plain mean
    assert trim_mean([10, 1, 2, 3]) == 2.5  # n=4: cut 1 each end -> mean(2, 3)
    assert trim_mean([100, 0, 5, 6, 7]) == 6.0  # n=5: cut 1 each end
    assert trim_mean(list(range(15)) + [1e9]) == pytest.approx(np.mean(range(4, 12)))  # n=16: cut 4
    assert trim_mean([4, 1, 3, 2], proportion=0.0) == 2.5
    x = np.array([[1, 2, 3, 4, 100], [0, 0, 1, 0, 0]])
    np.testing.assert_allclose(trim_mean(x, axis=1), [3.0, 0.0])
    assert iqm([7]) == 7.0
    with pytest.raises(ValueError, match="empty"):
        trim_mean([])
    with pytest.raises(ValueError, match="proportion"):
        trim_mean([1, 2], proportion=0.5)


def test_normalize_and_swap_when_reference_below_random():
    assert normalize(5.0, 0.0, 10.0) == 0.5
    assert normalize(-20.7, -20.7, 14.6) == 0.0
    # Reference below random: the official code swaps min and max -> (s - ref) / (random - ref).
    assert normalize(15.0, 20.0, 10.0) == 0.5
    assert normalize(10.0, 20.0, 10.0) == 0.0
    np.testing.assert_allclose(normalize(np.array([0.0, 10.0]), 0.0, 10.0), [0.0, 1.0])
    with pytest.raises(ValueError, match="equals the random"):
        normalize(1.0, 3.0, 3.0)


# --- the paper's tables ---------------------------------------------------------------------------

@pytest.mark.parametrize("table", ["table2", "table18"])
def test_paper_aggregates_from_paper_returns(tmp_path, reg, table):
    """Every column whose printed aggregates agree with its printed returns is reproduced to 3 decimals."""
    t = PAPER[table]
    checked = 0
    for col, means in t["columns"].items():
        if col in t["inconsistent"]:
            continue
        p = tmp_path / f"{col}.json"
        p.write_text(json.dumps(means))  # plain layout: {Game: mean}
        rep = compute_scores(load_raw_scores([p], reg), reg, ScoresConfig(ref=t["ref"], n_boot=0))
        for k, want in t["expected"][col].items():
            got = rep["aggregate"][k]["value"]
            assert round(got, 3) == pytest.approx(want, abs=1e-9), (col, k, got, want)
        checked += 1
    assert checked >= 4


def test_jowa150m_table2_and_table18_via_cli(tmp_path):
    p2 = tmp_path / "t2.json"
    p2.write_text(json.dumps(PAPER["table2"]["columns"]["JOWA-150M"]))
    r = _run(["scores", str(p2), "--json", "--boot", "0"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["metric"] == "HNS" and rep["num_games"] == 15
    assert round(rep["aggregate"]["iqm"]["value"], 3) == 0.789
    assert round(rep["aggregate"]["median"]["value"], 3) == 0.456
    assert rep["aggregate"]["above_reference"]["value"] == 6
    assert rep["games"]["Carnival"]["random"] == 0.0  # Table 2's Carnival random score

    p18 = tmp_path / "t18.json"
    p18.write_text(json.dumps(PAPER["table18"]["columns"]["JOWA-150M"]))
    r = _run(["scores", str(p18), "--ref", "dqn", "--json", "--boot", "0"])
    rep = json.loads(r.output)
    assert rep["metric"] == "DNS"
    assert round(rep["aggregate"]["mean"]["value"], 3) == 0.647
    assert round(rep["aggregate"]["iqm"]["value"], 3) == 0.647
    assert round(rep["aggregate"]["median"]["value"], 3) == 0.615
    assert rep["games"]["Pong"]["reference"] == 19.5  # Table 18's DQN reference


def test_official_layout_per_game_means_and_bootstrap(reg):
    res = read_raw_scores(OFFICIAL)
    assert len(res) == 15 and all(len(g.returns) == 16 for g in res.values())
    assert res["Phoenix"].settings == {"buffer_size": [2], "beam_width": 2, "planning_horizon": 2}
    means = {g: round(float(v.returns.mean()), 1) for g, v in res.items()}
    assert means["Assault"] == 1458.6 and means["Atlantis"] == 2841262.5 and means["DemonAttack"] == 9296.6

    rep = compute_scores(load_raw_scores([OFFICIAL], reg), reg, ScoresConfig(n_boot=500, seed=3))
    a = rep["aggregate"]
    for k in ("mean", "median", "iqm"):
        lo, hi = a[k]["ci"]
        assert lo <= a[k]["value"] <= hi
    ph = rep["games"]["Phoenix"]  # 16 identical episodes: a degenerate interval
    assert ph["normalized_ci"] == [ph["normalized"], ph["normalized"]]
    z = rep["games"]["Zaxxon"]  # one 5300 among zeros: a wide interval
    assert z["normalized_ci"][0] < z["normalized"] < z["normalized_ci"][1]
    rep2 = compute_scores(load_raw_scores([OFFICIAL], reg), reg, ScoresConfig(n_boot=500, seed=3))
    assert rep2["aggregate"] == a  # seeded


def test_official_repo_aggregate_with_its_reference_scores(tmp_path):
    """With the official base_scores (Carnival random 700.8) we get the README's 84.7% IQM HNS and 1.195 DNS."""
    d = tmp_path / "manifests"
    shutil.copytree(default_manifest_dir(), d)
    c = d / "Carnival.toml"
    c.write_text(c.read_text().replace("random = 0\n", "random = 700.8\n"))
    r = _run(["scores", str(OFFICIAL), "--manifests", str(d), "--json", "--boot", "0"])
    assert r.exit_code == 0, r.output
    assert round(json.loads(r.output)["aggregate"]["iqm"]["value"], 3) == 0.847
    r = _run(["scores", str(OFFICIAL), "--manifests", str(d), "--json", "--boot", "0", "--ref", "dqn"])
    assert round(json.loads(r.output)["aggregate"]["iqm"]["value"], 3) == 1.195


def test_our_layout_pool_table_and_plot(tmp_path, reg):
    ours = {"format": RAW_FORMAT, "checkpoint": "ckpt.pt",
            "games": {"Pong": {"settings": {"horizon": 2}, "returns": [-21.0, -19.0], "lengths": [800, 900],
                               "decisions_per_s": 12.0}}}
    a = tmp_path / "a.json"
    a.write_text(json.dumps(ours))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"pong": [-17.0]}))  # case-insensitive game names
    res = read_raw_scores(a)
    assert res["Pong"].settings == {"horizon": 2, "checkpoint": "ckpt.pt"}

    with pytest.raises(RawScoresError, match="also in"):
        load_raw_scores([a, b], reg)
    pooled = load_raw_scores([a, b], reg, pool=True)
    np.testing.assert_array_equal(pooled["Pong"].returns, [-21.0, -19.0, -17.0])

    png = tmp_path / "plot.png"
    r = _run(["scores", str(a), str(b), "--pool", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert "Pong" in r.output and "IQM HNS" in r.output
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600
    rep = compute_scores(pooled, reg)
    assert rep["games"]["Pong"]["mean"] == -19.0
    assert rep["games"]["Pong"]["normalized"] == pytest.approx((-19.0 + 20.7) / (14.6 + 20.7))
    from pipelines.charts import scores_chart

    assert scores_chart(rep, tmp_path / "p2.png").stat().st_size > 0


@pytest.mark.parametrize("content,msg", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "other-v9", "games": {}}', "unsupported raw-score format"),
    ('{"format": "jowa-raw-scores-v1", "games": {"Pong": {"lengths": [1]}}}', "missing key 'returns'"),
    ('{"Pong": {"beam_width": 2}}', "missing key 'raw_scores'"),
    ('{"Pong": {"raw_scores": []}}', "is empty"),
    ('{"Pong": {"raw_scores": [1, "x"]}}', "non-numeric"),
    ('{"Pong": "high"}', "must be a list of numbers"),
    ('{"NotAGame": [1.0]}', "game 'NotAGame'"),
])
def test_cli_bad_file_names_file_and_exits_1(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    r = _run(["scores", str(p)])
    assert r.exit_code == 1
    assert msg in r.output and str(p) in r.output
    assert "Traceback" not in r.output


def test_cli_missing_file_and_bad_ref(tmp_path):
    r = _run(["scores", str(tmp_path / "nope.json")])
    assert r.exit_code == 1 and "not found" in r.output and "nope.json" in r.output
    p = tmp_path / "ok.json"
    p.write_text('{"Pong": [0]}')
    assert _run(["scores", str(p), "--ref", "expert"]).exit_code == 2
    with pytest.raises(RawScoresError, match="--ref"):
        compute_scores({"Pong": GameReturns("Pong", np.zeros(1))}, load_manifests(), ScoresConfig(ref="expert"))


def _ours(path, planner, returns, clipped=None, **settings):
    games = {"Pong": {"settings": {"planner": planner, **settings}, "returns": returns,
                      "clipped_returns": clipped if clipped is not None else [max(min(r, 1), -1) for r in returns]}}
    path.write_text(json.dumps({"format": RAW_FORMAT, "checkpoint": None, "games": games}))
    return path


def test_runs_of_one_game_side_by_side(tmp_path, reg):
    """random / greedy / beam files of the same game: one column each, mean, CI and sample std by hand."""
    rnd = _ours(tmp_path / "random.json", "random", [-21.0, -20.0, -21.0, -20.0])
    gr = _ours(tmp_path / "greedy.json", "greedy", [-10.0, -12.0], history=8)
    bm = _ours(tmp_path / "beam.json", "beam", [-8.0], horizon=2, beam_width=2)
    r = _run(["scores", str(rnd), str(gr), str(bm), "--json", "--boot", "500"])
    assert r.exit_code == 0, r.output
    cmp = json.loads(r.output)
    assert cmp["runs"] == ["random", "greedy", "beam H=2 K=2"]
    row = cmp["games"]["Pong"]
    assert row["random"]["mean"] == -20.5 and row["random"]["std"] == pytest.approx(np.std([-21, -20, -21, -20], ddof=1))
    assert row["greedy"]["episodes"] == 2 and row["beam H=2 K=2"]["ci"] == [-8.0, -8.0]
    lo, hi = row["random"]["ci"]
    assert -21.0 <= lo <= -20.5 <= hi <= -20.0
    assert row["greedy"]["normalized"] == pytest.approx((-11.0 + 20.7) / (14.6 + 20.7))
    png = tmp_path / "cmp.png"
    r = _run(["scores", str(rnd), str(gr), str(bm), "--plot", str(png)])
    assert r.exit_code == 0 and "random" in r.output and "beam H=2 K=2" in r.output and png.stat().st_size > 1000
    # two files with the same player get their file names added
    gr2 = _ours(tmp_path / "greedy2.json", "greedy", [-9.0])
    assert [lab for lab, _ in load_runs([gr, gr2], reg)] == ["greedy", "greedy (greedy2)"]


def test_clipped_returns_and_a_dataset_as_the_data_column(tmp_path, reg):
    from jowa_data.build import EpisodeArrays, write_dataset

    eps = []
    for ret in (-3, -1):  # two complete episodes of Pong with clipped returns -3 and -1
        T = 10
        rew = np.zeros(T, np.float32)
        rew[:abs(ret)] = np.sign(ret)
        term = np.zeros(T, np.uint8)
        term[-1] = 1
        eps.append(EpisodeArrays(np.zeros((T, 36), np.uint16), np.zeros(T, np.int64), rew, term))
    ds = write_dataset(tmp_path / "ds", [reg.get("Pong")], {"Pong": eps}, formats=("zarr",))
    gr = _ours(tmp_path / "greedy.json", "greedy", [-15.0, -5.0], clipped=[-15.0, -5.0])
    r = _run(["scores", str(tmp_path / "ds"), str(gr), "--json"])
    assert r.exit_code == 1 and "clipped rewards only" in r.output and "--clipped" in r.output
    r = _run(["scores", str(tmp_path / "ds"), str(gr), "--clipped", "--json"])
    assert r.exit_code == 0, r.output
    cmp = json.loads(r.output)
    assert cmp["runs"] == ["data", "greedy"] and cmp["games"]["Pong"]["data"]["mean"] == -2.0
    bad = tmp_path / "plain.json"
    bad.write_text('{"Pong": [1.0]}')
    r = _run(["scores", str(bad), "--clipped"])
    assert r.exit_code == 1 and "raw returns only" in r.output and str(bad) in r.output
    assert ds
