"""fastpatch.ops.multi_tensor_adam_ against Adam written out here and against torch.optim."""
import math

import pytest
import torch

from fastpatch.ops import multi_tensor_adam_
from numerics import assert_close_relative, assert_within_factor_of_torch

SHAPES = [(), (1,), (7, 13), (3, 5, 8), (1023,), (2, 1, 33)]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def naive_adam(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, adamw, maximize):
    """Adam / AdamW in float64 as written in the papers (Kingma & Ba; Loshchilov & Hutter)."""
    p, g, m, v = (t.double() for t in (p, g, m, v))
    if maximize:
        g = -g
    if weight_decay:
        if adamw:
            p = p - lr * weight_decay * p
        else:
            g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    return p - lr * m_hat / (v_hat.sqrt() + eps), m, v


def make_state(shapes, dtype=torch.float64, state_dtype=None, device="cpu"):
    params = [torch.randn(s, dtype=dtype, device=device) for s in shapes]
    exp_avgs = [torch.zeros(s, dtype=state_dtype or dtype, device=device) for s in shapes]
    exp_avg_sqs = [torch.zeros(s, dtype=state_dtype or dtype, device=device) for s in shapes]
    return params, exp_avgs, exp_avg_sqs


@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_formula_fp64(adamw, weight_decay, maximize):
    params, exp_avgs, exp_avg_sqs = make_state(SHAPES)
    expected = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(params, exp_avgs, exp_avg_sqs)]
    for step in range(1, 4):
        grads = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=weight_decay,
                           step=step, adamw=adamw, maximize=maximize)
        expected = [naive_adam(p, g, m, v, **HYPER, weight_decay=weight_decay, step=step, adamw=adamw,
                               maximize=maximize) for (p, m, v), g in zip(expected, grads)]
    for got, want in zip(zip(params, exp_avgs, exp_avg_sqs), expected):
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), got, want):
            assert_close_relative(a, b, 1e-12, name)


@pytest.mark.parametrize("optimizer, adamw", [(torch.optim.AdamW, True), (torch.optim.Adam, False)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("maximize", [False, True])
def test_fp32_matches_torch_optim_over_20_steps(optimizer, adamw, weight_decay, maximize):
    params, exp_avgs, exp_avg_sqs = make_state(SHAPES, torch.float32)
    torch_params = [p.clone().requires_grad_(True) for p in params]
    opt = optimizer(torch_params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                    eps=HYPER["eps"], weight_decay=weight_decay, maximize=maximize)
    for step in range(1, 21):
        grads = [torch.randn(s) for s in SHAPES]
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        opt.step()
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=weight_decay,
                           step=step, adamw=adamw, maximize=maximize)
    for p, tp, m, v in zip(params, torch_params, exp_avgs, exp_avg_sqs):
        assert_close_relative(p, tp.detach(), 1e-6, "param")
        assert_close_relative(m, opt.state[tp]["exp_avg"], 1e-6, "exp_avg")
        assert_close_relative(v, opt.state[tp]["exp_avg_sq"], 1e-6, "exp_avg_sq")


def test_grads_are_not_modified_and_step_inf_disables_bias_correction():
    params, exp_avgs, exp_avg_sqs = make_state(SHAPES)
    grads = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    saved = [g.clone() for g in grads]
    expected = [naive_adam(p, g, m, v, **HYPER, weight_decay=0.01, step=1, adamw=True, maximize=True)
                for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    # bias correction off: the formula with step -> infinity, i.e. m_hat = m, v_hat = v
    unbiased = [naive_adam(p, g, m, v, **HYPER, weight_decay=0.01, step=math.inf, adamw=True,
                           maximize=True)[0] for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    params_inf = [p.clone() for p in params]
    state_inf = ([m.clone() for m in exp_avgs], [v.clone() for v in exp_avg_sqs])
    multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=0.01, step=1,
                       maximize=True)
    multi_tensor_adam_(params_inf, grads, *state_inf, **HYPER, weight_decay=0.01, step=math.inf,
                       maximize=True)
    for g, s in zip(grads, saved):
        assert torch.equal(g, s)
    for p, (want, _, _), p_inf, want_inf in zip(params, expected, params_inf, unbiased):
        assert_close_relative(p, want, 1e-12, "param")
        assert_close_relative(p_inf, want_inf, 1e-12, "param (step=inf)")


def test_master_weights_bf16_update_fp32_copy_and_round_into_param():
    shapes = [(5, 7), (33,), ()]
    masters = [torch.randn(s) for s in shapes]
    params = [m.to(torch.bfloat16) for m in masters]
    _, exp_avgs, exp_avg_sqs = make_state(shapes, torch.float32)
    expected = [(m.double(), torch.zeros(s, dtype=torch.float64), torch.zeros(s, dtype=torch.float64))
                for m, s in zip(masters, shapes)]
    for step in range(1, 6):
        grads = [torch.randn(s, dtype=torch.bfloat16) for s in shapes]
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=0.1, step=step,
                           master_params=masters)
        expected = [naive_adam(w, g, m, v, **HYPER, weight_decay=0.1, step=step, adamw=True,
                               maximize=False) for (w, m, v), g in zip(expected, grads)]
    for p, w, m, v, (want_w, want_m, want_v) in zip(params, masters, exp_avgs, exp_avg_sqs, expected):
        assert p.dtype == torch.bfloat16 and m.dtype == v.dtype == w.dtype == torch.float32
        assert_close_relative(w, want_w, 1e-6, "master")
        assert_close_relative(m, want_m, 1e-6, "exp_avg")
        assert_close_relative(v, want_v, 1e-6, "exp_avg_sq")
        assert torch.equal(p, w.to(torch.bfloat16)), "param must be the rounded master weight"


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32])
def test_half_params_without_master_compute_in_fp32(state_dtype):
    shapes = [(9, 4), (17,)]
    params, exp_avgs, exp_avg_sqs = make_state(shapes, torch.bfloat16, state_dtype)
    grads = [torch.randn(s, dtype=torch.bfloat16) for s in shapes]
    expected = [naive_adam(p, g, m, v, **HYPER, weight_decay=0.1, step=1, adamw=False, maximize=False)
                for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=0.1, step=1,
                       adamw=False)
    for p, m, v, (want_p, want_m, want_v) in zip(params, exp_avgs, exp_avg_sqs, expected):
        assert p.dtype == torch.bfloat16 and m.dtype == state_dtype
        # one rounding of the fp32 result: within half a bf16 ulp (2^-9 relative)
        torch.testing.assert_close(p.double(), want_p, rtol=2 ** -8, atol=0)
        torch.testing.assert_close(m.double(), want_m, rtol=2 ** -8, atol=0)
        torch.testing.assert_close(v.double(), want_v, rtol=2 ** -8, atol=0)


