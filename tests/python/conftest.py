"""Shared fixtures of the sparge Python tests.

* Tests marked ``gpu`` are skipped only when ``torch.cuda.is_available()`` is False.
* ``seed``: a fresh random seed per test, shown in assertion messages to reproduce a failure.
* ``poison``: makes ``torch.empty`` return memory filled with a poison pattern (NaN for floats,
  -128 / 0x80808080 for integers), so an output element the backend forgets to write shows up.
* ``qkv``: structured inputs (sparge.testing.structured_qkv) with the test's seed.
"""

from __future__ import annotations

import os

import pytest
import torch

from sparge.testing import structured_qkv

GPU_SKIP_REASON = "needs a CUDA GPU: torch.cuda.is_available() is False"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


_POISON_BYTE = {torch.int8: 0x80, torch.int16: 0x80, torch.int32: 0x80, torch.int64: 0x80}


@pytest.fixture
def poison(monkeypatch):
    """Every torch.empty in the test returns poisoned memory."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        if x.numel() > 0 and x.dtype != torch.bool and x.device.type != "meta":
            x.view(-1).view(torch.uint8).fill_(_POISON_BYTE.get(x.dtype, 0xFF))
        return x

    monkeypatch.setattr(torch, "empty", poisoned_empty)


@pytest.fixture
def qkv(seed):
    """qkv(B, Hq, Hkv, Lq, Lk, D, **kwargs) -> structured (q, k, v) seeded with the test's seed."""

    def make(batch=1, heads_q=2, heads_kv=None, len_q=256, len_k=None, head_dim=64, **kwargs):
        return structured_qkv(batch, heads_q, heads_kv, len_q, len_k, head_dim, seed=seed, **kwargs)

    return make
