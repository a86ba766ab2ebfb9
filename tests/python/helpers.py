"""Assertions shared by the sparge Python tests."""

from __future__ import annotations

import torch

from sparge.testing import cosine_similarity, relative_l1


def assert_close_to(out, ref, *, cos_min: float, rel_l1_max: float, context: str = "") -> None:
    """Cosine similarity and relative L1 of out vs ref within bounds; the message gives both and
    the worst element."""
    cos, rl1 = cosine_similarity(out, ref), relative_l1(out, ref)
    if cos >= cos_min and rl1 <= rel_l1_max:
        return
    diff = (out.double() - ref.double()).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    raise AssertionError(
        f"{context}: cos {cos:.6f} (min {cos_min}), rel L1 {rl1:.5f} (max {rel_l1_max}); worst element {worst}: "
        f"{float(out[worst]) if worst else 0.0} vs {float(ref[worst]) if worst else 0.0}"
    )


def assert_equal(a, b, context: str = "") -> None:
    """Bit-exact equality (NaN == NaN), naming the first differing element."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{context}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if a.dtype.is_floating_point:
        a_bits, b_bits = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
        same = bool(torch.equal(a_bits, b_bits))
    else:
        same = bool(torch.equal(a, b))
    if same:
        return
    diff = a.double().ne(b.double()) & ~(a.double().isnan() & b.double().isnan())
    idx = tuple(int(i) for i in torch.unravel_index(diff.nonzero()[0, 0], a.shape)) if diff.any() else "(bit pattern)"
    raise AssertionError(f"{context}: tensors differ, first at {idx}")
