"""``lightseq-train --demo``: preprocess the bundled corpus, train a small model, translate.

Three fairseq steps, each printed as the command it runs, so the demo doubles as a recipe:

1. ``fairseq-preprocess`` of ``data/{train,valid,test}.{src,tgt}`` (see :mod:`.corpus`);
2. ``lightseq-train`` of a small post-LN transformer (``ls_transformer``, ``ls_adam``,
   ``ls_label_smoothed_cross_entropy``) for a few hundred updates;
3. ``lightseq-generate`` of the test set with beam 4: a few translations and the BLEU score.

It runs on the CPU (the PyTorch reference path: a few minutes) or on a GPU (the kernels).
Options: ``--demo-dir DIR`` (default ``./lightseq-demo``), ``--max-update N`` (default 300),
``--cpu`` (stay on the CPU even with a GPU).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

from . import corpus
from .cli import command_line

EXAMPLES = 5


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightseq-train --demo",
                                     description="train and run a small translation model on "
                                                 "fastpatch's bundled toy corpus")
    parser.add_argument("--demo-dir", default="lightseq-demo",
                        help="where the binarized data, checkpoints and translations go")
    parser.add_argument("--max-update", type=int, default=300, help="training updates")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    args = parser.parse_args(list(argv))
    if args.max_update < 1:
        parser.error(f"--max-update must be >= 1, got {args.max_update}")
    return args


def preprocess_args(destdir: str) -> List[str]:
    return ["--source-lang", corpus.SOURCE_LANG, "--target-lang", corpus.TARGET_LANG,
            "--trainpref", corpus.prefix("train"), "--validpref", corpus.prefix("valid"),
            "--testpref", corpus.prefix("test"), "--destdir", destdir, "--workers", "1"]


def train_args(data: str, save_dir: str, max_update: int, cpu: bool) -> List[str]:
    args = [data, "--arch", "ls_transformer",
            "--encoder-layers", "2", "--decoder-layers", "2",
            "--encoder-embed-dim", "128", "--decoder-embed-dim", "128",
            "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
            "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
            "--share-decoder-input-output-embed", "--dropout", "0.1",
            "--optimizer", "ls_adam", "--adam-betas", "(0.9, 0.98)", "--lr", "2e-3",
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100",
            "--criterion", "ls_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--max-tokens", "4096", "--max-update", str(max_update), "--seed", "1",
            "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-interval", "50",
            "--no-progress-bar"]
    return args + (["--cpu"] if cpu else [])


def generate_args(data: str, checkpoint: str, results: str, cpu: bool) -> List[str]:
    # targets are about as long as their sources: cap the length so that an undertrained model
    # (a short --max-update) cannot run on for fairseq's default 200 tokens
    args = [data, "--path", checkpoint, "--gen-subset", "test", "--beam", "4",
            "--max-len-a", "1.2", "--max-len-b", "10", "--max-tokens", "8192",
            "--results-path", results]
    return args + (["--cpu"] if cpu else [])


def _say(step: str, command: str, args: Sequence[str]) -> None:
    print(f"\n== {step}\n$ {command} {shlex.join(args)}", flush=True)


def _show_translations(results_file: str) -> None:
    rows, score = {}, ""
    with open(results_file, encoding="utf-8") as f:
        for line in f:
            kind, _, rest = line.rstrip("\n").partition("-")
            if kind in ("S", "T", "H") and "\t" in rest:
                index, *fields = rest.split("\t")
                rows.setdefault(int(index), {})[kind] = fields[-1]
            elif line.startswith("Generate"):
                score = line.strip()
    for index in sorted(rows)[:EXAMPLES]:
        row = rows[index]
        print(f"  source:    {row.get('S', '')}\n  reference: {row.get('T', '')}\n"
              f"  output:    {row.get('H', '')}\n")
    print(score)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import torch

    from . import cli

    cpu = args.cpu or not torch.cuda.is_available()
    root = os.path.abspath(args.demo_dir)
    data, checkpoints = os.path.join(root, "data-bin"), os.path.join(root, "checkpoints")
    results = os.path.join(root, "translations")

    step = preprocess_args(data)
    _say("1/3 binarize the bundled corpus", "fairseq-preprocess", step)
    if os.path.exists(os.path.join(data, f"dict.{corpus.TARGET_LANG}.txt")):
        print(f"(already binarized in {data})")
    else:
        from fairseq_cli import preprocess

        with command_line(["fairseq-preprocess"] + step):
            preprocess.cli_main()

    step = train_args(data, checkpoints, args.max_update, cpu)
    _say("2/3 train", "lightseq-train", step)
    cli.train(step)

    step = generate_args(data, os.path.join(checkpoints, "checkpoint_last.pt"), results, cpu)
    _say("3/3 translate the test set (beam 4)", "lightseq-generate", step)
    cli.generate(step)
    print(f"\nfirst {EXAMPLES} test sentences:")
    _show_translations(os.path.join(results, "generate-test.txt"))
    print(f"\neverything is in {root}")
