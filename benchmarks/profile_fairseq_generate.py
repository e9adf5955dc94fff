"""Where the time of fairseq's beam search goes: plain fairseq, the fused layers, the engine.

fairseq's own ``SequenceGenerator`` on a random ``transformer_wmt_en_de`` (fp16 on CUDA), over
three models of the same weights: the plain fairseq model, the model after
``fastpatch.accelerate`` (fused layers, fairseq's decoding loop), and ``EngineEnsemble`` over
the accelerated model (what ``lightseq-generate`` runs on CUDA). For each batch size, the
sentences are cut into batches in length order, left-padded as fairseq's translation task does,
and every path is timed three ways:

* cold: the first pass of a fresh generator (the engine's construction and its graph captures
  included), as a ``fairseq-generate`` process of that many batches pays it;
* warm: the median of ``--repeats`` later passes;
* new batches: then one pass over other sentences of the same length range (warm, but batch
  shapes not seen yet: what per-shape caches such as cuDNN's attention plans cost).

It also gives the share of a warm pass spent inside the model calls (synchronised timers around
them: this perturbs the overlap of host and device, so the plain wall time is measured apart),
the engine's graph captures and their cost, and with ``--profile`` torch.profiler's top
host-side ops for one batch. ``--min-len`` keeps hypotheses at a realistic length, as in
``bench_fairseq.py --parts generate``.

    python3 benchmarks/profile_fairseq_generate.py --batch 1 128 --src-len 5 60 [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from harness import environment  # noqa: E402

PATHS = ("fairseq", "fused layers", "engine")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_model(vocab: int, device, dtype):
    import argparse as ap

    from fairseq.data import Dictionary
    from fairseq.models.transformer import TransformerModel
    from fairseq.models.transformer.transformer_legacy import transformer_wmt_en_de

    d = Dictionary()
    for i in range(vocab - len(d)):
        d.add_symbol(f"w{i}")
    args = ap.Namespace(arch="transformer_wmt_en_de", share_all_embeddings=True, dropout=0.0)
    transformer_wmt_en_de(args)
    task = ap.Namespace(source_dictionary=d, target_dictionary=d)
    torch.manual_seed(0)
    model = TransformerModel.build_model(args, task).to(device=device, dtype=dtype).eval()
    return model, d


def make_batches(d, sentences: int, batch: int, lengths, seed: int, device):
    """``sentences`` random sources (lengths uniform in ``lengths``, EOS last), sorted by length
    and cut into batches of ``batch``, left-padded: fairseq's generation samples."""
    g = torch.Generator().manual_seed(seed)
    low, high = lengths
    sizes = torch.randint(low, high + 1, (sentences,), generator=g).sort().values.tolist()
    samples = []
    for first in range(0, sentences, batch):
        chunk = sizes[first:first + batch]
        width = max(chunk)
        src = torch.full((len(chunk), width), d.pad(), dtype=torch.int64)
        for row, n in enumerate(chunk):
            src[row, width - n:-1] = torch.randint(d.nspecial, len(d), (n - 1,), generator=g)
            src[row, -1] = d.eos()
        samples.append({"net_input": {"src_tokens": src.to(device),
                                      "src_lengths": torch.tensor(chunk, device=device)}})
    return samples


