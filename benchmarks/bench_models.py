"""Whole-model benchmarks: HF eager (SDPA) vs torch.compile vs fastpatch.accelerate, same run.

Training: bf16 autocast, fused AdamW, one full step (forward, backward, optimizer).
Inference: fp16 forward under no_grad.

    python benchmarks/bench_models.py [--out benchmarks/results] [--only bert-train ...]
"""
import argparse
import datetime
import gc
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import environment, peak_memory_mb, time_ms  # noqa: E402


def _variants(build):
    import fastpatch

    yield "eager", build
    yield "compile", lambda: torch.compile(build())
    yield "fastpatch", lambda: fastpatch.accelerate(build())


def _train_step(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _forward(model, batch):
    def step():
        with torch.no_grad():
            model(**batch)

    return step


def workloads():
    import transformers

    def bert_mlm():
        return transformers.BertForMaskedLM(transformers.BertConfig()).cuda().train()

    def gpt2_lm():
        return transformers.GPT2LMHeadModel(transformers.GPT2Config()).cuda().train()

    def bert_fp16():
        return transformers.BertModel(transformers.BertConfig()).cuda().half().eval()

    def mlm_batch(b, length):
        ids = torch.randint(1000, 30000, (b, length), device="cuda")
        labels = torch.where(torch.rand(b, length, device="cuda") < 0.15, ids, -100)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

    def lm_batch(b, length):
        ids = torch.randint(0, 50257, (b, length), device="cuda")
        return dict(input_ids=ids, labels=ids)

    def fwd_batch(b, length):
        ids = torch.randint(1000, 30000, (b, length), device="cuda")
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids))

    # most informative first: a run cut short by its time cap still reports these
    yield "bert-infer", "BERT-base fp16 forward", "1x128", bert_fp16, lambda: fwd_batch(1, 128), _forward
    yield "bert-infer", "BERT-base fp16 forward", "32x128", bert_fp16, lambda: fwd_batch(32, 128), _forward
    yield "bert-train", "BERT-base MLM train step", "32x128", bert_mlm, lambda: mlm_batch(32, 128), _train_step
    yield "gpt2-train", "GPT-2 124M LM train step", "8x1024", gpt2_lm, lambda: lm_batch(8, 1024), _train_step
    yield "bert-train", "BERT-base MLM train step", "8x512", bert_mlm, lambda: mlm_batch(8, 512), _train_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    env = environment()
    env["date"] = datetime.date.today().isoformat()
    rows = []
    for key, name, shape, build, make_batch, make_step in workloads():
        if args.only and key not in args.only:
            continue
        batch = make_batch()
        for variant, builder in _variants(build):
            torch.manual_seed(0)
            try:
                model = builder()
                step = make_step(model, batch)
                step()
                step()
                ms = time_ms(step, warmup_ms=100, rep_ms=500)
                mem = peak_memory_mb(step)
                rows.append(dict(workload=name, shape=shape, variant=variant, ms=ms, peak_mb=mem, note=""))
            except Exception as exc:
                rows.append(dict(workload=name, shape=shape, variant=variant, ms=None, peak_mb=None,
                                 note=f"failed: {type(exc).__name__}: {exc}"[:300]))
            finally:
                model = step = None
                gc.collect()
                torch.cuda.empty_cache()
            print(f"{name} {shape} {variant}: {rows[-1]['ms']}", flush=True)
            _write_json(args.out, env, rows)  # after every row: a run cut by its cap keeps them
    print(f"\n# models  device={env['device']} torch={env['torch']} commit={env['commit']} date={env['date']}")
    print(f"{'workload':28} {'shape':8} {'eager ms':>9} {'compile':>9} {'fused':>9} {'x eager':>8} {'x comp':>7} {'GB e/c/f':>16}")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["workload"], r["shape"]), {})[r["variant"]] = r
    for (name, shape), v in keyed.items():
        get = lambda k, f: (v.get(k) or {}).get(f)
        e, c, fu = get("eager", "ms"), get("compile", "ms"), get("fastpatch", "ms")
        fmt = lambda t: f"{t:9.2f}" if t else "     fail"
        sp = lambda a, b: f"{a / b:7.2f}x" if a and b else "       -"
        mems = "/".join(f"{(get(k, 'peak_mb') or 0) / 1024:.1f}" for k in ("eager", "compile", "fastpatch"))
        print(f"{name[:28]:28} {shape:8} {fmt(e)} {fmt(c)} {fmt(fu)} {sp(e, fu)} {sp(c, fu)} {mems:>16}")
    for r in rows:
        if r["note"]:
            print(f"  ! {r['workload']} {r['shape']} {r['variant']}: {r['note']}")
    plot(rows, os.path.join(args.out, "models.png"))


def _write_json(out_dir, env, rows):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "models.json"), "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = sorted({(r["workload"], r["shape"]) for r in rows}, key=str)
    variants = ["eager", "compile", "fastpatch"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.27
    for i, variant in enumerate(variants):
        vals = []
        for label in labels:
            match = [r for r in rows if (r["workload"], r["shape"]) == label and r["variant"] == variant]
            vals.append(match[0]["ms"] or 0 if match else 0)
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=variant)
    ax.set_xticks([x + width for x in range(len(labels))])
    ax.set_xticklabels([f"{w}\n{s}" for w, s in labels], fontsize=7)
    ax.set_ylabel("ms per step (lower is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
