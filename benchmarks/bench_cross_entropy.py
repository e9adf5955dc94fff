"""Losses, forward+backward: eager vs torch.compile vs fastpatch.

* ``cross_entropy``: ``F.cross_entropy`` on [N, V] logits.
* ``label_smoothed_ce``: fairseq's criterion as fairseq runs it (``log_softmax`` of the logits
  upcast to fp32, gather, sum, eps = 0.1).
* ``linear+label_smoothed_ce``: the output projection (8192 x 768 hidden, tied 50257 x 768
  weight) followed by that loss; fastpatch never materialises the logits. Peak memory is the
  interesting column there.

Each case also has a "fastpatch-graph" variant: the same step captured in a CUDA graph, i.e. the
GPU time without Python/custom-op dispatch and launch overhead (in the JSON; the table shows the
three standard variants). When "fastpatch" is much slower than it, the step is host-bound.
"""
import torch
import torch.nn.functional as F

from fastpatch.ops import cross_entropy, fused_linear_cross_entropy, label_smoothed_cross_entropy
from harness import Case, fwd_bwd

LOGIT_SHAPES = {"gpt2 8192x50257": (8192, 50257), "llama 8192x32000": (8192, 32000)}
EPSILON = 0.1
PAD = 1  # fairseq's padding_idx


def fairseq_loss(logits, target):
    """fairseq 0.12 label_smoothed_nll_loss on get_normalized_probs(log_probs=True)."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    pad_mask = target.eq(PAD)
    nll_loss = nll_loss.masked_fill(pad_mask, 0.0).sum()
    smooth_loss = smooth_loss.masked_fill(pad_mask, 0.0).sum()
    eps_i = EPSILON / (lprobs.size(-1) - 1)
    return (1.0 - EPSILON - eps_i) * nll_loss + eps_i * smooth_loss, nll_loss


def linear_fairseq_loss(hidden, weight, target):
    return fairseq_loss(F.linear(hidden, weight), target)


def torch_ce(logits, target):
    return F.cross_entropy(logits, target, ignore_index=PAD)


def graphed(step):
    """``step`` captured in a CUDA graph on its first call (so a capture failure is reported by the
    harness as this variant's failure), then replayed."""
    state = {}

    def replay():
        if "graph" not in state:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up outside capture
                step()
            torch.cuda.current_stream().wait_stream(stream)
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                step()
        state["graph"].replay()

    return replay


def variants(eager, compiled, fused, *inputs):
    fused_step = fwd_bwd(fused, *inputs)
    return {"eager": fwd_bwd(eager, *inputs), "compile": fwd_bwd(compiled, *inputs),
            "fastpatch": fused_step, "fastpatch-graph": graphed(fused_step)}


def _targets(n, vocab):
    target = torch.randint(0, vocab, (n,), device="cuda")
    target[torch.rand(n, device="cuda") < 0.05] = PAD  # a little padding, as in real batches
    return target


def cases():
    compiled_ce = torch.compile(torch_ce)
    compiled_fairseq = torch.compile(fairseq_loss)
    compiled_linear = torch.compile(linear_fairseq_loss)
    out = []
    for name, (n, vocab) in LOGIT_SHAPES.items():
        for dtype in (torch.bfloat16, torch.float16):
            logits = torch.randn(n, vocab, device="cuda", dtype=dtype, requires_grad=True)
            target = _targets(n, vocab)
            dt = str(dtype).split(".")[-1]
            out.append(Case("cross_entropy fwd+bwd", name, dt, variants(
                torch_ce, compiled_ce, lambda x, t: cross_entropy(x, t, ignore_index=PAD), logits, target)))
            out.append(Case("label_smoothed_ce fwd+bwd", name, dt, variants(
                fairseq_loss, compiled_fairseq,
                lambda x, t: label_smoothed_cross_entropy(x, t, EPSILON, PAD), logits, target)))
    n, width, vocab = 8192, 768, 50257
    for dtype in (torch.bfloat16, torch.float16):
        hidden = (torch.randn(n, width, device="cuda") * 0.5).to(dtype).requires_grad_(True)
        weight = (torch.randn(vocab, width, device="cuda") * 0.05).to(dtype).requires_grad_(True)
        target = _targets(n, vocab)
        out.append(Case("linear+label_smoothed_ce fwd+bwd", f"{n}x{width} -> {vocab}", str(dtype).split(".")[-1],
                        variants(linear_fairseq_loss, compiled_linear,
                                 lambda h, w, t: fused_linear_cross_entropy(h, w, t, None, EPSILON, PAD),
                                 hidden, weight, target),
                        note="peak memory includes grad_hidden and grad_weight"))
    return out