@contextmanager
def timed_model_calls(ensemble, totals, device):
    """Adds the synchronised time of every encoder/decoder call of ``ensemble`` to ``totals``."""
    names = ("forward_encoder", "forward_decoder", "reorder_encoder_out", "reorder_incremental_state")
    originals = {name: getattr(ensemble, name) for name in names}

    def wrap(name, function):
        def call(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            sync(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return result
        return call

    for name, function in originals.items():
        setattr(ensemble, name, wrap(name, function))
    try:
        yield
    finally:
        for name in names:
            delattr(ensemble, name)  # the instance attribute hid the method


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--batches", type=int, default=8, help="batches per batch size")
    parser.add_argument("--src-len", type=int, nargs="+", default=[5, 60],
                        help="source length (EOS included): one value, or MIN MAX")
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len-b", type=int, default=30)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one batch")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu", action="store_true", help="fp32 on the CPU (a check of the script)")
    args = parser.parse_args()
    if len(args.src_len) not in (1, 2) or min(args.src_len) < 2:
        parser.error("--src-len takes one length or MIN MAX, each >= 2")
    lengths = (min(args.src_len), max(args.src_len))
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --cpu)")
    from fairseq.sequence_generator import SequenceGenerator

    import fastpatch
    from fastpatch.integrations.fairseq.engine import EngineEnsemble

    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.float16
    plain, d = build_model(args.vocab, device, dtype)
    fused = fastpatch.accelerate(copy.deepcopy(plain))
    results = {"environment": environment() if device.type == "cuda" else {"device": "cpu"},
               "args": vars(args), "rows": []}
    print(f"# {results['environment']}")

    def generator_for(path):
        model = plain if path == "fairseq" else fused
        generator = SequenceGenerator([model], d, beam_size=args.beam, min_len=args.min_len,
                                      max_len_a=0, max_len_b=args.max_len_b)
        if path == "engine":
            generator.model = EngineEnsemble(model, generator)
        return generator

    def one_pass(generator, samples):
        sync(device)
        start = time.perf_counter()
        for sample in samples:
            generator.generate(generator.model.models, sample)
        sync(device)
        return time.perf_counter() - start

    with torch.no_grad():
        # CUDA context, cuBLAS handles: paid once per process, by whichever path comes first
        one_pass(generator_for("fairseq"), make_batches(d, 2, 2, lengths, 0, device))
        for batch in args.batch:
            samples = make_batches(d, batch * args.batches, batch, lengths, batch, device)
            others = make_batches(d, batch * args.batches, batch, lengths, batch + 10 ** 6, device)
            sentences = batch * args.batches
            for path in PATHS:
                generator = generator_for(path)
                cold = one_pass(generator, samples)
                graphs = generator.model.engine().graphs if path == "engine" else None
                cold_captures = (graphs.captures, graphs.capture_seconds) if graphs else (0, 0.0)
                warm = statistics.median(one_pass(generator, samples) for _ in range(args.repeats))
                fresh = one_pass(generator, others)
                totals = {}
                with timed_model_calls(generator.model, totals, device):
                    split_wall = one_pass(generator, samples)
                row = {"batch": batch, "path": path, "sentences": sentences,
                       "cold_s": cold, "warm_s": warm, "new_batches_s": fresh,
                       "cold_sentences_per_s": sentences / cold, "warm_sentences_per_s": sentences / warm,
                       "model_share": sum(totals.values()) / split_wall,
                       "model_calls_ms": {k: v * 1e3 for k, v in totals.items()}}
                if graphs is not None:
                    row.update(cold_captures=cold_captures[0], cold_capture_s=cold_captures[1],
                               captures_after=graphs.captures - cold_captures[0])
                results["rows"].append(row)
                print(f"batch {batch}, {path}: cold {cold:.2f} s, warm {warm:.2f} s, new batches "
                      f"{fresh:.2f} s for {sentences} "
                      f"sentences; model calls {100 * row['model_share']:.0f}% of a pass"
                      + (f"; {cold_captures[0]} graphs captured in {cold_captures[1]:.2f} s cold, "
                         f"{row['captures_after']} after" if graphs is not None else ""), flush=True)
                if args.profile:
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if device.type == "cuda":
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    with torch.profiler.profile(activities=activities) as prof:
                        one_pass(generator, samples[-1:])
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14,
                                                    max_name_column_width=48))
    print(f"\nsources {lengths[0]}-{lengths[1]} tokens, beam {args.beam}, min_len {args.min_len}, "
          f"max_len_b {args.max_len_b}, {args.batches} batches a batch size")
    print("batch  path            cold sent/s  warm sent/s  new batches  vs fairseq (cold/warm/new)  "
          "model share  captures")
    base = {}
    for row in results["rows"]:
        if row["path"] == "fairseq":
            base[row["batch"]] = row
        ref = base[row["batch"]]
        print(f"{row['batch']:>5}  {row['path']:<14} {row['cold_sentences_per_s']:>12.1f} "
              f"{row['warm_sentences_per_s']:>12.1f} {row['sentences'] / row['new_batches_s']:>12.1f}"
              f"  {ref['cold_s'] / row['cold_s']:>9.2f}x / {ref['warm_s'] / row['warm_s']:.2f}x / "
              f"{ref['new_batches_s'] / row['new_batches_s']:.2f}x  {100 * row['model_share']:>10.0f}%  "
              f"{row.get('cold_captures', '-')}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_fairseq_generate.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
