"""Tiny Stable Diffusion models with SD1.5's topology (same blocks and layers, narrow channels), built from the
configs the package ships; deterministic, no downloads."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in one worker per core (pytest-xdist, pyproject's addopts): a thread each, for the worker and
    # the trainers it starts (two threads per worker spin-wait against the other workers)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

ASSETS = Path(__file__).resolve().parents[1] / "lora_diffusion" / "assets"


def build_tiny_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ASSETS / "tiny-sd" / "unet")).eval()


def build_tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    config = CLIPTextConfig.from_json_file(ASSETS / "tiny-sd" / "text_encoder" / "config.json")
    return CLIPTextModel(config).eval()


@pytest.fixture
def tiny_unet():
    return build_tiny_unet()


@pytest.fixture
def tiny_text_encoder():
    return build_tiny_text_encoder()


def unet_inputs(batch: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([10, 500][:batch]),
            torch.randn(batch, 7, 32, generator=g))


def text_ids(batch: int = 2, length: int = 77, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (batch, length), generator=g)
    ids[:, 0] = 49406
    ids[:, -1] = 49407
    return ids


@pytest.fixture(scope="module")
def vae():
    """The tiny SD VAE, counting the images it encodes (model.calls), for the latent-cache tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL.from_config(AutoencoderKL.load_config(ASSETS / "tiny-sd" / "vae")).eval()
    model.calls = 0
    original = model.encode

    def counting_encode(x, *args, **kwargs):
        model.calls += x.shape[0]
        return original(x, *args, **kwargs)
    model.encode = counting_encode
    return model


def count_calls(monkeypatch, owner, name: str) -> dict:
    """Replace owner.name by a wrapper that counts its calls in the returned {"n": ...} and calls the original."""
    calls, real = {"n": 0}, getattr(owner, name)

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def lycoris_full_preset_for_diffusers(monkeypatch):
    """LyCORIS' "full" preset minus TimestepEmbedding, which duplicates module names on a diffusers U-Net."""
    import lycoris.kohya as lycoris_kohya
    from lycoris.config import PRESET

    preset = dict(PRESET["full"])
    preset["unet_target_module"] = [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"]
    monkeypatch.setitem(lycoris_kohya.PRESET, "full", preset)
