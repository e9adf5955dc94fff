"""Where the time of fairseq's beam search goes, with and without the decoding engine.

fairseq's own ``SequenceGenerator`` on a random ``transformer_wmt_en_de`` (fp16 on CUDA), once
over the model's decoder and once over ``EngineEnsemble``: wall time per call, the share spent
inside the model's encoder/decoder calls (synchronised timers around them: this perturbs the
overlap of host and device, so it splits the time, and the plain wall time is measured apart),
and torch.profiler's top host-side ops for one call. Sources have a fixed length and
``min_len`` keeps hypotheses at a realistic length, as in ``bench_fairseq.py --parts generate``.

    python3 benchmarks/profile_fairseq_generate.py --batch 1 128 [--out DIR]
"""
from __future__ import annotations

import argparse
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
    parser.add_argument("--src-len", type=int, default=15)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len-b", type=int, default=30)
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--cpu", action="store_true", help="fp32 on the CPU (a check of the script)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --cpu)")
    from fairseq.sequence_generator import SequenceGenerator

    import fastpatch
    from fastpatch.integrations.fairseq.engine import EngineEnsemble

    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.float16
    model, d = build_model(args.vocab, device, dtype)
    fastpatch.accelerate(model)
    results = {"environment": environment() if device.type == "cuda" else {"device": "cpu"},
               "args": vars(args), "rows": []}
    print(f"# {results['environment']}")
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        src = torch.randint(d.nspecial, len(d), (batch, args.src_len), generator=g)
        src[:, -1] = d.eos()
        sample = {"net_input": {"src_tokens": src.to(device),
                                "src_lengths": torch.full((batch,), args.src_len, device=device)}}
        for path in ("fairseq decoder", "engine"):
            generator = SequenceGenerator([model], d, beam_size=args.beam, min_len=args.min_len,
                                          max_len_a=0, max_len_b=args.max_len_b)
            if path == "engine":
                generator.model = EngineEnsemble(model, generator)
            run = lambda: generator.generate([model], sample)  # noqa: E731
            with torch.no_grad():
                run()  # warm-up: engine construction, graph capture, cuBLAS plans
                sync(device)
                walls = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run()
                    sync(device)
                    walls.append(time.perf_counter() - start)
                totals = {}
                with timed_model_calls(generator.model, totals, device):
                    start = time.perf_counter()
                    run()
                    split_wall = time.perf_counter() - start
                activities = [torch.profiler.ProfilerActivity.CPU]
                if device.type == "cuda":
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                with torch.profiler.profile(activities=activities) as prof:
                    run()
                    sync(device)
            wall = statistics.median(walls)
            model_time = sum(totals.values())
            row = {"batch": batch, "path": path, "ms_per_call": wall * 1e3,
                   "sentences_per_s": batch / wall,
                   "model_share": model_time / split_wall,
                   "model_calls_ms": {k: v * 1e3 for k, v in totals.items()}}
            results["rows"].append(row)
            print(f"\n## batch {batch}, {path}: {wall * 1e3:.1f} ms a call ({batch / wall:.1f} sent/s); "
                  f"model calls {100 * row['model_share']:.0f}% of a synchronised call "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in totals.items()))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))
    print("\nbatch  path              ms/call  sent/s  model share")
    for row in results["rows"]:
        print(f"{row['batch']:>5}  {row['path']:<16} {row['ms_per_call']:>8.1f} {row['sentences_per_s']:>7.1f}"
              f"  {100 * row['model_share']:>5.0f}%")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_fairseq_generate.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
