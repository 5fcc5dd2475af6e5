"""Shared pytest fixtures: a tiny random CLIP saved in the released state-dict format, so every
stage can be tested on CPU without downloads.

pytest.ini runs the test files in parallel processes (pytest-xdist), so each process and every script a
test starts uses one CPU thread: tiny models gain nothing from more, and extra threads on a shared
machine make them many times slower."""
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
