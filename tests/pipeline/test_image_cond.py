"""DINOv3 conditioning on a tiny random DINOv3 ViT, against a hand recomputation of the documented steps."""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backend.trellis2.image_cond import (DINOV3_REPO, DinoV3Conditioner, DinoV3LoadError, images_to_pixels,
                                         write_tiny_dinov3)


@pytest.fixture(scope="module")
def conditioner(tmp_path_factory) -> DinoV3Conditioner:
    return DinoV3Conditioner.from_pretrained(write_tiny_dinov3(tmp_path_factory.mktemp("dinov3") / "tiny"))


def random_image(seed: int, size=(200, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def by_hand(model, image: Image.Image, size: int) -> torch.Tensor:
    """Spec §2.6 spelled out: LANCZOS resize, [0, 1], ImageNet mean/std, last block, LayerNorm without affine."""
    pixels = np.asarray(image.resize((size, size), Image.LANCZOS).convert("RGB")).astype(np.float32) / 255
    pixels = (pixels - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    pixels = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        last_block = out.hidden_states[-1]
        # hidden_states[-1] is the input of the model's own final norm (which the reference does not use).
        torch.testing.assert_close(model.norm(last_block), out.last_hidden_state)
    return F.layer_norm(last_block, (last_block.shape[-1],), eps=1e-5)


@pytest.mark.parametrize("size", [32, 512, 1024])
def test_features_equal_the_documented_recomputation(conditioner, size):
    image = random_image(size)
    features = conditioner.features(image, size)
    assert features.dtype == torch.float32
    assert features.shape == (1, 1 + 4 + (size // 16) ** 2, 32)  # CLS + 4 registers + patches
    torch.testing.assert_close(features, by_hand(conditioner.model, image, size), rtol=1e-5, atol=1e-5)


def test_the_models_own_final_norm_is_not_applied(conditioner):
    image = random_image(7)
    features = conditioner.features(image, 64)
    with torch.no_grad():
        final = conditioner.model(pixel_values=images_to_pixels([image], 64)).last_hidden_state
    # Parameter-free LayerNorm: every token has zero mean and unit variance (a little less for the tiny
    # model's near-constant register tokens, through eps). The model's own norm (random affine in the tiny
    # checkpoint) gives neither.
    variance = features.var(-1, unbiased=False)
    torch.testing.assert_close(features.mean(-1), torch.zeros(features.shape[:2]), atol=1e-5, rtol=0)
    assert ((variance > 0.9) & (variance < 1 + 1e-4)).all()
    assert final.shape == features.shape and (final - features).abs().max() > 0.1


def test_get_cond_batches_and_gives_a_zero_negative(conditioner):
    images = [random_image(1), random_image(2, size=(90, 300))]
    cond = conditioner.get_cond(images, 128)
    assert set(cond) == {"cond", "neg_cond"}
    assert cond["cond"].shape == (2, 1 + 4 + 64, 32)
    assert torch.equal(cond["neg_cond"], torch.zeros_like(cond["cond"]))
    for i, image in enumerate(images):
        torch.testing.assert_close(cond["cond"][i:i + 1], conditioner.features(image, 128), rtol=1e-5, atol=1e-5)


def test_size_must_be_a_multiple_of_the_patch(conditioner):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        conditioner.features(random_image(0), 500)


def test_to_device_returns_the_conditioner(conditioner):
    assert conditioner.to("cpu") is conditioner and conditioner.device == torch.device("cpu")


def test_tiny_checkpoint_round_trips_identically(tmp_path, conditioner):
    again = DinoV3Conditioner.from_pretrained(write_tiny_dinov3(tmp_path / "again"))
    for name, tensor in conditioner.model.state_dict().items():
        assert torch.equal(tensor, again.model.state_dict()[name]), name
    assert (tmp_path / "again" / "config.json").is_file() and (tmp_path / "again" / "model.safetensors").is_file()


def test_unavailable_weights_explain_the_licence_login_and_local_folder(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    with pytest.raises(DinoV3LoadError) as info:
        DinoV3Conditioner.from_pretrained("nobody/no-such-dinov3")
    message = str(info.value)
    assert f"https://huggingface.co/{DINOV3_REPO}" in message
    assert "hf auth login" in message and "local folder" in message and "HF_HUB_OFFLINE" in message


def test_missing_or_wrong_local_folders(tmp_path):
    with pytest.raises(DinoV3LoadError, match="folder not found"):
        DinoV3Conditioner.from_pretrained(tmp_path / "absent")
    with pytest.raises(DinoV3LoadError, match="does not hold a DINOv3"):
        DinoV3Conditioner.from_pretrained(tmp_path)
