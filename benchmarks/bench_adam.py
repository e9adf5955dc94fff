"""Adam(W) optimizer step over a BERT-base parameter list (~110M params in 199 tensors).

Variants, each on its own copy of the parameters:
  eager      torch.optim.AdamW(foreach=True)
  compile    torch.optim.AdamW(fused=True), PyTorch's own fused CUDA step ("torch fused")
  compiled   torch.compile of the foreach AdamW step
  fastpatch  fastpatch.optim.FusedAdam

bf16 + master weights: fastpatch keeps fp32 masters in its state and takes bf16 grads directly;
the PyTorch variants do the same thing by hand (fp32 master params, bf16 grads copied in, the
AdamW step, masters copied back into the bf16 params), since torch.optim has no master weights.
"""
import torch

from fastpatch.optim import FusedAdam
from harness import Case

HIDDEN, FFN, LAYERS, VOCAB, POSITIONS = 768, 3072, 12, 30522, 512
LR, WEIGHT_DECAY = 1e-4, 0.01


def bert_base_shapes():
    shapes = [(VOCAB, HIDDEN), (POSITIONS, HIDDEN), (2, HIDDEN), (HIDDEN,), (HIDDEN,)]
    for _ in range(LAYERS):
        for _ in range(4):  # query, key, value, attention output
            shapes += [(HIDDEN, HIDDEN), (HIDDEN,)]
        shapes += [(HIDDEN,), (HIDDEN,), (FFN, HIDDEN), (FFN,), (HIDDEN, FFN), (HIDDEN,),
                   (HIDDEN,), (HIDDEN,)]
    return shapes + [(HIDDEN, HIDDEN), (HIDDEN,)]  # pooler


def _params_with_grads(shapes, dtype):
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def _torch_fp32(shapes, **adamw_kwargs):
    params = _params_with_grads(shapes, torch.float32)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **adamw_kwargs).step


def _torch_master(shapes, **adamw_kwargs):
    """Master weights in plain PyTorch: what FusedAdam(master_weights=True) does in one kernel."""
    params = _params_with_grads(shapes, torch.bfloat16)
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for m in masters:
        m.grad = torch.empty_like(m)
    opt = torch.optim.AdamW(masters, lr=LR, weight_decay=WEIGHT_DECAY, **adamw_kwargs)
    half_grads, master_grads = [p.grad for p in params], [m.grad for m in masters]
    half_params = [p.detach() for p in params]

    def step():
        torch._foreach_copy_(master_grads, half_grads)
        opt.step()
        torch._foreach_copy_(half_params, [m.detach() for m in masters])

    return step


def _fastpatch(shapes, dtype, master_weights):
    params = _params_with_grads(shapes, dtype)
    return FusedAdam(params, lr=LR, weight_decay=WEIGHT_DECAY, master_weights=master_weights).step


def cases():
    shapes = bert_base_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    label = f"bert-base {numel / 1e6:.0f}M params, {len(shapes)} tensors"
    fp32 = Case("adamw step", label, "float32", {
        "eager": _torch_fp32(shapes, foreach=True),
        "compile": _torch_fp32(shapes, fused=True),
        "compiled": torch.compile(_torch_fp32(shapes, foreach=True)),
        "fastpatch": _fastpatch(shapes, torch.float32, master_weights=False),
    }, note="compile = torch.optim.AdamW(fused=True); compiled = torch.compile(AdamW foreach step)")
    bf16 = Case("adamw step, fp32 master weights", label, "bfloat16", {
        "eager": _torch_master(shapes, foreach=True),
        "compile": _torch_master(shapes, fused=True),
        "compiled": torch.compile(_torch_master(shapes, foreach=True)),
        "fastpatch": _fastpatch(shapes, torch.bfloat16, master_weights=True),
    }, note="bf16 params/grads, fp32 masters + moments; compile = torch fused AdamW on the masters")
    return [fp32, bf16]
