"""fastpatch.ops.transformer_embedding / fairseq_positions / sinusoidal_table against formulas
written here: nn.functional.embedding, fairseq's sinusoid math, F.layer_norm."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastpatch.ops import fairseq_positions, sinusoidal_table, transformer_embedding
from numerics import assert_close_relative, assert_within_factor_of_torch

PAD = 1  # fairseq's and RoBERTa's padding index


def naive_positions(input_ids, padding_idx):
    """fairseq.utils.make_positions."""
    mask = input_ids.ne(padding_idx).int()
    return (torch.cumsum(mask, 1).type_as(mask) * mask).long() + padding_idx


def naive_sinusoid_table(num, dim, padding_idx):
    """fairseq.modules.SinusoidalPositionalEmbedding.get_embedding."""
    half_dim = dim // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float) * -emb)
    emb = torch.arange(num, dtype=torch.float).unsqueeze(1) * emb.unsqueeze(0)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1).view(num, -1)
    if dim % 2 == 1:
        emb = torch.cat([emb, torch.zeros(num, 1)], dim=1)
    if padding_idx is not None:
        emb[padding_idx, :] = 0
    return emb


def naive(input_ids, token_weight, *, position_ids=None, position_weight=None, sinusoidal=False,
          padding_idx=None, token_type_ids=None, token_type_weight=None, scale=1.0,
          ln_weight=None, ln_bias=None, eps=1e-5, token_padding_idx=None, p=0.0):
    """The eager module stack the op replaces (nn.Embedding padding semantics for gradients)."""
    assert p == 0.0
    hidden = token_weight.shape[1]
    x = scale * F.embedding(input_ids, token_weight, padding_idx=token_padding_idx)
    if position_weight is not None:
        x = x + F.embedding(position_ids, position_weight, padding_idx=padding_idx)
    elif sinusoidal:
        table = naive_sinusoid_table(int(position_ids.max()) + 1, hidden, padding_idx)
        x = x + F.embedding(position_ids, table.to(device=x.device, dtype=x.dtype))
    if token_type_weight is not None:
        x = x + F.embedding(token_type_ids, token_type_weight)
    if ln_weight is not None:
        x = F.layer_norm(x, (hidden,), ln_weight, ln_bias, eps)
    return x


# name -> which pieces; every piece of the op appears in some config
CONFIGS = {
    "tokens": dict(),
    "bert": dict(learned=True, types=True, ln=True, ln_bias=True),
    "roberta": dict(learned=True, pad_positions=True, types=True, ln=True, ln_bias=True,
                    token_padding=True),
    "fairseq": dict(sinusoidal=True, pad_positions=True, scale=True),
    "fairseq_layernorm_embedding": dict(sinusoidal=True, pad_positions=True, scale=True, ln=True,
                                        ln_bias=True),
    "ln_without_bias": dict(learned=True, ln=True),
    "types_only": dict(types=True, scale=True),
}


def make_case(cfg, batch=3, seq=7, hidden=13, vocab=11, dtype=torch.float64, device="cpu",
              id_dtype=torch.int64, left_pad=False):
    """Keyword arguments for transformer_embedding/naive (input_ids padded with PAD) and the
    names of its float tensors, which require grad."""
    ids = torch.randint(0, vocab, (batch, seq))
    ids[ids == PAD] = 0
    for b in range(batch):
        n = max(1, seq - 2 * b)  # rows of different lengths; row 0 unpadded
        if left_pad:
            ids[b, :seq - n] = PAD
        else:
            ids[b, n:] = PAD
    kw = dict(input_ids=ids, token_weight=torch.randn(vocab, hidden))
    if cfg.get("learned") or cfg.get("sinusoidal"):
        if cfg.get("pad_positions"):
            kw["position_ids"] = naive_positions(ids, PAD)
            kw["padding_idx"] = PAD
        else:
            kw["position_ids"] = torch.arange(seq).unsqueeze(0).expand(batch, seq)
        if cfg.get("learned"):
            kw["position_weight"] = torch.randn(seq + PAD + 1, hidden)
        else:
            kw["sinusoidal"] = True
    if cfg.get("types"):
        kw["token_type_ids"] = torch.randint(0, 2, (batch, seq))
        kw["token_type_weight"] = torch.randn(2, hidden)
    if cfg.get("scale"):
        kw["scale"] = math.sqrt(hidden)
    if cfg.get("ln"):
        kw["ln_weight"] = 1 + 0.5 * torch.randn(hidden)
        if cfg.get("ln_bias"):
            kw["ln_bias"] = torch.randn(hidden)
    if cfg.get("token_padding"):
        kw["token_padding_idx"] = PAD
    for key, value in kw.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            kw[key] = value.to(dtype) if value.is_floating_point() else value.to(id_dtype)
    leaves = [k for k, v in kw.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for k in leaves:
        kw[k].requires_grad_(True)
    return kw, leaves


def detached(kw, dtype=None):
    """Copy of kw with fresh leaves (optionally cast)."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.detach().to(dtype or v.dtype).requires_grad_(True)
        out[k] = v
    return out


