"""fastpatch.optim.FusedAdam against torch.optim.AdamW / Adam, step by step."""
import io

import pytest
import torch

from fastpatch.optim import FusedAdam
from numerics import assert_close_relative

SHAPES = [(), (1,), (7, 13), (3, 5, 8), (1023,), (64, 33)]


def make_params(shapes=SHAPES, dtype=torch.float32, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().to(dtype or p.dtype, copy=True).requires_grad_(True) for p in params]


def set_grads(param_lists, shapes, dtype=torch.float32, device="cpu"):
    """The same random gradient for the i-th param of every list."""
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    for params in param_lists:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype, copy=True)
    return grads


def assert_same_trajectory(ours, theirs, opt_ours, opt_theirs, tol=1e-6):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_relative(a.detach(), b.detach(), tol, f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_relative(opt_ours.state[a][key], opt_theirs.state[b][key], tol, f"{key} {i}")


@pytest.mark.parametrize("torch_optimizer, adam_w_mode", [(torch.optim.AdamW, True), (torch.optim.Adam, False)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_torch_optim_over_20_steps(torch_optimizer, adam_w_mode, weight_decay, maximize):
    ours = make_params()
    theirs = clone_params(ours)
    kwargs = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=weight_decay, maximize=maximize)
    opt = FusedAdam(ours, adam_w_mode=adam_w_mode, **kwargs)
    ref = torch_optimizer(theirs, **kwargs)
    for _ in range(20):
        set_grads([ours, theirs], SHAPES)
        opt.step()
        ref.step()
    assert_same_trajectory(ours, theirs, opt, ref)
    assert all(opt.state[p]["step"] == 20 for p in ours)


def test_param_groups_lr_scheduler_and_zero_grad():
    ours = make_params()
    theirs = clone_params(ours)

    def groups(params):
        return [{"params": params[:3]}, {"params": params[3:], "lr": 1e-2, "weight_decay": 0.3}]

    opt = FusedAdam(groups(ours), lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: 1.0 / (1 + s))
    for _ in range(8):
        set_grads([ours, theirs], SHAPES)
        opt.step()
        ref.step()
        sched.step()
        ref_sched.step()
        opt.zero_grad()
        assert all(p.grad is None for p in ours)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-2 / 9)
    assert_same_trajectory(ours, theirs, opt, ref)


def test_params_without_grad_are_skipped_and_keep_their_own_step():
    ours = make_params()
    theirs = clone_params(ours)
    opt = FusedAdam(ours, lr=1e-2, weight_decay=0.01)  # torch.optim.AdamW's default decay
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    for step in range(6):
        set_grads([ours, theirs], SHAPES)
        if step < 3:  # the last param gets gradients only from step 4 on
            ours[-1].grad = theirs[-1].grad = None
        opt.step()
        ref.step()
    assert opt.state[ours[0]]["step"] == 6 and opt.state[ours[-1]]["step"] == 3
    assert_same_trajectory(ours, theirs, opt, ref)
    untouched = torch.randn(3, requires_grad=True)
    opt.add_param_group({"params": [untouched]})
    before = untouched.detach().clone()
    opt.step()
    assert torch.equal(untouched, before) and len(opt.state[untouched]) == 0


def test_closure_runs_with_grad_enabled_and_returns_loss():
    x = torch.randn(16, 5)
    ours = [torch.randn(5, requires_grad=True)]
    theirs = clone_params(ours)
    opt = FusedAdam(ours, lr=1e-2)
    ref = torch.optim.Adam(theirs, lr=1e-2)

    def closure_for(w, optimizer):
        def closure():
            optimizer.zero_grad()
            loss = ((x @ w - 1.0) ** 2).mean()
            loss.backward()
            return loss
        return closure

    with torch.no_grad():  # step() must enable grad for the closure itself
        losses = [opt.step(closure_for(ours[0], opt)) for _ in range(50)]
    ref_losses = [ref.step(closure_for(theirs[0], ref)) for _ in range(50)]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=0)
    assert losses[-1] < losses[0]


def _round_trip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("master_weights", [False, True])
def test_state_dict_round_trip_resumes_identically(master_weights):
    dtype = torch.bfloat16 if master_weights else torch.float32
    params = make_params(dtype=dtype)
    opt = FusedAdam(params, lr=1e-2, weight_decay=0.05, master_weights=master_weights)
    for _ in range(5):
        set_grads([params], SHAPES, dtype)
        opt.step()
    saved = _round_trip(opt.state_dict())
    resumed_params = clone_params(params)
    resumed = FusedAdam(resumed_params, lr=0.5, weight_decay=0.0, master_weights=master_weights)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 1e-2 and resumed.param_groups[0]["weight_decay"] == 0.05
    for p in resumed_params:
        state = resumed.state[p]
        assert state["exp_avg"].dtype == (torch.float32 if master_weights else dtype)
        assert ("master_param" in state) == master_weights
        if master_weights:
            assert state["master_param"].dtype == torch.float32
    for _ in range(5):
        set_grads([params, resumed_params], SHAPES, dtype)
        opt.step()
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key in opt.state[a]:
            assert torch.equal(torch.as_tensor(opt.state[a][key]), torch.as_tensor(resumed.state[b][key])), key