def test_mixed_dtypes_and_devices_are_grouped():
    # fp32, fp64 and bf16 params (bf16 grads for an fp32 param too) plus a meta-device group
    params = [torch.randn(6), torch.randn(5, dtype=torch.float64), torch.randn(4, dtype=torch.bfloat16),
              torch.randn(3), torch.empty(8, device="meta")]
    grads = [torch.randn(6), torch.randn(5, dtype=torch.float64), torch.randn(4, dtype=torch.bfloat16),
             torch.randn(3, dtype=torch.bfloat16), torch.empty(8, device="meta")]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    expected = [naive_adam(p, g, m, v, **HYPER, weight_decay=0.0, step=1, adamw=True, maximize=False)[0]
                for p, g, m, v in zip(params[:4], grads, exp_avgs, exp_avg_sqs)]
    multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=0.0, step=1)
    for p, want in zip(params[:4], expected):
        tol = 1e-2 if p.dtype == torch.bfloat16 else 1e-6
        assert_close_relative(p, want, tol, f"{p.dtype} param")


def test_non_contiguous_and_empty_tensors():
    base = torch.randn(6, 8, dtype=torch.float64)
    params = [base.t(), torch.randn(0, 3, dtype=torch.float64)]
    grads = [torch.randn(8, 6, dtype=torch.float64), torch.randn(0, 3, dtype=torch.float64)]
    exp_avgs = [torch.zeros(8, 6, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)]
    exp_avg_sqs = [torch.zeros(8, 6, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.float64)]
    want = naive_adam(base.t(), grads[0], exp_avgs[0], exp_avg_sqs[0], **HYPER, weight_decay=0.0,
                      step=2, adamw=True, maximize=False)[0]
    multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=0.0, step=2)
    assert_close_relative(base.t(), want, 1e-12, "transposed param")
    multi_tensor_adam_([], [], [], [], **HYPER, weight_decay=0.0, step=1)


