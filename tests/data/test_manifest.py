"""Manifest schema: every shipped file validates; each kind of bad input names the file and the key."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from jowa_common import actions as A
from jowa_data.cli import main as cli
from jowa_common.errors import ManifestError
from jowa_data.manifest import load_manifest, load_manifests
from tests.fixtures_data import BOWLING_TOML

PAPER_PRETRAIN = {"Phoenix", "Centipede", "SpaceInvaders", "Carnival", "NameThisGame", "Assault", "Atlantis",
                  "DemonAttack", "BeamRider", "ChopperCommand", "Seaquest", "TimePilot", "StarGunner", "Berzerk",
                  "Zaxxon"}
PAPER_HELDOUT = {"Pong", "Robotank", "YarsRevenge", "Gravitar", "MsPacman"}

GOOD = BOWLING_TOML  # one definition of the new-game manifest, shared with the recording fixtures


def write(tmp_path: Path, text: str, name: str = "Bowling") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def test_shipped_manifests_are_the_papers_20_games_and_three_extra():
    reg = load_manifests()
    assert {m.name for m in reg.split("pretrain")} == PAPER_PRETRAIN
    assert {m.name for m in reg.split("finetune")} == PAPER_HELDOUT
    # the CPU pretraining run's game and `jowa bench learn`'s two games with heuristic controllers
    assert {m.name for m in reg.split("other")} == {"FishingDerby", "Breakout", "Freeway"}
    assert len({m.task_id for m in reg}) == 23
    assert reg.get("FishingDerby").task_id == 22 and reg.get("Gravitar").task_id == 26  # alphabetical 60-game ids
    assert reg.get("Breakout").task_id == 13 and reg.get("Freeway").task_id == 23
    # official game ids (alphabetical 60-game list) and the Table 17 beam widths
    assert reg.get("Phoenix").task_id == 37 and reg.get("Pong").task_id == 39
    assert reg.get("Berzerk").planning.beam_width == 4 and reg.get("Seaquest").planning.beam_width == 3
    # Table 2 uses random = 0 for Carnival; Table 18 uses DQN 19.5 for Pong
    assert reg.get("Carnival").scores.random == 0.0 and reg.get("Pong").scores.dqn == 19.5


def test_minimal_action_sets_match_ale():
    from ale_py import Action, ALEInterface, LoggerMode, roms

    assert [a.name for a in Action] == list(A.FULL_ACTIONS)
    ALEInterface.setLoggerMode(LoggerMode.Error)
    ale = ALEInterface()
    for m in load_manifests():
        ale.loadROM(roms.get_rom_path(m.ale_rom))
        assert [a.name for a in ale.getMinimalActionSet()] == list(m.actions), m.name
        assert m.full_action_ids.tolist() == [a.value for a in ale.getMinimalActionSet()]


def test_action_tables():
    m = load_manifests().get("Pong")
    assert m.full_action_ids.tolist() == [0, 1, 3, 4, 11, 12]
    assert m.action_mask.sum() == 6 and m.action_mask[11] and not m.action_mask[2]
    t = A.full_to_minimal_table(m.actions)
    assert t[12] == 5 and t[2] == -1


def test_new_game_from_one_file(tmp_path):
    p = write(tmp_path, GOOD)
    m = load_manifest(p)
    assert m.name == "Bowling" and m.task_id == 11 and m.num_actions == 6
    reg = load_manifests([tmp_path])
    assert reg.get("bowling") is reg.get("Bowling")


@pytest.mark.parametrize("mutation, key", [
    (lambda s: s.replace("task_id = 11", "taskid = 11"), "taskid"),  # misspelt key
    (lambda s: s.replace("task_id = 11", 'task_id = "11"'), "task_id"),  # wrong type
    (lambda s: s.replace('"DOWNFIRE"]', '"DOWNFIRRE"]'), "actions"),  # unknown ALE action
    (lambda s: s.replace('split = "other"', 'split = "train"'), "split"),
    (lambda s: s.replace("human = 160.7\n", ""), "scores.human"),  # missing key
    (lambda s: s + "[data]\nfraction = 1.5\n", "data.fraction"),
    (lambda s: s + "[planning]\nbeam = 2\n", "planning.beam"),
])
def test_bad_manifest_names_file_and_key(tmp_path, mutation, key):
    p = write(tmp_path, mutation(GOOD))
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert str(p) in str(e.value) and f"'{key}'" in str(e.value)


def test_misspelt_key_suggests_the_right_one(tmp_path):
    p = write(tmp_path, GOOD.replace("ale_rom", "alerom"))
    with pytest.raises(ManifestError, match="did you mean 'ale_rom'"):
        load_manifest(p)


def test_duplicate_task_id_is_an_error(tmp_path):
    write(tmp_path, GOOD)
    write(tmp_path, GOOD.replace("Bowling", "Bowling2"), name="Bowling2")
    with pytest.raises(ManifestError, match="duplicate task id 11"):
        load_manifests([tmp_path])


def test_name_must_match_file(tmp_path):
    p = write(tmp_path, GOOD, name="Other")
    with pytest.raises(ManifestError, match="must equal the file name"):
        load_manifest(p)


def test_unknown_game_suggests():
    with pytest.raises(ManifestError, match="Phoenix"):
        load_manifests().get("Phenix")


def test_cli_manifests_table_and_json(tmp_path):
    r = CliRunner().invoke(cli, ["manifests"])
    assert r.exit_code == 0 and "SpaceInvaders" in r.output and "23 game manifests" in r.output
    r = CliRunner().invoke(cli, ["manifests", "--json", "--manifests", str(tmp_path)])
    assert r.exit_code == 0 and r.output.strip() == "[]"
    write(tmp_path, GOOD.replace("task_id = 11", "taskid = 11"))
    r = CliRunner().invoke(cli, ["manifests", "--manifests", str(tmp_path)])
    assert r.exit_code == 1 and "Bowling.toml" in r.output and "taskid" in r.output
    assert "Traceback" not in r.output
