"""The registry, `vismem encoders`, Preprocess arithmetic, timm configs, device choice."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from visual_memory.cli import app
from visual_memory.encoders import Preprocess, create_encoder, list_encoders
from visual_memory.encoders.efficientnet import PREPROCESS as EFFNET
from visual_memory.encoders.timm_models import import_timm, preprocess_from_timm_cfg
from visual_memory.errors import EncoderError

PAPER = {"dinov2-small": 384, "dinov2-base": 768, "dinov2-large": 1024, "dinov2-giant": 1536,
         "clip-vit-b16": 512, "clip-vit-l14": 768, "siglip-base": 768, "vit-s16-augreg": 384, "efficientnet-lite0": 1280}


def test_vismem_encoders_lists_every_named_encoder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("VISMEM_WEIGHTS_DIR", raising=False)
    result = CliRunner().invoke(app, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for name, dim in PAPER.items():
        assert rows[name]["dim"] == dim and rows[name]["input_size"] == 224
    assert rows["efficientnet-lite0"]["weights_local"] is True
    assert rows["dinov2-large"]["weights_local"] is False and rows["dinov2-large"]["source"] == "hf:facebook/dinov2-large"
    table = CliRunner().invoke(app, ["encoders", "clip"])
    assert table.exit_code == 0 and "clip-vit-l14" in table.output and "dinov2" not in table.output.split("generic")[0]


def test_unknown_encoder_lists_known_ones():
    with pytest.raises(EncoderError, match=r"dinov2-small.*Generic schemes: hf:<...>, onnx:<...>, timm:<...>"):
        create_encoder("dinov3-huge")


def test_preprocess_fingerprints_stay_stable():
    # Fields added later are left out at their defaults: existing memories keep their fingerprint.
    d = EFFNET.to_dict()
    assert "resize_mode" not in d and "crop_offset" not in d
    assert Preprocess.from_dict(d) == EFFNET
    squash = replace(EFFNET, resize_mode="squash", crop_offset="round")
    assert Preprocess.from_dict(squash.to_dict()) == squash
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocess(resize_mode="stretch")


def test_fast_normalisation_equals_the_formula(cifar_root):
    img = Image.open(next((cifar_root / "val" / "cat").glob("*.jpg"))).convert("RGB")
    pre = Preprocess(input_size=224, crop_pct=0.875, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    arr = np.asarray(pre.resize_crop(img), dtype=np.float64) / 255.0
    ref = ((arr - np.array(pre.mean)) / np.array(pre.std)).transpose(2, 0, 1)
    np.testing.assert_allclose(pre(img), ref, atol=2e-5)


def test_timm_config_translation():
    vit = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.9, "crop_mode": "center"}
    pre = preprocess_from_timm_cfg(vit)
    assert (pre.resize_size, pre.crop_offset, pre.resize_mode) == (248, "round", "shorter")  # floor(224/0.9)
    # torchvision's CenterCrop rounds the margin half-to-even: 248x372 -> left round(74.0)=74, top 12
    assert pre.geometry(300, 450) == ((248, 372), (12, 74, 236, 298))
    assert preprocess_from_timm_cfg({**vit, "crop_mode": "squash", "crop_pct": 1.0}).resize_mode == "squash"
    for bad in ({**vit, "crop_mode": "border"}, {**vit, "input_size": (3, 224, 256)}, {**vit, "crop_mode": "squash"}):
        with pytest.raises(EncoderError):
            preprocess_from_timm_cfg(bad)


def test_timm_scheme_builds_or_says_why(tmp_path):
    """Where timm imports, a real timm model goes through `timm:`; where it cannot, the error says why.

    In CI timm cannot import (it needs torchvision, and PyPI's torchvision cannot load
    beside the CPU torch: see the README), so there this checks the error only; the
    model branch below is untested there.
    """
    try:
        timm = import_timm()
    except EncoderError as exc:
        assert "torchvision" in str(exc)
        with pytest.raises(EncoderError, match="timm encoders need timm and torchvision"):
            create_encoder("timm:vit_tiny_patch16_224")
        return
    import torch
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=tmp_path / "model.safetensors")
    cfg = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**cfg)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (427, 640, 3), dtype=np.uint8))
    np.testing.assert_allclose(enc.preprocess(img), transform(img).numpy(), atol=2e-5)
    with torch.inference_mode():
        ref = model.eval()(transform(img)[None]).numpy()
    np.testing.assert_allclose(enc.embed(img), ref / np.linalg.norm(ref), atol=1e-5)


def test_device_auto_prefers_an_accelerator(monkeypatch):
    import torch

    from visual_memory.encoders.runtime import resolve_device

    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