def grads_of(out, kw, leaves, grad):
    return torch.autograd.grad(out, [kw[k] for k in leaves], grad)


# ----------------------------------------------------------------------------------- positions
def test_fairseq_positions_left_and_right_padding():
    right = torch.tensor([[5, 6, 7, 8], [5, 6, PAD, PAD], [9, PAD, PAD, PAD]])
    left = torch.tensor([[5, 6, 7, 8], [PAD, PAD, 5, 6], [PAD, PAD, PAD, 9]])
    assert torch.equal(fairseq_positions(right, PAD),
                       torch.tensor([[2, 3, 4, 5], [2, 3, 1, 1], [2, 1, 1, 1]]))
    assert torch.equal(fairseq_positions(left, PAD),
                       torch.tensor([[2, 3, 4, 5], [1, 1, 2, 3], [1, 1, 1, 2]]))
    for ids in (right, left, right.int(), torch.randint(0, 4, (5, 33))):
        out = fairseq_positions(ids, PAD)
        assert out.dtype == torch.int64
        assert torch.equal(out, naive_positions(ids, PAD))
    assert torch.equal(fairseq_positions(left, 0), naive_positions(left, 0))


@pytest.mark.parametrize("dim", [4, 8, 13, 512])
def test_sinusoidal_table_matches_fairseq(dim):
    table = sinusoidal_table(40, dim, PAD)
    assert table.dtype == torch.float32 and table.shape == (40, dim)
    torch.testing.assert_close(table, naive_sinusoid_table(40, dim, PAD), rtol=0, atol=1e-6)
    half = dim // 2
    for pos in (0, 2, 39):  # element by element in double precision
        for col in range(dim):
            k = col % half if col < 2 * half else None
            angle = pos * math.exp(-k * math.log(10000) / (half - 1)) if k is not None else 0.0
            value = 0.0 if k is None else (math.sin(angle) if col < half else math.cos(angle))
            assert abs(table[pos, col].item() - value) < 2e-5, (pos, col)
    assert not table[PAD].any()
    assert sinusoidal_table(3, dim)[PAD].any()


# ---------------------------------------------------------------------------- forward/backward
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("hidden", [8, 13])
@pytest.mark.parametrize("left_pad", [False, True])
def test_forward_backward_match_formula(config, hidden, left_pad):
    kw, leaves = make_case(CONFIGS[config], hidden=hidden, left_pad=left_pad)
    out = transformer_embedding(**kw)
    ref_kw = detached(kw)
    expected = naive(**ref_kw)
    assert out.shape == (3, 7, hidden) and out.dtype == torch.float64
    assert_close_relative(out, expected, 1e-12, "forward")
    g = torch.randn_like(out)
    for name, a, b in zip(leaves, grads_of(out, kw, leaves, g), grads_of(expected, ref_kw, leaves, g)):
        assert_close_relative(a, b, 1e-10, f"grad {name}")


