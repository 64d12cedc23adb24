"""Observation / action / reward / terminal alignment, end to end, on a recorded Breakout episode whose rewards are
known from the game itself (its brick counter in RAM): the stored row t is (o_t, a_t, r_t, d_t) with r_t the reward
of taking a_t on o_t; it survives the DQN-Replay files, the build and the training stream unshifted."""

from __future__ import annotations

import numpy as np
import torch

from jowa_data.atari import AtariConfig, AtariEnv
from jowa_data.build import BuildConfig, build_dataset
from jowa_data.manifest import load_manifests
from jowa_data.record import derive_seeds, record
from jowa_data.replay import iter_episodes
from jowa_data.stream import SegmentStream
from jowa_data.subsample import SubsampleOptions
from jowa_model.tokenizer import Tokenizer, load_tokenizer, save_tokenizer, tokenizer_preset

BRICKS_HIT = 84  # Breakout RAM: 5 x bricks hit (AtariARI ram_annotations.py: "score", 5 for each hit)


def test_rewards_line_up_with_the_game_from_emulator_to_stream(tmp_path):
    m = load_manifests().get("Breakout")
    steps, seed = 450, 3
    rec = record(m, tmp_path / "replay", "1", steps, policy="heuristic", seed=seed, capacity=150, progress=False,
                 max_episode_steps=200, compresslevel=1)
    assert rec.rewards.sum() >= 3 and rec.terminals.sum() >= 2  # rewards and episode ends to line up

    # 1. the emulator's own counter: replaying the actions, r_t > 0 exactly when a brick is hit during step t
    env = AtariEnv(m.ale_rom, AtariConfig(), seed=derive_seeds(seed)[0])
    obs, hits = env.reset(), []
    for t in range(steps):
        np.testing.assert_array_equal(obs, rec.frames[t])  # o_t is the frame a_t was chosen on
        before = int(env.ale.getRAM()[BRICKS_HIT])
        obs, r, term, trunc = env.step(int(rec.actions[t]))
        hits.append(int(env.ale.getRAM()[BRICKS_HIT]) != before)
        assert r == rec.raw_rewards[t]
        if rec.terminals[t]:
            obs = env.reset()
    hits = np.array(hits)
    np.testing.assert_array_equal(hits, rec.rewards > 0)
    # ... and the picture agrees: the score digits change within the two frames after every rewarded step
    score = rec.frames[:, 2:6].astype(int)
    for t in np.flatnonzero(rec.rewards[:-2]):
        if not rec.terminals[t:t + 2].any():
            assert (score[t + 2] != score[t]).any(), t

    # 2. the DQN-Replay files give back the same rows, episode by episode
    episodes = list(iter_episodes(tmp_path / "replay", "Breakout", "1"))
    for ep, sl in zip(episodes, rec.episode_slices()):
        np.testing.assert_array_equal(ep.frames, rec.frames[sl])
        np.testing.assert_array_equal(ep.rewards, rec.rewards[sl])
        np.testing.assert_array_equal(ep.actions, rec.actions[sl])
        np.testing.assert_array_equal(ep.terminals, rec.terminals[sl])

    # 3. built and streamed: each episode's rows keep their tokens, full-id actions, rewards and terminal
    torch.manual_seed(0)
    tok_path = save_tokenizer(Tokenizer(tokenizer_preset("tiny")), tmp_path / "tok.pt")
    tok = load_tokenizer(tok_path)
    build_dataset([m], tmp_path / "replay", tok_path, tmp_path / "ds",
                  BuildConfig(selection=SubsampleOptions(runs=(1,), checkpoints=(0, 99), fraction=1.0),
                              progress=False, workers=1))
    s = SegmentStream(tmp_path / "ds", batch_size=1, seq_len=8, stride=1, rank=0, world_size=1)
    c = s.cache
    full = m.full_action_ids
    complete = [sl for sl in rec.episode_slices() if rec.terminals[sl.stop - 1]]
    assert len(c.ep_start) == len(complete)
    encoded = {(sl.start, sl.stop): tok.encode(rec.frames[sl]) for sl in complete}
    matched = set()
    for start, length in zip(c.ep_start, c.ep_length):
        rows = slice(int(start), int(start) + int(length))
        key = next(k for k, t in encoded.items() if len(t) == length and np.array_equal(t, c.tokens[rows]))
        matched.add(key)
        sl = slice(*key)
        np.testing.assert_array_equal(c.rewards[rows], rec.rewards[sl])
        np.testing.assert_array_equal(c.actions[rows], full[rec.actions[sl]])
        np.testing.assert_array_equal(c.terminals[rows], rec.terminals[sl])
    assert len(matched) == len(complete)  # every recorded episode, once
    # a streamed segment is those rows, in order
    b = s.gather(np.array([3]))
    row = int(s.seg_start[3])
    np.testing.assert_array_equal(b["rewards"][0].numpy(), c.rewards[row:row + 8])
    np.testing.assert_array_equal(b["tokens"][0].numpy(), c.tokens[row:row + 8].astype(np.int64))
