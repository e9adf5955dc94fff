"""fastpatch.ops.cross_entropy against fairseq's definition and torch's cross_entropy, written here."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from fastpatch.ops import cross_entropy, fused_linear_cross_entropy, label_smoothed_cross_entropy
from numerics import assert_close_relative, assert_within_factor_of_torch

# The package re-exports the function `cross_entropy` under the module's own name.
ce_module = importlib.import_module("fastpatch.ops.cross_entropy")

REDUCTIONS = ["sum", "mean", "none"]


def naive_fairseq(logits, target, epsilon, ignore_index, reduction, compute=torch.float64):
    """fairseq 0.12 ``label_smoothed_nll_loss`` on ``log_softmax`` in ``compute`` precision.

    Ignored targets may lie outside [0, V) here (-100), so they gather at 0 and are masked after.
    """
    lprobs = torch.log_softmax(logits.to(compute), dim=-1)
    target = target.unsqueeze(-1)
    pad_mask = target.eq(ignore_index)
    nll_loss = -lprobs.gather(dim=-1, index=target.masked_fill(pad_mask, 0))
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    nll_loss = nll_loss.masked_fill(pad_mask, 0.0).squeeze(-1)
    smooth_loss = smooth_loss.masked_fill(pad_mask, 0.0).squeeze(-1)
    eps_i = epsilon / (lprobs.size(-1) - 1)
    loss = (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss
    if reduction == "none":
        return loss, nll_loss
    loss, nll_loss = loss.sum(), nll_loss.sum()
    if reduction == "mean":
        count = (~pad_mask).sum()
        loss, nll_loss = loss / count, nll_loss / count
    return loss, nll_loss


def random_targets(shape, vocab, ignore_index, ignore_fraction=0.25):
    target = torch.randint(0, vocab, shape)
    target[torch.rand(shape) < ignore_fraction] = ignore_index
    return target


def upstream(outputs):
    """Random upstream gradients for (loss, nll): both outputs receive gradient."""
    return [torch.randn_like(o) for o in outputs]


def grads_of(outputs, inputs, grads):
    total = sum((o * g).sum() for o, g in zip(outputs, grads))
    return torch.autograd.grad(total, inputs)


# ------------------------------------------------------------------ label-smoothed, fairseq
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 33), (1, 2), (4, 3, 1, 8)])
@pytest.mark.parametrize("ignore_index", [-100, 1])  # fairseq passes padding_idx, a real class
def test_label_smoothed_matches_fairseq_formula(epsilon, reduction, shape, ignore_index):
    logits = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_(True)
    target = random_targets(shape[:-1], shape[-1], ignore_index)
    target.view(-1)[0] = 0  # at least one counted row, so "mean" is finite
    out = label_smoothed_cross_entropy(logits, target, epsilon, ignore_index, reduction)
    ref = naive_fairseq(logits, target, epsilon, ignore_index, reduction)
    for name, a, b in zip(("loss", "nll_loss"), out, ref):
        assert a.dtype == torch.float64 and a.shape == b.shape
        assert_close_relative(a, b, 1e-12, name)
    g = upstream(out)
    for a, b in zip(grads_of(out, [logits], g), grads_of(ref, [logits], g)):
        assert_close_relative(a, b, 1e-10, "grad logits")


def test_label_smoothed_fp32_and_int32_target():
    logits = torch.randn(64, 1001)
    target = random_targets((64,), 1001, -100).int()
    out = label_smoothed_cross_entropy(logits, target, 0.1)
    ref = naive_fairseq(logits, target.long(), 0.1, -100, "sum")
    assert out[0].dtype == torch.float32
    for a, b in zip(out, ref):
        assert_close_relative(a, b, 1e-6)


def test_half_logits_give_fp32_loss_on_cpu_reference():
    logits = torch.randn(5, 24, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 24, (5,))
    loss, nll = label_smoothed_cross_entropy(logits, target, 0.1)
    assert loss.dtype == nll.dtype == torch.float32
    ref = naive_fairseq(logits.detach(), target, 0.1, -100, "sum")
    assert_close_relative(loss, ref[0], 1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == torch.bfloat16


def test_nll_loss_alone_is_differentiable():
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (6,))
    _, nll = label_smoothed_cross_entropy(logits, target, 0.2)
    (grad,) = torch.autograd.grad(nll, logits)
    (expected,) = torch.autograd.grad(naive_fairseq(logits, target, 0.2, -100, "sum")[1], logits)
    assert_close_relative(grad, expected, 1e-12)


def test_ignored_rows_contribute_nothing_even_with_non_finite_logits():
    logits = torch.randn(4, 10, dtype=torch.float64)
    logits[1] = math.inf
    logits[2, 3] = math.nan
    logits.requires_grad_(True)
    target = torch.tensor([3, -100, -100, 7])
    loss, nll = label_smoothed_cross_entropy(logits, target, 0.1, reduction="none")
    assert loss[1] == loss[2] == nll[1] == nll[2] == 0
    (grad,) = torch.autograd.grad(loss.sum() + nll.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[1:3] == 0).all()
    ref = naive_fairseq(logits.detach()[[0, 3]], target[[0, 3]], 0.1, -100, "none")
    assert_close_relative(loss[[0, 3]], ref[0], 1e-12)


def test_all_rows_ignored():
    logits = torch.randn(3, 5, requires_grad=True)
    target = torch.full((3,), -100)
    loss, nll = label_smoothed_cross_entropy(logits, target, 0.1)
    assert loss.item() == 0 and nll.item() == 0
    assert torch.isnan(label_smoothed_cross_entropy(logits, target, reduction="mean")[0])
    assert torch.isnan(F.cross_entropy(logits, target))  # the same convention as torch
    loss.backward()
    assert (logits.grad == 0).all()


def test_empty_batch():
    logits = torch.randn(0, 7, requires_grad=True)
    loss, nll = label_smoothed_cross_entropy(logits, torch.zeros(0, dtype=torch.long), 0.1)
    assert loss.item() == 0 and nll.item() == 0
    loss.backward()
    assert logits.grad.shape == (0, 7)


def test_out_of_range_target_raises_on_cpu():
    logits = torch.randn(3, 5)
    with pytest.raises(ValueError, match="target"):
        label_smoothed_cross_entropy(logits, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="target"):
        cross_entropy(logits, torch.tensor([0, -2, 1]))


# ------------------------------------------------------------------ cross_entropy, torch's
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy_matches_torch(label_smoothing, reduction, ignore_index):
    logits = torch.randn(11, 17, dtype=torch.float64, requires_grad=True)
    target = random_targets((11,), 17, ignore_index)
    target[0] = 5
    kwargs = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    out = cross_entropy(logits, target, **kwargs)
    ref = F.cross_entropy(logits, target, **kwargs)
    assert_close_relative(out, ref, 1e-12, "loss")
    g = torch.randn_like(out)
    (a,) = torch.autograd.grad(out, logits, g)
    (b,) = torch.autograd.grad(ref, logits, g)
    assert_close_relative(a, b, 1e-10, "grad logits")


def test_cross_entropy_leading_shape_and_dtype():
    logits = torch.randn(2, 3, 29)
    target = torch.randint(0, 29, (2, 3))
    out = cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
    ref = F.cross_entropy(logits.reshape(-1, 29), target.reshape(-1), reduction="none", label_smoothing=0.1)
    assert out.shape == (2, 3)
    assert_close_relative(out.reshape(-1), ref, 1e-6)
    half = cross_entropy(logits.to(torch.bfloat16), target)
    assert half.dtype == torch.bfloat16


def test_gradcheck():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1, -100, 6, 0, 3])
    assert torch.autograd.gradcheck(lambda x: label_smoothed_cross_entropy(x, target, 0.1, reduction="none"), (logits,))
    assert torch.autograd.gradcheck(lambda x: label_smoothed_cross_entropy(x, target, 0.3, reduction="mean"), (logits,))
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, target, label_smoothing=0.2), (logits,))


# ------------------------------------------------------------ fused linear + cross-entropy
@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 3 rows (fp64, V = 37), so the chunk loop runs several times."""
    monkeypatch.setattr(ce_module, "_CHUNK_LOGITS_BYTES", 3 * 37 * 8)


