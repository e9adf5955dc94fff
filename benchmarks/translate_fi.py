"""fairseq-generate's job done by ``fastpatch.inference.Transformer`` (the three-line API).

The checkpoint is exported with ``fastpatch.export`` and decoded by the engine's own beam search
(Hugging Face's rules, every step on the GPU, the host checking for the end now and then), over
the batches ``fairseq-generate`` forms from the same data-bin subset (fairseq's own batch
iterator, so the same sentences share a batch). It prints what fairseq-generate prints: one
``H-<id>\\t<score>\\t<text>`` line per sentence (the score is HF's length-penalised natural-log
probability, where fairseq prints base 2) and the ``Translated ... sentences/s`` line,
timed the same way (each batch's generation, first batch and graph captures included, model
loading excluded), so ``bench_fairseq.py`` reads both alike.

fairseq's length rules map onto the engine's options: ``--min-len`` bars EOS for that many
steps (``min_new_tokens``) and ``max_len_b`` tokens are followed by a forced EOS
(``max_new_tokens = max_len_b + 1``, ``forced_eos_token_id``). The searches differ where HF and
fairseq differ (HF keeps ``2K`` candidates and its own stopping heuristic; fairseq also bars
padding), so hypotheses can differ from fairseq-generate's while the work per sentence is the
same.

    python3 benchmarks/translate_fi.py DATA --path CKPT [--gen-subset test] [--batch-size 128]
        [--beam 4] [--min-len 20] [--max-len-b 30] [--lenpen 1] [--fp16 | --bf16]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="fairseq data-bin directory")
    parser.add_argument("--path", required=True, help="fairseq checkpoint")
    parser.add_argument("--gen-subset", default="test")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--min-len", type=int, default=1)
    parser.add_argument("--max-len-b", type=int, default=200)
    parser.add_argument("--lenpen", type=float, default=1.0)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--bf16", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="on the CPU, eagerly (a check of the script)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("translate_fi.py needs a CUDA device (or --cpu)")
    device = torch.device("cpu" if args.cpu else "cuda")

    from fairseq import checkpoint_utils

    import fastpatch
    import fastpatch.inference as fi
    from fastpatch.integrations.fairseq.checkpoints import allow_fairseq_checkpoints

    allow_fairseq_checkpoints()
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path],
                                                                    arg_overrides={"data": args.data})
    dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    model = models[0].eval().to(dtype)
    with tempfile.TemporaryDirectory() as exported:
        fastpatch.export(model, exported)
        engine = fi.Transformer(exported, max_batch_size=args.batch_size, device=device)
    del model, models
    dictionary = task.target_dictionary
    eos, pad = dictionary.eos(), dictionary.pad()
    options = dict(num_beams=args.beam, length_penalty=args.lenpen, early_stopping=True,
                   min_new_tokens=args.min_len, max_new_tokens=args.max_len_b + 1,
                   forced_eos_token_id=(eos,), eos_token_id=(eos,), pad_token_id=pad)

    task.load_dataset(args.gen_subset)
    batches = task.get_batch_iterator(
        dataset=task.dataset(args.gen_subset), max_tokens=None, max_sentences=args.batch_size,
        max_positions=(engine.spec.positions, engine.spec.positions), ignore_invalid_inputs=False,
        required_batch_size_multiple=1, seed=1, num_workers=0).next_epoch_itr(shuffle=False)
    seconds, sentences, tokens = 0.0, 0, 0
    for sample in batches:
        src = sample["net_input"]["src_tokens"].to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(src, src.ne(pad), **options)
        rows, scores = out.tokens.tolist(), out.scores.tolist()  # the host has the hypotheses
        seconds += time.perf_counter() - start
        for sentence_id, row, score in zip(sample["id"].tolist(), rows, scores):
            hypothesis = row[: row.index(eos) + 1] if eos in row else row
            tokens += len(hypothesis)
            text = dictionary.string(torch.tensor([t for t in hypothesis if t not in (eos, pad)]))
            print(f"H-{sentence_id}\t{score:.4f}\t{text}")
        sentences += len(rows)
    print(f"Translated {sentences:,} sentences ({tokens:,} tokens) in {seconds:.1f}s "
          f"({sentences / seconds:.2f} sentences/s, {tokens / seconds:.2f} tokens/s)")


if __name__ == "__main__":
    main()
