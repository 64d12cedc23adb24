"""The `cells` tokenizer: distinct cells, k-means++ start and Lloyd steps on hand-made numbers, a 1x2-pixel ball drawn
exactly, and the tokenizer's encode agreeing with the fit's assignment."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jowa_common.errors import ConfigError
from jowa_model.cell_codebook import distinct_cells, init_codebook, lloyd_step
from jowa_model.tokenizer import Tokenizer, TokenizerConfig, tokenizer_preset


def test_distinct_cells_cuts_the_tokenizer_grid_and_counts():
    f = np.zeros((2, 4, 4), np.uint8)
    f[0, 0, 0] = 7  # frame 0, cell (0, 0)
    f[1, 2:4, 2:4] = [[1, 2], [3, 4]]  # frame 1, cell (1, 1): row-major within the cell
    cells, counts = distinct_cells(f, 2)
    assert cells.dtype == np.uint8 and cells.shape == (3, 4)
    got = {tuple(c): int(n) for c, n in zip(cells.tolist(), counts)}
    assert got == {(0, 0, 0, 0): 6, (7, 0, 0, 0): 1, (1, 2, 3, 4): 1}
    with pytest.raises(ValueError, match="do not split into 3x3 cells"):
        distinct_cells(f, 3)


def test_lloyd_steps_on_hand_made_numbers():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    w = torch.tensor([1.0, 3.0, 1.0, 1.0])
    codes = torch.tensor([[0.0], [1.0]])
    codes, a1, st = lloyd_step(x, w, codes)
    assert a1.tolist() == [0, 1, 1, 1] and st.changed == -1 and st.reseeded == 0 and st.used == 2
    assert torch.allclose(codes, torch.tensor([[0.0], [4.8]]))  # (3*1 + 10 + 11) / 5
    assert st.objective == pytest.approx((0 + 0 + 81 + 100) / 6)  # distances to the old codes 0 and 1
    codes, a2, st = lloyd_step(x, w, codes, a1)
    assert a2.tolist() == [0, 0, 1, 1] and st.changed == 1
    assert torch.allclose(codes, torch.tensor([[0.75], [10.5]]))
    codes, a3, st = lloyd_step(x, w, codes, a2)
    assert st.changed == 0 and torch.allclose(codes, torch.tensor([[0.75], [10.5]]))
    assert st.l1 == pytest.approx((0.75 + 3 * 0.25 + 0.5 + 0.5) / 6)


def test_a_code_without_cells_moves_onto_the_worst_fit_cell():
    x = torch.tensor([[0.0], [1.0], [10.0]])
    codes, _, st = lloyd_step(x, torch.ones(3), torch.tensor([[0.0], [100.0]]))
    assert st.reseeded == 1 and st.used == 1 and codes[1].item() == 10.0


def test_init_is_deterministic_and_takes_every_cell_when_there_are_few():
    x = torch.arange(10, dtype=torch.float32)[:, None]
    w = torch.ones(10)
    few = init_codebook(x, w, 16, torch.Generator().manual_seed(0))
    assert few.shape == (16, 1) and sorted(few[:10, 0].tolist()) == list(range(10))
    a = init_codebook(x, w, 4, torch.Generator().manual_seed(1), round_size=2)
    b = init_codebook(x, w, 4, torch.Generator().manual_seed(1), round_size=2)
    assert torch.equal(a, b) and len(set(a[:, 0].tolist())) == 4  # distinct: a drawn cell has distance 0


def ball_frames(n: int = 120) -> np.ndarray:
    """Breakout-like frames: black, a gray wall, a paddle and a 1x2-pixel ball of level 85 bouncing one pixel a frame."""
    f = np.zeros((n, 84, 84), np.uint8)
    f[:, :, :4] = 142
    y, x, dy, dx = 20, 30, 1, 1
    for i in range(n):
        f[i, y:y + 2, x] = 85
        f[i, 78, (i % 60) + 10:(i % 60) + 18] = 200
        if not 6 <= y + dy <= 70:
            dy = -dy
        if not 6 <= x + dx <= 80:
            dx = -dx
        y, x = y + dy, x + dx
    return f


def fit_cells_tokenizer(frames: np.ndarray, vocab: int, iters: int = 20) -> Tokenizer:
    tok = Tokenizer(dataclasses.replace(tokenizer_preset("cells"), vocab_size=vocab)).eval()
    cells, counts = distinct_cells(frames, 14)
    x = torch.from_numpy(cells).float() / 127.5 - 1
    w = torch.from_numpy(counts).float()
    codes = init_codebook(x, w, vocab, torch.Generator().manual_seed(0))
    prev = None
    for _ in range(iters):
        codes, prev, st = lloyd_step(x, w, codes, prev)
    with torch.no_grad():
        tok.embedding.weight.copy_(codes)
    return tok


def test_the_ball_is_drawn_exactly_when_the_codebook_has_room():
    frames = ball_frames()
    tok = fit_cells_tokenizer(frames, vocab=512)
    assert len(distinct_cells(frames, 14)[0]) <= 512
    np.testing.assert_array_equal(tok.decode(tok.encode(frames)), frames)  # every ball pixel, every frame


def test_encode_is_the_fits_assignment_and_codes_decode_to_cell_means():
    frames = ball_frames()
    tok = fit_cells_tokenizer(frames, vocab=32)  # far fewer codes than distinct cells: the ball shares codes
    cells, counts = distinct_cells(frames, 14)
    x = torch.from_numpy(cells).float() / 127.5 - 1
    codes = tok.embedding.weight.detach()
    _, assign, st = lloyd_step(x, torch.from_numpy(counts).float(), codes)
    # tokens of every cell of every frame = the fit's code of that distinct cell
    tokens = tok.encode(frames).reshape(-1).astype(np.int64)
    all_cells = frames.reshape(-1, 6, 14, 6, 14).transpose(0, 1, 3, 2, 4).reshape(-1, 196)
    lookup = {c.tobytes(): int(a) for c, a in zip(cells, assign)}
    assert tokens.tolist() == [lookup[c.tobytes()] for c in all_cells]
    # a converged code is the weighted mean of its cells, which decode returns (up to uint8 rounding)
    dec = tok.decode(tokens.reshape(-1, 36).astype(np.uint16)).reshape(-1, 6, 14, 6, 14).transpose(0, 1, 3, 2, 4)
    k = int(np.bincount(tokens).argmax())
    mean = all_cells[tokens == k].astype(np.float64).mean(0)
    assert np.abs(dec.reshape(-1, 196)[tokens == k][0] - mean).max() <= 0.5 + 1e-6
    assert st.used <= 32


def test_cells_config_is_checked_and_has_no_networks():
    tok = Tokenizer(tokenizer_preset("cells"))
    assert set(tok.state_dict()) == {"embedding.weight"} and tok.embedding.weight.shape == (2048, 196)
    with pytest.raises(ConfigError, match="arch='cells' codes are cell images, so embed_dim and z_channels must both "
                                          "be 196"):
        TokenizerConfig(arch="cells", z_channels=64, embed_dim=64)