def test_leaf_params_requiring_grad_and_autograd_untouched():
    p = torch.randn(10, requires_grad=True)
    multi_tensor_adam_([p], [torch.randn(10)], [torch.zeros(10)], [torch.zeros(10)], **HYPER,
                       weight_decay=0.0, step=1)
    assert p.requires_grad and p.grad_fn is None


def _good_args():
    p = [torch.randn(3, 4), torch.randn(5)]
    return dict(params=p, grads=[torch.randn_like(t) for t in p],
                exp_avgs=[torch.zeros_like(t) for t in p], exp_avg_sqs=[torch.zeros_like(t) for t in p],
                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


def _replace(args, name, index, value):
    lst = list(args[name])
    lst[index] = value
    args[name] = lst


@pytest.mark.parametrize("mutate, error, match", [
    (lambda a: a.update(params=torch.randn(3)), TypeError, "params"),
    (lambda a: _replace(a, "grads", 1, 2.0), TypeError, r"grads\[1\]"),
    (lambda a: a.update(exp_avgs=a["exp_avgs"][:1]), ValueError, "exp_avgs"),
    (lambda a: a.update(master_params=[torch.randn(3, 4)]), ValueError, "master_params"),
    (lambda a: _replace(a, "grads", 0, torch.randn(4, 3)), ValueError, r"grads\[0\]"),
    (lambda a: _replace(a, "exp_avg_sqs", 1, torch.zeros(5, device="meta")), ValueError,
     r"exp_avg_sqs\[1\]"),
    (lambda a: _replace(a, "params", 0, torch.ones(3, 4, dtype=torch.int64)), TypeError, r"params\[0\]"),
    (lambda a: _replace(a, "grads", 1, torch.randn(5).to_sparse()), ValueError, r"grads\[1\].*sparse"),
    (lambda a: _replace(a, "exp_avgs", 0, torch.zeros(3, 4, dtype=torch.bfloat16)), TypeError,
     r"exp_avgs\[0\]"),
    (lambda a: _replace(a, "exp_avg_sqs", 0, torch.zeros(3, 4, dtype=torch.float64)), TypeError,
     r"exp_avg_sqs\[0\]"),
    (lambda a: a.update(master_params=[torch.randn(3, 4, dtype=torch.float64), torch.randn(5)]),
     TypeError, r"master_params\[0\]"),
    (lambda a: a.update(lr=-1.0), ValueError, "lr"),
    (lambda a: a.update(lr=torch.tensor(1e-3)), TypeError, "lr"),
    (lambda a: a.update(beta1=1.0), ValueError, "beta1"),
    (lambda a: a.update(beta2=-0.1), ValueError, "beta2"),
    (lambda a: a.update(eps=float("nan")), ValueError, "eps"),
    (lambda a: a.update(weight_decay=-0.1), ValueError, "weight_decay"),
    (lambda a: a.update(step=0), ValueError, "step"),
    (lambda a: a.update(adamw="yes"), TypeError, "adamw"),
    (lambda a: a.update(maximize=1), TypeError, "maximize"),
])
def test_bad_input_names_the_argument(mutate, error, match):
    args = _good_args()
    mutate(args)
    with pytest.raises(error, match=match):
        multi_tensor_adam_(**args)


def test_bad_input_leaves_tensors_untouched():
    args = _good_args()
    before = [p.clone() for p in args["params"]]
    _replace(args, "grads", 1, torch.randn(6))
    with pytest.raises(ValueError):
        multi_tensor_adam_(**args)
    for p, b in zip(args["params"], before):
        assert torch.equal(p, b)


def test_master_weights_require_fp32_moments():
    args = _good_args()
    args["params"] = [p.to(torch.bfloat16) for p in args["params"]]
    args["grads"] = [g.to(torch.bfloat16) for g in args["grads"]]
    args["exp_avgs"] = [m.to(torch.bfloat16) for m in args["exp_avgs"]]
    args["exp_avg_sqs"] = [m.to(torch.bfloat16) for m in args["exp_avg_sqs"]]
    args["master_params"] = [p.float() for p in args["params"]]
    with pytest.raises(TypeError, match=r"exp_avgs\[0\].*float32 with master weights"):
        multi_tensor_adam_(**args)


def test_opcheck():
    args = _good_args()
    op = torch.ops.fastpatch.multi_tensor_adam_.default
    torch.library.opcheck(op, (args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], [],
                               1e-3, 0.9, 0.999, 1e-8, 0.01, 3.0, True, False))
    masters = [p.clone() for p in args["params"]]
    half = [p.to(torch.bfloat16) for p in args["params"]]
    torch.library.opcheck(op, (half, [g.to(torch.bfloat16) for g in args["grads"]], args["exp_avgs"],
                               args["exp_avg_sqs"], masters, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3.0,
                               False, True))


