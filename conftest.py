"""Shared pytest fixtures: a tiny random CLIP saved in the released state-dict format, so every
stage can be tested on CPU without downloads."""
import pytest
import torch

import clip_model

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=2)


def make_tiny_clip(seed=0, **overrides):
    torch.manual_seed(seed)
    return clip_model.CLIP(**{**TINY, **overrides}).eval()


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(make_tiny_clip().state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    return clip_model.load(tiny_clip_path)[0]
