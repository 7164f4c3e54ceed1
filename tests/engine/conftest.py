"""Fixtures for the engine tests: random-weight tiny CLIPs (see tests/support/engine.py), built once per session."""

from __future__ import annotations

import pytest
import torch

from car_backend.engine import ClipModel
from tests.support.engine import TINY_CLIP_CONFIG, random_clip


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread():
    """The engine tests run tiny tensors: one intra-op thread is as fast on an idle machine and avoids
    OpenMP's barrier spinning (10-20x slowdowns) when other processes load the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_models():
    """(proposal model, proposal tokenizer, classifier model, classifier tokenizer): two random tiny CLIPs."""
    proposal, proposal_tokenizer = random_clip(str(TINY_CLIP_CONFIG), seed=1)
    classifier, classifier_tokenizer = random_clip(str(TINY_CLIP_CONFIG), seed=2)
    return proposal, proposal_tokenizer, classifier, classifier_tokenizer


@pytest.fixture(scope="session")
def tiny_clips(tiny_models):
    """The same two models wrapped for the engine (shared text caches)."""
    proposal, proposal_tokenizer, classifier, classifier_tokenizer = tiny_models
    return ClipModel(proposal, proposal_tokenizer, "tiny-proposal"), ClipModel(classifier, classifier_tokenizer, "tiny-classifier")