@pytest.mark.parametrize("config", ["bert", "fairseq_layernorm_embedding", "types_only"])
def test_gradcheck(config):
    kw, leaves = make_case(CONFIGS[config], batch=2, seq=4, hidden=6, vocab=5)
    kw.pop("token_padding_idx", None)  # padding rows get no gradient by design, see below
    if "position_weight" in kw:
        kw.pop("padding_idx", None)

    def fn(*tensors):
        return transformer_embedding(**{**kw, **dict(zip(leaves, tensors))})

    assert torch.autograd.gradcheck(fn, tuple(kw[k] for k in leaves))


def test_int32_ids_and_broadcast_ids_match_int64():
    kw, leaves = make_case(CONFIGS["bert"], id_dtype=torch.int32)
    kw["position_ids"] = torch.arange(7, dtype=torch.int32).unsqueeze(0)  # HF's [1, L]
    kw["token_type_ids"] = torch.zeros(1, 7, dtype=torch.int32)
    out = transformer_embedding(**kw)
    ref_kw = detached(kw)
    ref_kw.update(input_ids=kw["input_ids"].long(), position_ids=torch.arange(7).expand(3, 7),
                  token_type_ids=torch.zeros(3, 7, dtype=torch.long))
    expected = naive(**ref_kw)
    assert_close_relative(out, expected, 1e-12, "forward")
    g = torch.randn_like(out)
    for name, a, b in zip(leaves, grads_of(out, kw, leaves, g), grads_of(expected, ref_kw, leaves, g)):
        assert_close_relative(a, b, 1e-10, f"grad {name}")


def test_repeated_ids_accumulate_and_padding_rows_get_no_gradient():
    hidden = 5
    ids = torch.tensor([[3, 3, 3, PAD], [3, 0, PAD, PAD]])
    w = torch.randn(4, hidden, dtype=torch.float64, requires_grad=True)
    positions = naive_positions(ids, PAD)
    pw = torch.randn(8, hidden, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, hidden, dtype=torch.float64)
    out = transformer_embedding(ids, w, position_ids=positions, position_weight=pw,
                                padding_idx=PAD, scale=2.0, token_padding_idx=-3)  # -3 == PAD
    grad_w, grad_pw = torch.autograd.grad(out, (w, pw), g)
    expected_w = torch.zeros_like(w)
    expected_w[3] = 2.0 * (g[0, 0] + g[0, 1] + g[0, 2] + g[1, 0])
    expected_w[0] = 2.0 * g[1, 1]
    expected_pw = torch.zeros_like(pw)
    expected_pw[2] = g[0, 0] + g[1, 0]
    expected_pw[3] = g[0, 1] + g[1, 1]
    expected_pw[4] = g[0, 2]
    torch.testing.assert_close(grad_w, expected_w)
    torch.testing.assert_close(grad_pw, expected_pw)
    # without token_padding_idx the padding row is an ordinary row
    out = transformer_embedding(ids, w)
    (grad_w,) = torch.autograd.grad(out, (w,), g)
    torch.testing.assert_close(grad_w[PAD], g[0, 3] + g[1, 2] + g[1, 3])


def test_sinusoidal_needs_no_table_length():
    positions = torch.tensor([[PAD, 5000, 70000, 3]])
    ids = torch.tensor([[0, 1, 2, 3]])
    w = torch.randn(4, 16)
    out = transformer_embedding(ids, w, position_ids=positions, sinusoidal=True, padding_idx=PAD)
    table = naive_sinusoid_table(70001, 16, PAD)
    torch.testing.assert_close(out, w[ids] + table[positions], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 0], w[0])  # the padding position adds nothing


