"""DINOv2, CLIP and SigLIP through the same loader as the named encoders, offline.

Tiny random-weight models are built from configs and saved with
``save_pretrained`` (with the hub's real image-processor settings beside them),
then loaded back by name with ``weights=<dir>``, through ``hf:<dir>``,
through ``$VISMEM_WEIGHTS_DIR`` and through a hub-cache layout. Nothing
downloads: HF_HUB_OFFLINE=1 and an empty HF_HOME for every test.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/huggingface_hub read it

import transformers  # noqa: E402

from visual_memory.encoders import create_encoder, list_encoders  # noqa: E402
from visual_memory.encoders.hf import (  # noqa: E402
    CLIP_PREPROCESS,
    DINOV2_PREPROCESS,
    SIGLIP_PREPROCESS,
    preprocess_from_hf_config,
)
from visual_memory.errors import EncoderError  # noqa: E402

# The preprocessor_config.json settings of the hub repositories (transcribed).
HUB_PROCESSORS = {
    "dinov2": ("BitImageProcessorPil", dict(
        size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)),
    "clip": ("CLIPImageProcessorPil", dict(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])),
    "siglip": ("SiglipImageProcessorPil", dict(
        size={"height": 224, "width": 224}, resample=3, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])),
}
OURS = {"dinov2": DINOV2_PREPROCESS, "clip": CLIP_PREPROCESS, "siglip": SIGLIP_PREPROCESS}
NAMED = {"dinov2-small": "dinov2", "dinov2-small-reg": "dinov2reg", "clip-vit-b16": "clip", "siglip-base": "siglip"}


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("VISMEM_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight DINOv2 (+registers), full CLIP and full SigLIP checkpoints on disk."""
    import torch

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-hf")
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    models = {
        "dinov2": transformers.Dinov2Model(transformers.Dinov2Config(patch_size=14, **vit)),
        "dinov2reg": transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **vit)),
        "clip": transformers.CLIPModel(transformers.CLIPConfig(
            text_config=text, vision_config=dict(patch_size=16, **vit), projection_dim=24)),
        "siglip": transformers.SiglipModel(transformers.SiglipConfig(
            text_config=text, vision_config=dict(patch_size=16, **vit))),
    }
    dirs = {}
    for key, model in models.items():
        d = root / key
        model.save_pretrained(d)
        family = "dinov2" if key.startswith("dinov2") else key
        cls_name, cfg = HUB_PROCESSORS[family]
        getattr(transformers, cls_name)(**cfg).save_pretrained(d)
        dirs[key] = d
    return dirs