def naive_linear_loss(hidden, weight, bias, target, epsilon, ignore_index, reduction):
    logits = hidden.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    return naive_fairseq(logits, target, epsilon, ignore_index, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_linear_matches_naive(tiny_chunks, reduction, epsilon, with_bias):
    hidden = torch.randn(2, 7, 13, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 13, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=True) if with_bias else None
    target = random_targets((2, 7), 37, -100)
    target[0, 0] = 4
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    out = fused_linear_cross_entropy(hidden, weight, target, bias, epsilon, -100, reduction)
    ref = naive_linear_loss(hidden, weight, bias, target, epsilon, -100, reduction)
    for name, a, b in zip(("loss", "nll_loss"), out, ref):
        assert_close_relative(a, b, 1e-12, name)
    g = upstream(out)
    for name, a, b in zip(("hidden", "weight", "bias"), grads_of(out, inputs, g), grads_of(ref, inputs, g)):
        assert_close_relative(a, b, 1e-10, f"grad {name}")
    # only loss's gradient (nll's stays None), as fairseq trains
    loss_only = fused_linear_cross_entropy(hidden, weight, target, bias, epsilon, -100, reduction)[0]
    ref = naive_linear_loss(hidden, weight, bias, target, epsilon, -100, reduction)[0]
    for a, b in zip(torch.autograd.grad(loss_only.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        assert_close_relative(a, b, 1e-10, "grad via loss only")


def test_fused_linear_partial_requires_grad_and_no_grad(tiny_chunks):
    hidden = torch.randn(10, 13, dtype=torch.float64)
    weight = torch.randn(37, 13, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 37, (10,))
    loss, _ = fused_linear_cross_entropy(hidden, weight, target, epsilon=0.1)
    (grad,) = torch.autograd.grad(loss, weight)
    (ref,) = torch.autograd.grad(naive_linear_loss(hidden, weight, None, target, 0.1, -100, "sum")[0], weight)
    assert_close_relative(grad, ref, 1e-10)
    with torch.no_grad():
        loss2, _ = fused_linear_cross_entropy(hidden, weight, target, epsilon=0.1)
    assert not loss2.requires_grad
    assert_close_relative(loss2, loss.detach(), 1e-14)


def test_fused_linear_fp32_and_padding_index(tiny_chunks):
    hidden = torch.randn(3, 5, 13, requires_grad=True)
    weight = torch.randn(37, 13, requires_grad=True)
    target = random_targets((3, 5), 37, 1)
    target[0, 0] = 2
    out = fused_linear_cross_entropy(hidden, weight, target, None, 0.1, 1, "mean")
    ref = naive_linear_loss(hidden, weight, None, target, 0.1, 1, "mean")
    assert out[0].dtype == torch.float32
    for a, b in zip(out, ref):
        assert_close_relative(a, b, 1e-6)


def test_fused_linear_under_autocast_casts_like_linear():
    hidden = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)  # fp32 master weight, as AMP keeps it
    target = torch.randint(0, 37, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = fused_linear_cross_entropy(hidden, weight, target, epsilon=0.1)
        ref, _ = naive_fairseq(F.linear(hidden, weight), target, 0.1, -100, "sum", compute=torch.float32)
    assert loss.dtype == torch.float32
    assert_close_relative(loss, ref, 1e-5)
    loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32


def test_fused_linear_gradcheck(tiny_chunks):
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(37, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([3, -100, 36, 0, 3])
    for reduction in ("sum", "none"):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_cross_entropy(h, w, target, b, 0.1, reduction=reduction),
            (hidden, weight, bias))


def test_chunks_cover_rows_within_budget():
    for rows, vocab, size in [(8192, 50257, 2), (1, 50257, 2), (10, 7, 8), (8191, 32000, 4)]:
        chunks = ce_module._chunks(rows, vocab, size)
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
        lengths = [e - s for s, e in chunks]
        assert max(lengths) - min(lengths) <= 1 or len(chunks) == 1 or lengths[-1] < lengths[0]
        assert max(lengths) == 1 or max(lengths) * vocab * size <= ce_module._CHUNK_LOGITS_BYTES
    assert ce_module._chunks(0, 10, 4) == []


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("bad, error, name", [
    (dict(logits=[1.0]), TypeError, "logits"),
    (dict(logits=torch.ones(4, 5, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.ones(4, 0)), ValueError, "logits"),
    (dict(target=torch.ones(4)), TypeError, "target"),
    (dict(target=torch.ones(5, dtype=torch.long)), ValueError, "target"),
    (dict(epsilon=1.0), ValueError, "epsilon"),
    (dict(epsilon="0.1"), TypeError, "epsilon"),
    (dict(logits=torch.ones(4, 1)), ValueError, "logits"),  # V = 1 with smoothing: eps / (V - 1)
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_label_smoothed_bad_input_names_the_argument(bad, error, name):
    kwargs = dict(logits=torch.ones(4, 5), target=torch.zeros(4, dtype=torch.long), epsilon=0.1)
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        label_smoothed_cross_entropy(**kwargs)


@pytest.mark.parametrize("bad, error, name", [
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(label_smoothing=None), TypeError, "label_smoothing"),
    (dict(target=torch.zeros(4, 5)), TypeError, "target"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
])
def test_cross_entropy_bad_input_names_the_argument(bad, error, name):
    kwargs = dict(logits=torch.ones(4, 5), target=torch.zeros(4, dtype=torch.long))
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        cross_entropy(**kwargs)


@pytest.mark.parametrize("bad, error, name", [
    (dict(hidden=torch.ones(4, 8, dtype=torch.int32)), TypeError, "hidden"),
    (dict(weight=torch.ones(6, 7)), ValueError, "weight"),
    (dict(weight=torch.ones(6, 8, dtype=torch.float64)), TypeError, "weight"),
    (dict(bias=torch.ones(5)), ValueError, "bias"),
    (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target"),
    (dict(reduction="max"), ValueError, "reduction"),
])
def test_fused_linear_bad_input_names_the_argument(bad, error, name):
    kwargs = dict(hidden=torch.ones(4, 8), weight=torch.ones(6, 8), target=torch.zeros(4, dtype=torch.long))
    kwargs.update(bad)
    with pytest.raises(error, match=name):
        fused_linear_cross_entropy(**kwargs)


# ------------------------------------------------------------------- custom-op machinery
def test_opcheck():
    logits = torch.randn(6, 11, requires_grad=True)
    target = torch.tensor([1, -100, 10, 0, 5, 5])
    torch.library.opcheck(torch.ops.fastpatch.cross_entropy.default, (logits, target, 0.9, 0.01, -100))
    lse = torch.logsumexp(logits.detach(), -1)
    torch.library.opcheck(torch.ops.fastpatch.cross_entropy_backward.default,
                          (torch.randn(6), None, logits.detach(), target, lse, 0.9, 0.01, -100))
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(11, 4, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    torch.library.opcheck(torch.ops.fastpatch.fused_linear_cross_entropy.default,
                          (hidden, weight, bias, target, 0.9, 0.01, -100, True, True, True))
    torch.library.opcheck(torch.ops.fastpatch.fused_linear_cross_entropy_rows.default,
                          (hidden, weight, None, target, 0.9, 0.01, -100))
    torch.library.opcheck(torch.ops.fastpatch.fused_linear_cross_entropy_rows_backward.default,
                          (torch.randn(6), torch.randn(6), hidden.detach(), weight.detach(), bias.detach(),
                           target, lse, 0.9, 0.01, -100, True, True, True))


def test_torch_compile_fullgraph_traces_through_ops():
    logits = torch.randn(2, 6, 19, requires_grad=True)
    target = random_targets((2, 6), 19, -100)
    target[0, 0] = 3
    fn = torch.compile(lambda x, t: label_smoothed_cross_entropy(x, t, 0.1, reduction="mean"),
                       fullgraph=True, backend="aot_eager")
    loss, nll = fn(logits, target)
    ref = naive_fairseq(logits, target, 0.1, -100, "mean")
    assert_close_relative(loss, ref[0], 1e-6)
    (loss + nll).backward()
    (expected,) = torch.autograd.grad(ref[0] + ref[1], logits)
    assert_close_relative(logits.grad, expected, 1e-5)

    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(19, 8, requires_grad=True)
    for reduction in ("sum", "none"):
        flce = torch.compile(lambda h, w, t: fused_linear_cross_entropy(h, w, t, None, 0.1, -100, reduction),
                             fullgraph=True, backend="aot_eager")
        out = flce(hidden, weight, target)
        ref = naive_linear_loss(hidden, weight, None, target, 0.1, -100, reduction)
        assert_close_relative(out[0], ref[0], 1e-6)
        got = torch.autograd.grad(out[0].sum(), (hidden, weight))
        want = torch.autograd.grad(ref[0].sum(), (hidden, weight))
        for a, b in zip(got, want):
            assert_close_relative(a, b, 1e-5)
    plain = torch.compile(lambda x, t: cross_entropy(x, t, label_smoothing=0.1), fullgraph=True, backend="aot_eager")
    assert_close_relative(plain(logits, target), F.cross_entropy(logits.reshape(-1, 19), target.reshape(-1),
                                                                 label_smoothing=0.1), 1e-6)


# ----------------------------------------------------------------------------------- GPU
def _require_kernel(name, tensor):
    from fastpatch.ops._dispatch import kernel_for
    assert kernel_for(name, tensor) is not None, "CUDA kernel not loaded"


def fairseq_same_precision(logits, target, epsilon, ignore_index, reduction):
    """What a fairseq model runs: log_softmax of the upcast logits, fp32 arithmetic."""
    return naive_fairseq(logits, target, epsilon, ignore_index, reduction, compute=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 32000), (37, 50257), (3, 5, 1001), (2048, 50257), (8192, 32000), (64, 7)])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_cuda_label_smoothed_within_rule(dtype, shape, epsilon):
    logits = (2 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_(True)
    _require_kernel("cross_entropy_fwd", logits)
    target = random_targets(shape[:-1], shape[-1], -100, 0.1).cuda()
    target.view(-1)[0] = shape[-1] - 1
    ref_in = logits.detach().double().requires_grad_(True)
    plain_in = logits.detach().clone().requires_grad_(True)
    for reduction in ("sum", "none"):
        out = label_smoothed_cross_entropy(logits, target, epsilon, -100, reduction)
        ref = naive_fairseq(ref_in, target, epsilon, -100, reduction)
        plain = fairseq_same_precision(plain_in, target, epsilon, -100, reduction)
        for name, o, p, r in zip(("loss", "nll"), out, plain, ref):
            assert_within_factor_of_torch(o, p, r, f"{name} {reduction}")
        g = [torch.randn_like(o) for o in out]
        assert_within_factor_of_torch(grads_of(out, [logits], g)[0], grads_of(plain, [plain_in], g)[0],
                                      grads_of(ref, [ref_in], [x.double() for x in g])[0], "grad logits")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cuda_cross_entropy_within_rule(dtype, label_smoothing):
    logits = torch.randn(4096, 50257, device="cuda").to(dtype).requires_grad_(True)
    _require_kernel("cross_entropy_fwd", logits)
    target = random_targets((4096,), 50257, -100, 0.1).cuda()
    ref_in = logits.detach().double().requires_grad_(True)
    plain_in = logits.detach().clone().requires_grad_(True)
    out = cross_entropy(logits, target, label_smoothing=label_smoothing)
    ref = F.cross_entropy(ref_in, target, label_smoothing=label_smoothing)
    plain = F.cross_entropy(plain_in, target, label_smoothing=label_smoothing)
    assert out.dtype == dtype
    assert_within_factor_of_torch(out, plain, ref, "loss")
    g = torch.randn_like(out)
    assert_within_factor_of_torch(torch.autograd.grad(out, logits, g)[0], torch.autograd.grad(plain, plain_in, g)[0],
                                  torch.autograd.grad(ref, ref_in, g.double())[0], "grad logits")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [50257, 1001, 7])
def test_cuda_misaligned_rows_and_scalar_backward_path(dtype, vocab):
    # Logits starting one element past an aligned address: every row has a head to peel, and the
    # fresh (aligned) gradient buffer splits differently, which selects the scalar backward path.
    rows = 33
    buffer = torch.randn(rows * vocab + 1, device="cuda").to(dtype)
    logits = buffer[1:].view(rows, vocab).requires_grad_(True)
    assert logits.data_ptr() % 16 != 0
    target = random_targets((rows,), vocab, -100).cuda()
    out = label_smoothed_cross_entropy(logits, target, 0.1, reduction="none")
    ref_in = logits.detach().double().requires_grad_(True)
    ref = naive_fairseq(ref_in, target, 0.1, -100, "none")
    for o, r in zip(out, ref):
        assert_close_relative(o, r, 1e-5)
    g = [torch.randn_like(o) for o in out]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert_close_relative(grads_of(out, [logits], g)[0], grads_of(ref, [ref_in], [x.double() for x in g])[0], tol)


@pytest.mark.cuda
def test_cuda_bad_target_gives_nan_without_sync():
    logits = torch.randn(4, 100, device="cuda", requires_grad=True)
    target = torch.tensor([3, 100, -100, -5], device="cuda")
    loss, nll = label_smoothed_cross_entropy(logits, target, 0.1, reduction="none")
    assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(nll[[1, 3]]).all()
    assert torch.isfinite(loss[0]) and loss[2] == 0
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isnan(grad[1]).all() and (grad[2] == 0).all() and torch.isfinite(grad[0]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_fused_linear_within_rule(dtype, reduction, monkeypatch):
    # 4 chunks of 128 rows at V = 50257 (the real budget gives one chunk at this size).
    monkeypatch.setattr(ce_module, "_CHUNK_LOGITS_BYTES", 128 * 50257 * torch.finfo(dtype).bits // 8)
    hidden = (torch.randn(2, 256, 768, device="cuda") * 0.5).to(dtype).requires_grad_(True)
    weight = (torch.randn(50257, 768, device="cuda") * 0.05).to(dtype).requires_grad_(True)
    bias = (torch.randn(50257, device="cuda") * 0.1).to(dtype).requires_grad_(True)
    _require_kernel("cross_entropy_fwd_grad_", hidden)
    target = random_targets((2, 256), 50257, -100, 0.1).cuda()
    inputs = [hidden, weight, bias]
    ref_inputs = [t.detach().double().requires_grad_(True) for t in inputs]
    plain_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fused_linear_cross_entropy(hidden, weight, target, bias, 0.1, -100, reduction)
    ref = naive_linear_loss(*ref_inputs[:2], ref_inputs[2], target, 0.1, -100, reduction)
    plain = fairseq_same_precision(F.linear(*plain_inputs), target, 0.1, -100, reduction)
    # A summed loss is where eager's logit roundings cancel best (fp16: ~3e-8 relative); the
    # chunked GEMMs round the logits differently, so scalar losses get a 1e-5 relative floor,
    # far below what training can notice. Per-row losses ("none") keep the plain rule.
    floor = 1e-6 if reduction == "none" else 1e-5
    for name, o, p, r in zip(("loss", "nll"), out, plain, ref):
        assert_within_factor_of_torch(o, p, r, name, floor=floor)
    g = [torch.randn_like(o) for o in out]
    for name, o, p, r in zip(("hidden", "weight", "bias"), grads_of(out, inputs, g),
                             grads_of(plain, plain_inputs, g), grads_of(ref, ref_inputs, [x.double() for x in g])):
        assert_within_factor_of_torch(o, p, r, f"grad {name}")


@pytest.mark.cuda
def test_cuda_compile_fullgraph_and_graph_capture():
    logits = torch.randn(512, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = random_targets((512,), 32000, -100).cuda()
    fn = torch.compile(lambda x, t: label_smoothed_cross_entropy(x, t, 0.1), fullgraph=True)
    loss, nll = fn(logits, target)
    expected = label_smoothed_cross_entropy(logits, target, 0.1)
    torch.testing.assert_close(loss, expected[0])
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected[0], logits)[0])

    static_logits = logits.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside capture
        torch.autograd.grad(label_smoothed_cross_entropy(static_logits, target, 0.1)[0], static_logits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, _ = label_smoothed_cross_entropy(static_logits, target, 0.1)
        (static_grad,) = torch.autograd.grad(static_loss, static_logits)
    with torch.no_grad():
        static_logits.copy_(torch.randn_like(logits))
    graph.replay()
    loss_eager, _ = label_smoothed_cross_entropy(static_logits, target, 0.1)
    torch.testing.assert_close(static_loss, loss_eager)
    torch.testing.assert_close(static_grad, torch.autograd.grad(loss_eager, static_logits)[0])