def test_only_requested_gradients_are_computed():
    kw, _ = make_case(CONFIGS["bert"], dtype=torch.float32)
    kw["token_weight"].requires_grad_(False)  # frozen vocabulary
    kw["ln_bias"].requires_grad_(False)
    out = transformer_embedding(**kw)
    out.sum().backward()
    assert kw["token_weight"].grad is None and kw["ln_bias"].grad is None
    ref_kw = detached(kw)
    naive(**ref_kw).sum().backward()
    for name in ("position_weight", "token_type_weight", "ln_weight"):
        assert_close_relative(kw[name].grad, ref_kw[name].grad, 1e-5, name)


def test_fp32_and_bf16_reference_path():
    kw, _ = make_case(CONFIGS["roberta"], hidden=40, dtype=torch.float32)
    assert_close_relative(transformer_embedding(**kw), naive(**detached(kw)), 1e-5, "fp32")
    low = detached(kw, torch.bfloat16)
    out = transformer_embedding(**low)
    assert out.dtype == torch.bfloat16
    assert_close_relative(out.float(), naive(**detached(kw)), 1e-2, "bf16")


def test_empty_batch():
    kw, leaves = make_case(CONFIGS["bert"], batch=1, seq=4)
    for key in ("input_ids", "position_ids", "token_type_ids"):
        kw[key] = kw[key][:0]
    out = transformer_embedding(**kw)
    assert out.shape == (0, 4, 13)
    grads = torch.autograd.grad(out.sum(), [kw[k] for k in leaves])
    assert all(not g.any() for g in grads)


# ------------------------------------------------------------------------------------ dropout
def test_dropout_statistics_and_gradient_uses_same_mask():
    p = 0.3
    kw, _ = make_case(CONFIGS["bert"], batch=20, seq=50, hidden=64, vocab=100,
                      dtype=torch.float32)
    out = transformer_embedding(**kw, p=p)
    ref_kw = detached(kw)
    clean = naive(**ref_kw)
    kept = out != 0
    assert abs((1 - kept.float().mean().item()) - p) < 0.01
    torch.testing.assert_close(out[kept], clean[kept].detach() / (1 - p))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (kw["token_weight"], kw["ln_weight"]), g)
    expected = torch.autograd.grad(clean, (ref_kw["token_weight"], ref_kw["ln_weight"]),
                                   g * kept / (1 - p))
    for a, b in zip(grads, expected):
        assert_close_relative(a, b, 1e-5, "grad through dropout")


def test_dropout_reproducible_with_seed_and_off_in_eval():
    kw, _ = make_case(CONFIGS["fairseq"], dtype=torch.float32)
    torch.manual_seed(1)
    a = transformer_embedding(**kw, p=0.5)
    b = transformer_embedding(**kw, p=0.5)
    torch.manual_seed(1)
    c = transformer_embedding(**kw, p=0.5)
    assert torch.equal(a, c) and not torch.equal(a, b)
    torch.testing.assert_close(transformer_embedding(**kw, p=0.5, training=False),
                               naive(**detached(kw)))


