"""VQ-VAE tokenizer: official layout, public encode/decode API, straight-through, determinism, checkpoints,
codebook health and dead-code restart."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jowa_common.errors import CheckpointError, ConfigError
from jowa_common.io import atomic_torch_save, sha256_file
from jowa_model.tokenizer import (CodebookMonitor, Tokenizer, TokenizerConfig, codebook_stats, load_official_tokenizer,
                                  load_tokenizer, save_tokenizer, tokenizer_checksum, tokenizer_preset)
from pipelines.train_tokenizer import moving_cell_errors, previous_rows, restart_dead_codes


def tiny(**kw) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(dataclasses.replace(tokenizer_preset("tiny"), **kw))


def tiny_conv(**kw) -> Tokenizer:
    """The narrow convnet (`tiny_conv`): for what only a convnet has (channels-last layout, varied cells)."""
    torch.manual_seed(0)
    return Tokenizer(dataclasses.replace(tokenizer_preset("tiny_conv"), **kw))


def first_grad(net: torch.nn.Module) -> float:
    """|grad| summed over the first layer's weight of `net` (conv or MLP)."""
    w = next(p for n, p in net.named_parameters() if n.endswith("weight"))
    return float(w.grad.abs().sum())


def test_paper_preset_matches_official_layout_and_counts():
    tok = Tokenizer(tokenizer_preset("paper"))
    # Exact counts of the official tokenizer as instantiated (docs/official_code.md §1).
    assert tok.num_params() == {"encoder": 1_272_064, "decoder": 1_201_537, "codebook": 1_573_888,
                                "total": 4_047_489}
    assert tok.cfg.tokens_per_frame == 36 and tok.cfg.vocab_size == 2048 and tok.cfg.embed_dim == 512
    sd = tok.state_dict()
    # Official names: encoder attention at 12 (level 1) and 6 (level 2); decoder: mid attention only (quirk).
    assert "encoder.down.1.attn.1.q.weight" in sd and "encoder.down.2.attn.1.proj_out.weight" in sd
    assert not any(k.startswith("encoder.down.0.attn") for k in sd)
    assert not any(".attn." in k for k in sd if k.startswith("decoder.up"))
    assert "decoder.mid.attn_1.q.weight" in sd
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (64, 64, 8, 8)  # /7: kernel 8, stride 7
    assert sd["encoder.down.1.downsample.conv.weight"].shape == (64, 64, 3, 3)  # /2: kernel 3, stride 2
    assert len(tok.decoder.up[2].block) == 3 and tok.decoder.up[2].upsample.factor == 7
    assert tok.decoder.up[1].upsample.factor == 2 and not hasattr(tok.decoder.up[0], "upsample")
    assert tok.encoder.mid.block_1.norm1.num_groups == 2
    x = torch.zeros(2, 1, 84, 84)
    out = tok(x)
    assert out.z.shape == (2, 512, 6, 6) and out.tokens.shape == (2, 36) and out.recon.shape == (2, 1, 84, 84)