def test_torch_compile_fullgraph():
    args = _good_args()
    eager = {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in args.items()}

    def update(params, grads, exp_avgs, exp_avg_sqs):
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, lr=1e-2, beta1=0.9, beta2=0.99,
                           eps=1e-8, weight_decay=0.1, step=3, adamw=False)

    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    lists = ("params", "grads", "exp_avgs", "exp_avg_sqs")
    compiled(*(args[k] for k in lists))
    update(*(eager[k] for k in lists))
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(args[name], eager[name]):
            assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------- GPU
def _assert_kernel_loaded():
    from fastpatch.ops._dispatch import kernel_for
    probe = torch.zeros(1, device="cuda")
    assert kernel_for("multi_tensor_adam", probe) is not None, "CUDA kernel not loaded"


def _many_shapes():
    """200 tensors: odd and aligned sizes, scalars, multi-chunk tensors (chunks are 16384 elements);
    more tensors than one launch's argument block holds."""
    g = torch.Generator().manual_seed(1)
    shapes = [(), (1,), (3,), (768,), (769,), (16384,), (16385,), (3, 16384 + 7), (1000, 771), (30522, 64)]
    while len(shapes) < 200:
        rows, cols = torch.randint(1, 300, (2,), generator=g).tolist()
        shapes.append((rows, cols))
    return shapes


@pytest.mark.cuda
@pytest.mark.parametrize("adamw, weight_decay, maximize", [(True, 0.01, False), (False, 0.1, True),
                                                            (True, 0.0, True)])
def test_cuda_kernel_matches_torch_fused_fp32(adamw, weight_decay, maximize):
    _assert_kernel_loaded()
    shapes = _many_shapes()
    params, exp_avgs, exp_avg_sqs = make_state(shapes, torch.float32, device="cuda")
    torch_params = [p.clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = optimizer(torch_params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                    maximize=maximize, fused=True)
    ref_params, ref_m, ref_v = ([t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs))
    from fastpatch.ops.adam import _reference
    for step in range(1, 21):
        grads = [torch.randn(s, device="cuda") for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = g
        opt.step()
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, lr=1e-3, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=weight_decay, step=step, adamw=adamw,
                           maximize=maximize)
        _reference(ref_params, grads, ref_m, ref_v, [], 1e-3, 0.9, 0.999, 1e-8, weight_decay, step,
                   adamw, maximize)
    for i, (p, tp) in enumerate(zip(params, torch_params)):
        assert_close_relative(p, tp.detach(), 1e-6, f"param {i} {tuple(p.shape)} vs torch fused")
    # the moments against the same-formula reference (torch's fused kernel rounds 1 - beta2 in
    # fp32, which moves exp_avg_sq by ~1e-5 relative without changing the params' update)
    for name, got, want in (("param", params, ref_params), ("exp_avg", exp_avgs, ref_m),
                            ("exp_avg_sq", exp_avg_sqs, ref_v)):
        for i, (a, b) in enumerate(zip(got, want)):
            assert_close_relative(a, b, 1e-6, f"{name} {i} {tuple(a.shape)} vs reference")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_master_weights_match_fp32_adamw(dtype):
    _assert_kernel_loaded()
    shapes = _many_shapes()
    masters = [torch.randn(s, device="cuda") for s in shapes]
    params = [m.to(dtype) for m in masters]
    exp_avgs = [torch.zeros_like(m) for m in masters]
    exp_avg_sqs = [torch.zeros_like(m) for m in masters]
    fp32 = [m.clone().requires_grad_(True) for m in masters]
    opt = torch.optim.AdamW(fp32, lr=1e-3, weight_decay=0.01, fused=True)
    for step in range(1, 11):
        grads = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        for p, g in zip(fp32, grads):
            p.grad = g.float()
        opt.step()
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, lr=1e-3, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.01, step=step, master_params=masters)
    for i, (p, w, ref) in enumerate(zip(params, masters, fp32)):
        assert_close_relative(w, ref.detach(), 1e-6, f"master {i}")
        assert torch.equal(p, w.to(dtype)), f"param {i} must be the rounded master weight"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_params_within_rule_of_torch_fused(dtype):
    _assert_kernel_loaded()
    shapes = _many_shapes()[:40]
    start = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    params, exp_avgs, exp_avg_sqs = ([t.clone() for t in start], [torch.zeros_like(t) for t in start],
                                     [torch.zeros_like(t) for t in start])
    torch_params = [t.clone().requires_grad_(True) for t in start]
    opt = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.01, fused=True)
    ref = [(t.double(), torch.zeros_like(t, dtype=torch.float64), torch.zeros_like(t, dtype=torch.float64))
           for t in start]
    for step in range(1, 6):
        grads = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
        for p, g in zip(torch_params, grads):
            p.grad = g
        opt.step()
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, lr=1e-3, beta1=0.9, beta2=0.999,
                           eps=1e-8, weight_decay=0.01, step=step)
        ref = [naive_adam(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
                          step=step, adamw=True, maximize=False) for (p, m, v), g in zip(ref, grads)]
    # the update is tiny against the weights, so compare what each moved the weights by
    delta = lambda p, s: p.double() - s.double()  # noqa: E731
    for i, (p, tp, s, (want, _, _)) in enumerate(zip(params, torch_params, start, ref)):
        assert_within_factor_of_torch(delta(p, s), delta(tp.detach(), s), want - s.double(),
                                      f"param {i} {tuple(p.shape)}")


