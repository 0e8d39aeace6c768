"""`vismem export-onnx` and ``onnx:<file>``: the export is the same encoder, run by ONNX Runtime."""

from __future__ import annotations

import os

import numpy as np
import pytest
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"

from visual_memory.cli import app  # noqa: E402
from visual_memory.encoders import Preprocess, create_encoder  # noqa: E402
from visual_memory.encoders.runtime import export_onnx  # noqa: E402
from visual_memory.errors import EncoderError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("tiny-dinov2")
    cfg = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                    patch_size=14, image_size=224)
    transformers.Dinov2Model(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def images(cifar_root):
    return sorted((cifar_root / "val").glob("*/450[23].jpg"))  # 20 real photos, 2 per class


@pytest.mark.parametrize("name", ["efficientnet-lite0", "dinov2-small"])
def test_export_then_onnx_scheme_agrees_with_torch(name, tmp_path, tiny_dinov2, images):
    out = tmp_path / f"{name}.onnx"
    args = ["export-onnx", name, str(out)] + (["--weights", str(tiny_dinov2)] if name.startswith("dinov2") else [])
    result = CliRunner().invoke(app, args + ["--check", str(images[0])])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "cosine(torch, onnx)" in result.output
    kwargs = {"weights": tiny_dinov2} if name.startswith("dinov2") else {}
    torch_enc = create_encoder(name, backend="torch", **kwargs)
    onnx_enc = create_encoder(f"onnx:{out}")
    assert onnx_enc.backend == "onnx"
    assert onnx_enc.spec.fingerprint == torch_enc.spec.fingerprint  # a memory accepts either
    a, b = torch_enc.embed(images), onnx_enc.embed(images)
    cos = (a * b).sum(axis=1)
    assert cos.min() >= 0.999, cos


def test_onnx_file_without_spec_uses_given_preprocessing(tmp_path, images):
    import torch

    class Mean(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    path = export_onnx(Mean(), tmp_path / "plain.onnx", input_size=64)
    pre = Preprocess(input_size=64, crop_pct=1.0)
    enc = create_encoder(f"onnx:{path}", preprocess=pre)
    assert enc.spec.name == "onnx:plain.onnx" and enc.dim == 6
    assert enc.spec.weights.startswith("sha256:")
    x = enc.preprocess(__import__("PIL.Image", fromlist=["Image"]).open(images[0]).convert("RGB"))
    expected = np.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))])
    np.testing.assert_allclose(enc.embed(images[0])[0], expected / np.linalg.norm(expected), atol=1e-5)


def test_onnx_errors_name_the_file(tmp_path):
    with pytest.raises(EncoderError, match="no such file"):
        create_encoder(f"onnx:{tmp_path / 'missing.onnx'}")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(EncoderError, match="junk.onnx"):
        create_encoder(f"onnx:{junk}")
    result = CliRunner().invoke(app, ["export-onnx", "no-such-encoder", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "unknown encoder 'no-such-encoder'" in result.output