def test_load_official_state_dict_ignores_lpips(tmp_path):
    src = Tokenizer(tokenizer_preset("paper"))
    sd = dict(src.state_dict())
    sd["lpips.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)  # the official file also stores its LPIPS net
    torch.save(sd, tmp_path / "tokenizer.pt")
    tok = load_official_tokenizer(tmp_path / "tokenizer.pt")
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in src.state_dict().items())
    del sd["encoder.conv_in.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_official_tokenizer(tmp_path / "bad.pt")


def test_encode_decode_shapes_and_dtypes(atari_frames):
    tok = tiny().eval()
    f = atari_frames[:5]
    t = tok.encode(f, chunk_size=2)
    assert t.shape == (5, 36) and t.dtype == np.uint16 and int(t.max()) < 2048
    tt = tok.encode(torch.from_numpy(f))
    assert tt.dtype == torch.long and tt.shape == (5, 36)
    assert np.array_equal(tt.numpy(), t.astype(np.int64))
    d = tok.decode(t)
    assert d.shape == (5, 84, 84) and d.dtype == np.uint8
    dt = tok.decode(tt)
    assert isinstance(dt, torch.Tensor) and dt.dtype == torch.uint8 and np.array_equal(dt.numpy(), d)
    assert tok.encode(f[:0]).shape == (0, 36)


def test_bad_inputs_are_refused(atari_frames):
    tok = tiny()
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(atari_frames[:2].astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N,84,84\)"):
        tok.encode(np.zeros((2, 64, 64), dtype=np.uint8))
    with pytest.raises(ValueError, match="2048"):
        tok.decode(np.full((1, 36), 2048, dtype=np.int64))
    with pytest.raises(ValueError, match="36"):
        tok.decode(np.zeros((1, 35), dtype=np.int64))


def test_config_validation():
    with pytest.raises(ConfigError, match="vocab_size"):
        TokenizerConfig(vocab_size=70000)
    with pytest.raises(ConfigError, match="divisible"):
        TokenizerConfig(down_factors=(5, 2), up_factors=(5, 2))
    with pytest.raises(ConfigError, match="preset"):
        tokenizer_preset("huge")


def test_tokens_are_deterministic_across_calls_and_chunk_sizes(atari_frames):
    tok = tiny().eval()
    f = atari_frames[::8]
    a = tok.encode(f, chunk_size=64)
    assert np.array_equal(a, tok.encode(f, chunk_size=64))
    assert np.array_equal(a, tok.encode(f, chunk_size=1))
    tok2 = tiny().eval()  # same seed, same weights -> same tokens
    assert np.array_equal(a, tok2.encode(f))


def test_bf16_encode_runs_and_mostly_agrees(trained_tokenizer, atari_frames):
    tok = load_tokenizer(trained_tokenizer.path)
    f = atari_frames[::4]
    a = tok.encode(f)
    b = tok.encode(f, dtype=torch.bfloat16)
    assert b.shape == a.shape and b.dtype == np.uint16
    assert (a == b).mean() > 0.5  # bf16 flips only near-tied tokens (documented in the module)


def test_straight_through_gradient_reaches_encoder_and_codebook(atari_frames):
    tok = tiny().train()
    loss, m = tok.compute_loss(atari_frames[:4])
    assert set(m) >= {"loss", "l1", "codebook", "commitment", "perceptual", "usage", "perplexity"}
    assert float(m["perceptual"]) == 0.0  # tiny: perceptual off
    loss.backward()
    assert first_grad(tok.encoder) > 0  # only through the straight-through estimator + commitment
    assert tok.embedding.weight.grad.abs().sum() > 0  # codebook loss
    # Without the commitment term the encoder still gets gradient, from the reconstruction through the ST path.
    tok2 = tiny(commitment_weight=0.0, codebook_weight=0.0)
    loss2, _ = tok2.compute_loss(atari_frames[:4])
    loss2.backward()
    assert first_grad(tok2.encoder) > 0


def test_forward_value_is_quantized(atari_frames):
    """Decoder input = z + sg(z_q - z) has the value of z_q: decoding tokens gives the forward reconstruction."""
    tok = tiny().eval()
    x = tok.preprocess(torch.from_numpy(atari_frames[:3]))
    with torch.no_grad():
        out = tok(x)
        again = tok.decode_tokens(out.tokens)
    torch.testing.assert_close(out.recon, again, rtol=1e-4, atol=1e-5)


def test_trained_checkpoint_reconstructs_better_than_untrained(trained_tokenizer, atari_frames):
    trained = load_tokenizer(trained_tokenizer.path)
    untrained = Tokenizer(trained.cfg).eval()
    f = atari_frames[::3]

    def l1(tok):
        return np.abs(tok.decode(tok.encode(f)).astype(np.float32) - f).mean() / 255.0

    lt, lu = l1(trained), l1(untrained)
    assert lt < 0.8 * lu, (lt, lu)  # 40 CPU steps: well below an untrained net, far from converged


def test_save_load_roundtrip_and_checksum(tmp_path, atari_frames):
    tok = tiny().eval()
    path = save_tokenizer(tok, tmp_path / "tok.pt")
    again = load_tokenizer(path)
    assert again.cfg == tok.cfg and not again.training
    assert np.array_equal(tok.encode(atari_frames[:4]), again.encode(atari_frames[:4]))
    assert tokenizer_checksum(path) == sha256_file(path) and len(tokenizer_checksum(path)) == 64


def test_load_errors_name_the_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_tokenizer(tmp_path / "junk.pt")
    atomic_torch_save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt.*not a jowa tokenizer"):
        load_tokenizer(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_tokenizer(tmp_path / "missing.pt")
    tok = tiny()
    d = {"format": "jowa-tokenizer", "version": 1, "config": {"ch": 32, "perceptual": "off"},
         "state_dict": tok.state_dict()}
    atomic_torch_save(d, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="mismatch.pt.*do not match"):
        load_tokenizer(tmp_path / "mismatch.pt")


def test_codebook_stats_exact():
    tokens = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    usage, ppl = codebook_stats(tokens, vocab_size=8)
    assert float(usage) == pytest.approx(0.5)
    assert float(ppl) == pytest.approx(4.0)  # 4 equally used codes
    usage, ppl = codebook_stats(torch.zeros(1, 36, dtype=torch.long), vocab_size=8)
    assert float(ppl) == pytest.approx(1.0)


def test_dead_code_restart_revives_dead_codes(atari_frames):
    # the convnet: its encoder outputs differ in every cell (the tiny preset's per-cell MLPs map equal background
    # cells to equal vectors, so a batch of 32 frames offers only a few distinct restart targets)
    tok = tiny_conv().train()
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    f = atari_frames[::6]
    monitor = CodebookMonitor(tok.cfg.vocab_size, window=2)
    loss, _, out = tok.compute_loss(f, return_output=True)
    loss.backward()
    opt.step()
    for step in (1, 2, 3):
        monitor.update(out.tokens, step)
    used_before = len(np.unique(tok.encode(f)))
    dead = set(monitor.dead(5).tolist())
    dead_before = len(dead)
    assert dead_before > 2048 - 100  # an untrained VQ-VAE uses only a handful of codes
    gen = torch.Generator().manual_seed(0)
    n = restart_dead_codes(tok, opt, monitor, out.z.detach(), step=5, gen=gen)
    assert n == dead_before and monitor.dead(5).numel() == 0
    assert float(opt.state[tok.embedding.weight]["exp_avg"][monitor.last_used == 5].abs().sum()) == 0.0
    after = set(np.unique(tok.encode(f)).tolist())
    revived = after & dead
    assert len(revived) >= 20 and len(after) > 1.5 * used_before, (used_before, len(after), len(revived))


def test_cpu_encode_layout_keeps_training_and_checkpoint_bytes(atari_frames, tmp_path):
    """encode() switches the encoder to channels-last for CPU speed: the tokens, a later training step and the
    checkpoint must not notice (params stay trainable, not inference-mode tensors; saves stay contiguous)."""
    tok = tiny_conv()
    before = save_tokenizer(tok, tmp_path / "before.pt")
    frames = atari_frames[:4]
    plain = Tokenizer(tok.cfg)
    plain.load_state_dict(tok.state_dict())
    with torch.no_grad():  # the reference: the default layout, no encode() call
        z = plain.pre_quant_conv(plain.encoder(plain.preprocess(torch.as_tensor(frames))))
        ref = plain.quantize(z)[1]
    got = tok.encode(torch.as_tensor(frames))
    assert tok.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, ref)
    loss, _ = tok.compute_loss(frames)  # raised "Inference tensors cannot be saved for backward" once
    loss.backward()
    assert tok.encoder.conv_in.weight.grad is not None
    tok.encoder.conv_in.weight.grad = None
    after = save_tokenizer(tok, tmp_path / "after.pt")
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (before, after))
    for k, v in sa.items():  # same values, and the standard contiguous strides
        assert torch.equal(v, sb[k]) and sb[k].stride() == v.stride() == torch.empty(v.shape).stride(), k