@pytest.mark.cuda
def test_cuda_unaligned_views_layouts_mixed_grad_dtype_and_devices():
    _assert_kernel_loaded()
    flat = torch.randn(40000, device="cuda")
    # contiguous views starting at odd offsets: the kernel's scalar path
    views = [flat[1:1 + 16385], flat[20000:20000 + 7], flat[30001:30001 + 999]]
    channels_last = torch.randn(4, 6, 5, 3, device="cuda").to(memory_format=torch.channels_last)
    transposed = torch.randn(9, 70, device="cuda").t()  # grads/moments contiguous: reference path
    params = views + [channels_last, transposed, torch.randn(33, device="cuda"), torch.randn(5)]
    grads = [torch.randn(p.shape, device="cuda", dtype=torch.bfloat16) for p in params[:-2]] + [
        torch.randn(33, device="cuda"), torch.randn(5)]
    grads[3] = grads[3].to(memory_format=torch.channels_last)  # the kernel walks it flat alike
    exp_avgs = [torch.rand_like(p) for p in params[:4]] + [torch.rand(p.shape, device=p.device)
                                                           for p in params[4:]]
    exp_avg_sqs = [torch.rand_like(m) for m in exp_avgs]
    expected = [naive_adam(p, g, m, v, **HYPER, weight_decay=0.1, step=4, adamw=True, maximize=False)
                for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **HYPER, weight_decay=0.1, step=4)
    for i, (p, m, v, (wp, wm, wv)) in enumerate(zip(params, exp_avgs, exp_avg_sqs, expected)):
        assert_close_relative(p.cpu(), wp.cpu(), 1e-6, f"param {i}")
        assert_close_relative(m.cpu(), wm.cpu(), 1e-6, f"exp_avg {i}")
        assert_close_relative(v.cpu(), wv.cpu(), 1e-6, f"exp_avg_sq {i}")


@pytest.mark.cuda
def test_cuda_graph_capture_and_compile():
    _assert_kernel_loaded()
    shapes = _many_shapes()[:100]
    params, exp_avgs, exp_avg_sqs = make_state(shapes, torch.float32, device="cuda")
    grads = [torch.randn(s, device="cuda") for s in shapes]
    eager = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=7)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    multi_tensor_adam_(*eager[:1], grads, *eager[1:], **kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        multi_tensor_adam_(params, grads, exp_avgs, exp_avg_sqs, **kwargs)
    for _ in range(3):
        graph.replay()
        multi_tensor_adam_(*eager[:1], grads, *eager[1:], **kwargs)
    torch.cuda.synchronize()
    for got, want in zip((params, exp_avgs, exp_avg_sqs), eager):
        for a, b in zip(got, want):
            assert torch.equal(a, b), "graph replay must equal eager updates"

    def update(ps, gs, ms, vs):
        multi_tensor_adam_(ps, gs, ms, vs, **kwargs)

    torch.compile(update, fullgraph=True)(params, grads, exp_avgs, exp_avg_sqs)
    update(*eager[:1], grads, *eager[1:])
    for got, want in zip((params, exp_avgs, exp_avg_sqs), eager):
        for a, b in zip(got, want):
            assert torch.equal(a, b), "compiled update must equal eager"
