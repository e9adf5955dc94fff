"""Helpers for the Hugging Face integration tests: tiny random models, parity checks."""
import copy

import torch

from numerics import assert_close_relative


def padded_batch(vocab_size, batch=3, length=11, side="right", pad_id=0, seed=0):
    """input_ids and attention_mask with ragged lengths (row 0 full, others shorter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        n = max(1, length - 3 * row)
        if side == "right":
            mask[row, n:] = 0
        else:
            mask[row, : length - n] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


def twin(model):
    """(original, accelerated) copies sharing nothing, from the same weights."""
    import fastpatch

    original = model
    accelerated = fastpatch.accelerate(copy.deepcopy(model))
    return original, accelerated


def assert_same_outputs_and_grads(original, accelerated, loss_fn, tol=1e-5, mask_out=None):
    """Forward values and every parameter gradient agree within ``tol`` relative.

    The outputs are contracted with a fixed random tensor: a plain ``sum()`` of LayerNorm
    outputs has an (almost) zero gradient, which would compare rounding noise.
    """
    out_a = loss_fn(original)
    out_b = loss_fn(accelerated)
    assert_close_relative(out_b.detach(), out_a.detach(), tol, "output")
    weights = torch.randn(out_a.shape, generator=torch.Generator().manual_seed(7), dtype=out_a.dtype)
    (out_a * weights).sum().backward()
    (out_b * weights).sum().backward()
    params_a = dict(original.named_parameters())
    # Some gradients are exactly zero in exact arithmetic (a key bias shifts every score of a
    # row equally); they are compared against the model's gradient scale instead.
    scale = max(p.grad.norm().item() for p in original.parameters() if p.grad is not None)
    for name, p in accelerated.named_parameters():
        ga, gb = params_a[name].grad, p.grad
        if ga is None:
            assert gb is None or gb.abs().max() == 0, f"{name}: gradient where original has none"
            continue
        if ga.norm().item() < tol * scale:
            assert (gb - ga).norm().item() <= tol * scale, f"grad of {name}: differs at model scale"
            continue
        assert_close_relative(gb, ga, tol, f"grad of {name}")