@pytest.fixture(scope="session")
def photos(cifar_root) -> list[Image.Image]:
    """Real photos of several shapes: CIFAR-10 (32x32) and scikit-image samples (non-square, odd margins)."""
    import skimage.data

    cifar = [Image.open(p).convert("RGB") for p in sorted((cifar_root / "val").glob("*/4500.jpg"))[:4]]
    samples = [Image.fromarray(getattr(skimage.data, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    return cifar + samples


@pytest.mark.parametrize("family", ["dinov2", "clip", "siglip"])
def test_preprocess_equals_reference_processor(family, photos):
    cls_name, cfg = HUB_PROCESSORS[family]
    reference = getattr(transformers, cls_name)(**cfg)
    ours = OURS[family]
    assert preprocess_from_hf_config(cfg) == ours  # the named encoder's settings are the hub's
    for img in photos:
        ref = reference(images=img, return_tensors="np")["pixel_values"][0]
        got = ours(img)
        assert got.shape == ref.shape == (3, 224, 224)
        np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0, err_msg=f"{family} {img.size}")


def test_truncation_and_crop_offsets_follow_the_reference():
    from dataclasses import replace

    # rocket is 640x427: the long side becomes int(256*640/427) = 383 (round would say 384)
    # and the crop margin 159 is odd: Hugging Face floors (79), torchvision rounds half-even (80).
    assert DINOV2_PREPROCESS.geometry(640, 427) == ((383, 256), (79, 16, 303, 240))
    assert replace(DINOV2_PREPROCESS, crop_offset="round").geometry(640, 427) == ((383, 256), (80, 16, 304, 240))
    assert SIGLIP_PREPROCESS.geometry(640, 427) == ((224, 224), (0, 0, 224, 224))
    assert CLIP_PREPROCESS.geometry(32, 32) == ((224, 224), (0, 0, 224, 224))


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_encoder_loads_tiny_checkpoint(name, tiny_dirs, cifar_root):
    enc = create_encoder(name, weights=tiny_dirs[NAMED[name]])
    paths = sorted((cifar_root / "val").glob("*/4501.jpg"))[:6]
    a = enc.embed(paths, batch_size=4)
    assert a.shape == (6, enc.dim) and a.dtype == np.float32
    assert enc.dim == (24 if name.startswith("clip") else 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a, enc.embed(paths, batch_size=4))  # deterministic
    np.testing.assert_allclose(a, enc.embed(paths, batch_size=1), atol=1e-5)  # batch-size invariant
    assert len({tuple(np.round(v, 4)) for v in a}) == 6  # distinct images, distinct vectors
    assert enc.spec.name == name and enc.spec.weights.startswith("sha256:")
    # auto backend: ONNX Runtime on CPU, torch where the exporter cannot follow (registers' bicubic-AA op)
    assert enc.backend == ("torch" if name == "dinov2-small-reg" else "onnx")
    assert enc.spec.preprocess == OURS["dinov2" if name.startswith("dinov2") else NAMED[name]]


def test_outputs_are_the_documented_features(tiny_dirs, photos):
    """DINOv2: CLS after the final layer norm; CLIP: projected embedding; SigLIP: pooled output."""
    import torch

    img = photos[4]
    checks = {
        "dinov2-small": lambda m, x: m(pixel_values=x).last_hidden_state[:, 0],  # already layer-normed in HF
        "clip-vit-b16": lambda m, x: m.get_image_features(pixel_values=x),
        "siglip-base": lambda m, x: m.get_image_features(pixel_values=x),
    }
    classes = {"dinov2-small": transformers.Dinov2Model, "clip-vit-b16": transformers.CLIPModel,
               "siglip-base": transformers.SiglipModel}
    for name, fn in checks.items():
        enc = create_encoder(name, weights=tiny_dirs[NAMED[name]], backend="torch")
        full = classes[name].from_pretrained(tiny_dirs[NAMED[name]]).eval()
        x = torch.from_numpy(enc.preprocess(img)[None])
        with torch.inference_mode():
            ref = fn(full, x)
            ref = getattr(ref, "pooler_output", ref).numpy()
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(enc.embed(img), ref, atol=1e-5, err_msg=name)


def test_hf_scheme_reads_the_processor_config(tiny_dirs):
    enc = create_encoder(f"hf:{tiny_dirs['siglip']}")
    assert enc.spec.preprocess == SIGLIP_PREPROCESS
    assert enc.spec.name == f"hf:{tiny_dirs['siglip'].resolve()}"
    named = create_encoder("siglip-base", weights=tiny_dirs["siglip"])
    assert enc.spec.weights == named.spec.weights  # identity is the content, not the path


def test_wrong_family_is_refused(tiny_dirs):
    with pytest.raises(EncoderError, match="not a clip model"):
        create_encoder("clip-vit-b16", weights=tiny_dirs["dinov2"])


def test_incomplete_checkpoint_is_refused(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["dinov2"], bad)
    state = load_file(bad / "model.safetensors")
    state.pop(next(k for k in state if "layernorm" in k))
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderError, match="missing or mismatched"):
        create_encoder("dinov2-small", weights=bad)


def test_missing_hub_model_error_names_model_and_remedies():
    with pytest.raises(EncoderError) as info:
        create_encoder("dinov2-large")
    msg = str(info.value)
    for needle in ("'dinov2-large'", "facebook/dinov2-large", "VISMEM_WEIGHTS_DIR", "hf download facebook/dinov2-large",
                   "weights=", "HF_HUB_OFFLINE"):
        assert needle in msg, (needle, msg)


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(EncoderError, match="no config.json"):
        create_encoder("dinov2-small", weights=tmp_path)
    with pytest.raises(EncoderError, match="neither a folder nor a repository id"):
        create_encoder("dinov2-small", weights=str(tmp_path / "nope"))


def test_weights_dir_env_is_searched(tiny_dirs, tmp_path, monkeypatch):
    root = tmp_path / "weights"
    (root / "facebook").mkdir(parents=True)
    shutil.copytree(tiny_dirs["dinov2"], root / "facebook" / "dinov2-small")
    monkeypatch.setenv("VISMEM_WEIGHTS_DIR", str(root))
    info = {e.name: e for e in list_encoders("dinov2")}
    assert info["dinov2-small"].weights_available and not info["dinov2-base"].weights_available
    enc = create_encoder("dinov2-small")
    assert enc.spec.weights == create_encoder("dinov2-small", weights=tiny_dirs["dinov2"]).spec.weights


def test_hub_cache_layout_is_found(tiny_dirs, tmp_path, monkeypatch):
    """The real hub-cache layout (blobs named by SHA-256, snapshot symlinks, refs/main)."""
    cache = tmp_path / "hf-home" / "hub" / "models--openai--clip-vit-base-patch16"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (cache / "blobs").mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    snap = cache / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in tiny_dirs["clip"].iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, cache / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    assert {e.name: e for e in list_encoders("clip")}["clip-vit-b16"].weights_available
    enc = create_encoder("clip-vit-b16")
    assert enc.folder == snap
    assert enc.spec.weights == create_encoder("clip-vit-b16", weights=tiny_dirs["clip"]).spec.weights


def test_memory_with_a_local_checkpoint_reopens_and_classifies(tiny_dirs, cifar_root, tmp_path):
    import visual_memory as vm

    paths = sorted((cifar_root / "val").glob("*/4504.jpg"))[:5]
    labels = [p.parent.name for p in paths]
    mem = vm.create(tmp_path / "mem", encoder=create_encoder("dinov2-small", weights=tiny_dirs["dinov2"]))
    mem.add(paths, labels=labels)
    again = vm.open(tmp_path / "mem")  # finds the weights through the folder recorded in the manifest
    preds = again.classify([str(p) for p in paths], k=1)
    assert [p.label for p in preds] == labels
    assert again.encoder.spec.fingerprint == mem.encoder.spec.fingerprint