def test_moving_weight_is_an_exact_weighted_l1(atari_frames):
    """L1 weights: 1, + foreground_weight where a pixel differs from the background, + moving_weight where it
    differs from the previous frame (threshold 10 levels); with previous == frames nothing moves."""
    tok = tiny(foreground_weight=3.0, moving_weight=5.0).train()
    f, prev = atari_frames[10:14], atari_frames[9:13]
    bg = np.zeros_like(f)
    loss, _, out = tok.compute_loss(f, return_output=True, background=bg, previous=prev)
    x = tok.preprocess(torch.as_tensor(f))
    err = (x - out.recon).abs()
    ft, pt = (torch.as_tensor(a).float()[:, None] for a in (f, prev))
    w = 1 + 3.0 * (ft > 10).float() + 5.0 * ((ft - pt).abs() > 10).float()
    rest = tok.cfg.codebook_weight * (out.z.detach() - out.z_q).pow(2).mean() \
        + tok.cfg.commitment_weight * (out.z - out.z_q.detach()).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(((err * w).sum() / w.sum() + rest).detach()), rel=1e-5)
    still, _ = tok.compute_loss(f, background=bg, previous=f)
    without, _ = tok.compute_loss(f, background=bg)
    assert float(still.detach()) == pytest.approx(float(without.detach()), rel=1e-6)
    with pytest.raises(ConfigError, match="moving_weight >= 0"):
        tiny(moving_weight=-1.0)


def test_previous_rows_stay_within_a_game():
    game_of = np.array([0, 0, 0, 1, 1])
    assert previous_rows(np.array([0, 1, 2, 3, 4]), game_of).tolist() == [0, 0, 1, 3, 3]


def test_moving_restarts_go_to_the_cells_where_sprites_move(atari_frames):
    """Only grid cell 7 of frame 1 moves: every restarted code lands on that cell's encoder output."""
    tok = tiny().train()
    f = atari_frames[:2].copy()
    prev = f.copy()
    prev[1, 14:28, 14:28] = 255 - prev[1, 14:28, 14:28]  # cell (1, 1) = row-major cell 7 of frame 1
    _, _, out = tok.compute_loss(f, return_output=True)
    w = moving_cell_errors(tok, torch.as_tensor(f), torch.as_tensor(prev), out.recon.detach())
    assert w.shape == (2 * 36,) and torch.nonzero(w).flatten().tolist() == [36 + 7]
    monitor = CodebookMonitor(tok.cfg.vocab_size, window=1)
    monitor.update(out.tokens, 1)
    opt = torch.optim.Adam(tok.parameters(), lr=1e-3)
    n = restart_dead_codes(tok, opt, monitor, out.z.detach(), step=3, gen=torch.Generator().manual_seed(0), weights=w)
    target = out.z.detach()[1, :, 1, 1]
    moved = tok.embedding.weight[monitor.last_used == 3]
    assert n == len(moved) > 2000 and torch.equal(moved, target.expand_as(moved))
