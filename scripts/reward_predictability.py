"""How predictable is the reward sign of random play from the frames? A data check, not a jowa model.

    .venv/bin/python scripts/reward_predictability.py [--games Centipede,FishingDerby] [--steps 15000]

For each game: record `--steps` random-play steps (seed 0) and `--heldout` more (seed 1) with the real emulator
(Dopamine preprocessing), train a small CNN on (the last three 84x84 frames, the action) -> sign(r_t) for
`--iters` Adam steps, and print its held-out accuracy next to the majority baseline ("always the most frequent
sign"). If the CNN cannot beat the majority, a world model trained on tokens of the same data cannot either:
that is why scripts/pretrain_cpu.py defaults to FishingDerby.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from jowa_data.atari import AtariEnv
from jowa_data.manifest import load_manifests


def play(rom: str, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Random play: frames (N, 3, 84, 84) float (o_{t-2}, o_{t-1}, o_t), actions (N,), reward signs + 1 (N,)."""
    env, rng = AtariEnv(rom, seed=seed), np.random.default_rng(seed)
    obs, frames, acts, rews = env.reset(), [], [], []
    for _ in range(steps):
        a = int(rng.integers(env.num_actions))
        frames.append(obs)
        obs, r, term, trunc = env.step(a)
        acts.append(a)
        rews.append(np.sign(r) + 1)
        if term or trunc:
            obs = env.reset()
    x = torch.from_numpy(np.stack(frames)).float().div_(255.0)[:, None]  # (N, 1, 84, 84)
    stack = torch.cat([torch.cat([x[:1].expand(k, -1, -1, -1), x[:len(x) - k]]) for k in (2, 1, 0)], 1)
    return stack, torch.tensor(acts), torch.tensor(rews, dtype=torch.long), env.num_actions


class RewardCNN(nn.Module):
    def __init__(self, num_actions: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 16, 8, 4), nn.ReLU(), nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32 * 9 * 9 + num_actions, 128), nn.ReLU(), nn.Linear(128, 3))
        self.num_actions = num_actions

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.conv(x), F.one_hot(a, self.num_actions).float()], 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--games", default="Centipede,SpaceInvaders,MsPacman,Carnival,FishingDerby")
    p.add_argument("--steps", type=int, default=15000)
    p.add_argument("--heldout", type=int, default=3000)
    p.add_argument("--iters", type=int, default=1500)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    reg = load_manifests()
    print(f"{'game':14s} {'held-out acc':>12s} {'majority':>9s}  rewarded steps (train)")
    for name in a.games.split(","):
        m = reg.get(name.strip())
        x, act, y, na = play(m.ale_rom, a.steps, 0)
        x2, act2, y2, _ = play(m.ale_rom, a.heldout, 1)
        net = RewardCNN(na)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(a.iters):
            i = torch.randint(0, len(x), (128,))
            loss = F.cross_entropy(net(x[i], act[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (net(x2, act2).argmax(1) == y2).float().mean().item()
        majority = torch.bincount(y2, minlength=3).max().item() / len(y2)
        print(f"{m.name:14s} {acc:12.3f} {majority:9.3f}  {(y != 1).float().mean().item():.3f}", flush=True)


if __name__ == "__main__":
    main()