# ---------------------------------------------------------------------------------- bad input
def _bad_cases():
    ids = torch.tensor([[0, 2, 3]])
    w = torch.randn(4, 6)
    good = dict(input_ids=ids, token_weight=w)
    learned = dict(good, position_ids=torch.tensor([[0, 1, 2]]), position_weight=torch.randn(3, 6))
    types = dict(good, token_type_ids=torch.tensor([[0, 1, 0]]), token_type_weight=torch.randn(2, 6))
    return [
        (dict(good, input_ids=torch.tensor([[0, 4, 1]])), ValueError, "input_ids"),
        (dict(good, input_ids=torch.tensor([[0, -1, 1]])), ValueError, "input_ids"),
        (dict(good, input_ids=ids.float()), TypeError, "input_ids"),
        (dict(good, input_ids=ids[0]), ValueError, "input_ids"),
        (dict(good, input_ids=[[0, 1]]), TypeError, "input_ids"),
        (dict(good, token_weight=w.long()), TypeError, "token_weight"),
        (dict(good, token_weight=w[0]), ValueError, "token_weight"),
        (dict(learned, position_ids=torch.tensor([[0, 1, 3]])), ValueError, "position_ids"),
        (dict(learned, position_ids=torch.tensor([[0, 1]])), ValueError, "position_ids"),
        (dict(learned, position_ids=None), ValueError, "position_ids"),
        (dict(good, position_ids=torch.tensor([[0, 1, 2]])), ValueError, "position_ids"),
        (dict(learned, position_weight=torch.randn(3, 5)), ValueError, "position_weight"),
        (dict(learned, position_weight=torch.randn(3, 6).double()), TypeError, "position_weight"),
        (dict(learned, sinusoidal=True), ValueError, "sinusoidal"),
        (dict(good, position_ids=ids, sinusoidal=True, token_weight=torch.randn(4, 3)),
         ValueError, "sinusoidal"),
        (dict(good, position_ids=ids, sinusoidal=1), TypeError, "sinusoidal"),
        (dict(learned, padding_idx=-1), ValueError, "padding_idx"),
        (dict(learned, padding_idx=1.0), TypeError, "padding_idx"),
        (dict(types, token_type_ids=torch.tensor([[0, 2, 0]])), ValueError, "token_type_ids"),
        (dict(types, token_type_weight=None), ValueError, "token_type_weight"),
        (dict(good, scale="2"), TypeError, "scale"),
        (dict(good, scale=float("inf")), ValueError, "scale"),
        (dict(good, ln_bias=torch.randn(6)), ValueError, "ln_bias"),
        (dict(good, ln_weight=torch.randn(5)), ValueError, "ln_weight"),
        (dict(good, ln_weight=torch.randn(6).half()), TypeError, "ln_weight"),
        (dict(good, ln_weight=torch.randn(6), eps=0.0), ValueError, "eps"),
        (dict(good, p=1.0), ValueError, "p"),
        (dict(good, training=None), TypeError, "training"),
        (dict(good, token_padding_idx=4), ValueError, "token_padding_idx"),
        (dict(good, token_padding_idx=-5), ValueError, "token_padding_idx"),
    ]


@pytest.mark.parametrize("kwargs, error, name", _bad_cases())
def test_bad_input_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        transformer_embedding(**kwargs)


def test_bad_input_helpers():
    with pytest.raises(ValueError, match="padding_idx"):
        fairseq_positions(torch.tensor([[1, 2]]), -1)
    with pytest.raises(ValueError, match="input_ids"):
        fairseq_positions(torch.tensor([1, 2]), PAD)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_table(8, 3)


# ------------------------------------------------------------------------ custom op contracts
def _op_args(kw, p=0.0):
    return (kw["input_ids"], kw["token_weight"], kw.get("position_ids"), kw.get("position_weight"),
            kw.get("token_type_ids"), kw.get("token_type_weight"), kw.get("ln_weight"),
            kw.get("ln_bias"), kw.get("sinusoidal", False), kw.get("padding_idx"),
            kw.get("token_padding_idx"), float(kw.get("scale", 1.0)), 1e-5, p)


@pytest.mark.parametrize("config", ["roberta", "fairseq"])
def test_opcheck(config):
    kw, _ = make_case(CONFIGS[config], dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastpatch.transformer_embedding.default, _op_args(kw))
    out, mask, stats = torch.ops.fastpatch.transformer_embedding(*_op_args(kw))
    back = (torch.randn_like(out), mask, stats) + _op_args(kw)[:11] + (
        float(kw.get("scale", 1.0)), 0.0, True, True, True, True)
    torch.library.opcheck(torch.ops.fastpatch.transformer_embedding_backward.default,
                          tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in back))


def test_torch_compile_fullgraph_traces_through_op():
    kw, leaves = make_case(CONFIGS["roberta"], dtype=torch.float32)
    fn = torch.compile(lambda **k: transformer_embedding(**k), fullgraph=True, backend="aot_eager")
    out = fn(**kw)
    ref_kw = detached(kw)
    expected = naive(**ref_kw)
    assert_close_relative(out, expected, 1e-5, "forward")
    g = torch.randn_like(out)
    for name, a, b in zip(leaves, grads_of(out, kw, leaves, g), grads_of(expected, ref_kw, leaves, g)):
        assert_close_relative(a, b, 1e-5, f"grad {name}")