def test_loads_torch_adamw_state_and_continues_like_it():
    ours = make_params()
    theirs = clone_params(ours)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        set_grads([theirs], SHAPES)
        ref.step()
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    opt = FusedAdam(ours, adam_w_mode=False)
    opt.load_state_dict(_round_trip(ref.state_dict()))
    assert opt.param_groups[0]["adam_w_mode"] is True  # from the checkpoint's decoupled_weight_decay
    for _ in range(4):
        set_grads([ours, theirs], SHAPES)
        opt.step()
        ref.step()
    assert_same_trajectory(ours, theirs, opt, ref)


def test_master_weights_bf16_track_fp32_adamw():
    shapes = [(33, 17), (129,), ()]
    ours = make_params(shapes, torch.bfloat16)
    fp32 = clone_params(ours, torch.float32)  # the fp32 run starts from the same (bf16) values
    opt = FusedAdam(ours, lr=1e-3, weight_decay=0.01, master_weights=True)
    ref = torch.optim.AdamW(fp32, lr=1e-3, weight_decay=0.01)
    for _ in range(20):
        set_grads([ours, fp32], shapes, torch.bfloat16)
        opt.step()
        ref.step()
    for p, r in zip(ours, fp32):
        state = opt.state[p]
        assert p.dtype == torch.bfloat16
        assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "master_param"))
        # fp32 master weights follow fp32 AdamW; the bf16 param is their rounding
        assert_close_relative(state["master_param"], r.detach(), 1e-6, "master")
        assert torch.equal(p, state["master_param"].to(torch.bfloat16))
        torch.testing.assert_close(p.float(), r.detach(), rtol=2 ** -8, atol=0)


def test_master_weights_leave_fp32_params_alone_in_mixed_group():
    params = [torch.randn(4, requires_grad=True), torch.randn(6, dtype=torch.bfloat16, requires_grad=True)]
    opt = FusedAdam(params, master_weights=True)
    params[0].grad, params[1].grad = torch.randn(4), torch.randn(6, dtype=torch.bfloat16)
    opt.step()
    assert "master_param" not in opt.state[params[0]] and "master_param" in opt.state[params[1]]
    assert opt.state[params[0]]["exp_avg"].dtype == torch.float32


def test_half_params_without_master_keep_state_in_their_dtype():
    p = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    opt = FusedAdam([p])
    p.grad = torch.randn(10, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.bfloat16 and "master_param" not in opt.state[p]


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FusedAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_amsgrad_not_offered():
    with pytest.raises(TypeError, match="amsgrad"):
        FusedAdam(make_params(), amsgrad=True)
    p = make_params()
    ref = torch.optim.AdamW(clone_params(p), amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdam(p).load_state_dict(ref.state_dict())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\]"),
    (dict(betas=(0.9, -0.5)), ValueError, r"betas\[1\]"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(adam_w_mode=1), TypeError, "adam_w_mode"),
    (dict(master_weights="yes"), TypeError, "master_weights"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        FusedAdam(make_params(), **kwargs)


def test_graph_capture_limitation_is_documented():
    doc = FusedAdam.__doc__
    assert "not CUDA-graph" in doc and "capturable" in doc


# ----------------------------------------------------------------------------------------- GPU
CUDA_SHAPES = [(), (1,), (768,), (769,), (3072, 768), (30522, 64), (16385,), (511, 3)]


@pytest.mark.cuda
def test_cuda_matches_torch_fused_adamw_fp32():
    ours = make_params(CUDA_SHAPES, device="cuda")
    theirs = clone_params(ours)
    opt = FusedAdam(ours, lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(theirs, lr=1e-3, weight_decay=0.01, fused=True)
    for _ in range(20):
        set_grads([ours, theirs], CUDA_SHAPES, device="cuda")
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_close_relative(a.detach(), b.detach(), 1e-6, f"param {i}")
        assert_close_relative(opt.state[a]["exp_avg"], ref.state[b]["exp_avg"], 1e-6, f"exp_avg {i}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_master_weights_track_fp32_adamw_and_round_trip(dtype):
    ours = make_params(CUDA_SHAPES, dtype, device="cuda")
    fp32 = clone_params(ours, torch.float32)
    opt = FusedAdam(ours, lr=1e-3, weight_decay=0.01, master_weights=True)
    ref = torch.optim.AdamW(fp32, lr=1e-3, weight_decay=0.01, fused=True)
    for _ in range(10):
        set_grads([ours, fp32], CUDA_SHAPES, dtype, device="cuda")
        opt.step()
        ref.step()
    for i, (p, r) in enumerate(zip(ours, fp32)):
        master = opt.state[p]["master_param"]
        assert_close_relative(master, r.detach(), 1e-6, f"master {i}")
        assert torch.equal(p, master.to(dtype))
    resumed_params = clone_params(ours)
    resumed = FusedAdam(resumed_params, master_weights=True)
    resumed.load_state_dict(_round_trip(opt.state_dict()))
    for _ in range(3):
        set_grads([ours, resumed_params], CUDA_SHAPES, dtype, device="cuda")
        opt.step()
        resumed.step()
    for a, b in zip(ours, resumed_params):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["master_param"], resumed.state[b]["master_param"])
