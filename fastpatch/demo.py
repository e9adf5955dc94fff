"""``fastpatch demo``: accelerate small built-in models and show that nothing changed but speed.

Needs no download: the models are built from configs with random weights. On the CPU the
reference path runs (a correctness demo); on a GPU the CUDA kernels run and timings mean something.
"""
from __future__ import annotations

import copy
import time

import torch


def _timed(fn, repeats: int, device: str) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def run_demo(device: str | None = None) -> int:
    try:
        import transformers
    except ImportError:
        print("fastpatch demo needs transformers: pip install 'fastpatch[hf]'")
        return 1
    import fastpatch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    small = device == "cpu"
    torch.manual_seed(0)
    print(f"fastpatch {fastpatch.__version__} demo on {device} "
          f"({'reference path' if device == 'cpu' else 'CUDA kernels'})\n")

    # 1. BERT masked LM: same logits, same training losses
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=128 if small else 768, num_hidden_layers=2 if small else 12,
        num_attention_heads=4 if small else 12, intermediate_size=512 if small else 3072,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    original = transformers.BertForMaskedLM(config).to(device)
    accelerated = fastpatch.accelerate(copy.deepcopy(original))
    print(fastpatch.report(accelerated), "\n")
    batch, length = (4, 64) if small else (32, 128)
    ids = torch.randint(5, 1000, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[1:, length // 2:] = 0  # ragged batch: padding must not change anything
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, -100)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (original, accelerated)]
    print("step  loss (original)  loss (fastpatch)")
    worst = 0.0
    for step in range(5):
        losses = []
        for model, opt in zip((original, accelerated), opts):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        worst = max(worst, abs(losses[0] - losses[1]))
        print(f"{step:4d}  {losses[0]:15.6f}  {losses[1]:16.6f}")
    print(f"largest loss difference: {worst:.2e}\n")

    # 2. GPT-2 greedy generation: same tokens
    gpt_config = transformers.GPT2Config(vocab_size=1000, n_embd=128, n_layer=2, n_head=4,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gpt = transformers.GPT2LMHeadModel(gpt_config).to(device).eval()
    fast_gpt = fastpatch.accelerate(copy.deepcopy(gpt))
    prompt = torch.randint(5, 1000, (2, 8), device=device)
    a = gpt.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    b = fast_gpt.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    same = torch.equal(a, b)
    print(f"GPT-2 greedy generation, 16 new tokens: identical tokens = {same}\n")

    # 3. timing of a training step (meaningful on a GPU)
    def train_step(model, opt):
        def step():
            opt.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
        return step

    repeats = 3 if small else 20
    t_orig = _timed(train_step(original, opts[0]), repeats, device)
    t_fast = _timed(train_step(accelerated, opts[1]), repeats, device)
    print(f"BERT training step: original {t_orig:.1f} ms, fastpatch {t_fast:.1f} ms "
          f"({t_orig / t_fast:.2f}x){'  [CPU reference path: not a speed measurement]' if small else ''}")
    ok = same and worst <= 1e-4 * 10
    print("\nOK" if ok else "\nMISMATCH: please report this")
    return 0 if ok else 1