# ----------------------------------------------------------------------------------------- GPU
def _kernel_loaded():
    from fastpatch.ops._dispatch import kernel_for
    w = torch.zeros(1, 8, device="cuda")
    return kernel_for("embedding_fwd", w) is not None and kernel_for("embedding_bwd", w) is not None


GPU_SHAPES = [  # (batch, seq, hidden, vocab): 1 to 8192 tokens, hidden 64 to 12288, odd sizes
    (1, 1, 64, 50),
    (4, 37, 1001, 300),      # odd hidden: scalar path
    (32, 128, 768, 30522),   # BERT-base
    (8, 512, 1024, 40000),   # fairseq big
    (2, 4096, 4096, 1000),   # 8192 tokens
    (2, 33, 8192, 100),
    (2, 9, 2050, 100),       # hidden % 8 != 0 and > 2048: scalar path, rows recomputed
    (2, 5, 12288, 64),       # beyond the register cache: vector path, rows recomputed
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("config", ["bert", "roberta", "fairseq", "fairseq_layernorm_embedding"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_cuda_kernel_error_within_rule(dtype, config, shape):
    assert _kernel_loaded(), "CUDA kernels not loaded"
    batch, seq, hidden, vocab = shape
    kw, leaves = make_case(CONFIGS[config], batch=batch, seq=seq, hidden=hidden, vocab=vocab,
                           dtype=torch.float32, device="cuda")
    fused_kw, plain_kw, ref_kw = detached(kw, dtype), detached(kw, dtype), detached(kw, torch.float64)
    out = transformer_embedding(**fused_kw)
    plain = naive(**plain_kw)
    ref = naive(**ref_kw)
    assert out.dtype == dtype
    assert_within_factor_of_torch(out, plain, ref, "forward")
    g = torch.randn_like(out)
    for name, a, b, r in zip(leaves, grads_of(out, fused_kw, leaves, g),
                             grads_of(plain, plain_kw, leaves, g),
                             grads_of(ref, ref_kw, leaves, g.double())):
        assert_within_factor_of_torch(a, b, r, f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("hidden", [13, 64, 768])
def test_cuda_fp32_matches_cpu_reference(config, hidden):
    assert _kernel_loaded(), "CUDA kernels not loaded"
    kw, leaves = make_case(CONFIGS[config], batch=4, seq=33, hidden=hidden, vocab=50,
                           dtype=torch.float32, device="cuda", left_pad=True)
    out = transformer_embedding(**kw)
    cpu_kw = {k: (v.detach().cpu().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in kw.items()}
    expected = transformer_embedding(**cpu_kw)
    assert_close_relative(out.cpu(), expected, 1e-5, "forward")
    g = torch.randn_like(expected)
    for name, a, b in zip(leaves, grads_of(out, kw, leaves, g.cuda()), grads_of(expected, cpu_kw, leaves, g)):
        assert_close_relative(a.cpu(), b, 1e-5, f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [4, 5000])  # fewer / more table rows than tokens
def test_cuda_repeated_ids_accumulate(dtype, vocab):
    assert _kernel_loaded(), "CUDA kernels not loaded"
    ids = torch.full((16, 128), 3, device="cuda")
    ids[:, 64:] = PAD
    w = torch.randn(vocab, 256, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(16, 128, 256, device="cuda", dtype=dtype)
    out = transformer_embedding(ids, w, scale=0.5, token_padding_idx=PAD)
    (grad,) = torch.autograd.grad(out, (w,), g)
    expected = torch.zeros(vocab, 256, device="cuda", dtype=torch.float64)
    expected[3] = 0.5 * g[:, :64].double().sum((0, 1))
    assert_close_relative(grad, expected, 1e-3 if dtype == torch.float16 else 1e-6, "grad")
    assert not grad[PAD].any()


@pytest.mark.cuda
def test_cuda_unaligned_weights_take_the_scalar_path():
    assert _kernel_loaded(), "CUDA kernels not loaded"
    kw, leaves = make_case(CONFIGS["bert"], batch=4, seq=16, hidden=64, vocab=40,
                           dtype=torch.float16, device="cuda")
    storage = torch.randn(40 * 64 + 1, device="cuda", dtype=torch.float16)
    kw["token_weight"] = storage[1:].view(40, 64).requires_grad_(True)  # 2-byte offset
    ref_kw = detached(kw, torch.float64)
    out = transformer_embedding(**kw)
    plain_kw = detached(kw)
    assert_within_factor_of_torch(out, naive(**plain_kw), naive(**ref_kw), "forward")
    g = torch.randn_like(out)
    for name, a, r in zip(leaves, grads_of(out, kw, leaves, g),
                          grads_of(naive(**ref_kw), ref_kw, leaves, g.double())):
        assert_close_relative(a, r, 1e-2, f"grad {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dropout_statistics_reproducibility_and_mask_in_backward(dtype):
    assert _kernel_loaded(), "CUDA kernels not loaded"
    kw, _ = make_case(CONFIGS["bert"], batch=16, seq=512, hidden=770, vocab=1000, dtype=dtype,
                      device="cuda")
    torch.manual_seed(3)
    a = transformer_embedding(**kw, p=0.1)
    torch.manual_seed(3)
    b = transformer_embedding(**kw, p=0.1)
    c = transformer_embedding(**kw, p=0.1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert abs((1 - kept.float().mean().item()) - 0.1) < 0.005
    clean = transformer_embedding(**kw)
    torch.testing.assert_close(a[kept].float(), clean[kept].float() / 0.9, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(a)
    got = torch.autograd.grad(a, (kw["token_weight"], kw["ln_weight"]), g)
    want = torch.autograd.grad(clean, (kw["token_weight"], kw["ln_weight"]), g * kept / 0.9)
    for x, y in zip(got, want):
        assert_close_relative(x.float(), y.float(), 2e-2, "grad through dropout")


@pytest.mark.cuda
def test_cuda_out_of_range_ids_trap():
    # A device-side assert poisons the CUDA context, so it runs in a child process.
    code = ("import torch; from fastpatch.ops import transformer_embedding as te\n"
            "w = torch.randn(10, 64, device='cuda')\n"
            "te(torch.tensor([[1, 10]], device='cuda'), w)\n"
            "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "input_ids out of range" in proc.stderr or "device-side assert" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.cuda
def test_cuda_compile_fullgraph_and_graph_capture():
    assert _kernel_loaded(), "CUDA kernels not loaded"
    kw, leaves = make_case(CONFIGS["roberta"], batch=8, seq=128, hidden=768, vocab=30522,
                           dtype=torch.float16, device="cuda")
    fn = torch.compile(lambda **k: transformer_embedding(**k), fullgraph=True)
    out = fn(**kw)
    torch.testing.assert_close(out, transformer_embedding(**kw))
    grads = grads_of(out, kw, leaves, torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)

    static = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
              for k, v in kw.items()}
    step_leaves = [static[k] for k in leaves]

    def step():
        y = transformer_embedding(**static, p=0.1)
        return (y,) + torch.autograd.grad(y, step_leaves, torch.ones_like(y))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    first = captured[0].clone()
    graph.replay()
    assert not torch.equal(first, captured[0]), "dropout masks must change between graph replays"
    new_ids = torch.randint(2, 30522, static["input_ids"].shape, device="cuda")
    static["input_ids"].copy_(new_ids)
    graph.replay()
    y = captured[0]
    clean = transformer_embedding(**{**static, "input_ids": new_ids})
    kept = y != 0
    torch.testing.assert_close(y[kept].float(), clean[kept].float() / 0.9, rtol=2e-2, atol=2e-2)
