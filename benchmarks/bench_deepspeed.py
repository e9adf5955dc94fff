"""The DeepSpeed launch (lightseq-deepspeed) of fairseq training: words/s with fastpatch's fused
modules vs the same launch with fairseq's plain ``transformer`` arch, same data, config and run.

    python benchmarks/bench_deepspeed.py [--out benchmarks/results] [--zero 2] [--precision bf16]
        [--updates 150] [--variants plain ls ls-arch]

Rows (every one through DeepSpeed's launcher, ZeRO stage and precision from one generated config):

* ``transformer`` (``plain``): ``--arch transformer_wmt_en_de --optimizer adam --criterion
  label_smoothed_cross_entropy --no-fastpatch``: fairseq's own modules inside the DeepSpeed engine;
* ``ls_transformer`` (``ls``): the ``ls_*`` twins (fused layers, ``ls_adam``, fused
  label-smoothed CE);
* ``ls_transformer, fairseq adam/criterion`` (``ls-arch``): only the architecture changed, to
  separate the layers' share from the optimizer's and the loss's.

Training data and flags are those of ``bench_fairseq.py``'s train part (synthetic WMT-shaped
corpus, joined 32k vocabulary, ``--share-all-embeddings --max-tokens 8192``); words/s is the median
of fairseq's own ``wps`` over the second half of the logged intervals, and "whole run" counts every
interval (``bench_fairseq.parse_train``: plain fairseq warms up for ~200 updates, so a short
run compares warm-up against speed). With two GPUs
the first two rows also run as two processes (``--num_gpus 2``); otherwise the JSON says not run.
``--cpu --smoke`` runs a tiny version on the CPU (checks the script, no timings).
"""
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_fairseq import (ensure_fastpatch_installed, parse_train, preprocess,  # noqa: E402
                           synthetic_corpus, train_flags, training_parser)
from harness import environment  # noqa: E402

LAUNCH = [sys.executable, "-m", "fastpatch.integrations.deepspeed.cli"]
# --variants key: (label, ls_* arch, ls_adam + ls criterion)
VARIANTS = {"plain": ("transformer", False, False), "ls": ("ls_transformer", True, True),
            "ls-arch": ("ls_transformer, fairseq adam/criterion", True, False)}


def ds_config(directory, zero, precision):
    config = {"zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9}
    if precision != "fp32":
        config[precision] = {"enabled": True}
    path = os.path.join(directory, f"ds_zero{zero}_{precision}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def flags(data, args, save_dir, ls_arch, ls_rest, config):
    """bench_fairseq's training flags with the arch and the optimizer/criterion chosen apart."""
    result = train_flags(data, args, save_dir, ls_rest, args.updates, ["--no-save"])
    arch = result.index("--arch") + 1
    result[arch] = ("ls_" if ls_arch else "") + args.arch
    if not ls_arch:
        result.append("--no-fastpatch")
    return result + ["--deepspeed_config", config]


def launch(gpus, training_args, log_path):
    """lightseq-deepspeed through DeepSpeed's launcher; returns the output of all ranks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    command = LAUNCH + ["--num_gpus", str(gpus)] + [str(a) for a in training_args]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    with open(log_path, "w") as f:
        f.write(" ".join(command) + "\n\n" + output
                + f"\n(exit {result.returncode}, {seconds:.1f} s)\n")
    print(f"  [{os.path.basename(log_path)}: {seconds:.1f} s]", flush=True)
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"lightseq-deepspeed failed (exit {result.returncode}):\n{tail}")
    return output


def bench(args, data, work, log_dir, config, gpus, variants, save=lambda rows: None):
    rows = []
    for label, ls_arch, ls_rest in variants:
        tag = f"ds-{gpus}gpu-" + label.replace(" ", "_").replace(",", "").replace("/", "-")
        try:
            output = launch(gpus, flags(data, args, os.path.join(work, tag), ls_arch, ls_rest, config),
                            os.path.join(log_dir, tag + ".log"))
            row = parse_train(output, args.warmup_intervals)
            row.update(variant=label, gpus=gpus, note="")
        except RuntimeError as exc:
            row = dict(variant=label, gpus=gpus, wps=None, note=str(exc)[-600:])
        rows.append(row)
        save(rows)  # after every launch: a run cut by a time cap keeps the rows it finished
        print(f"deepspeed x{gpus} {label}: {row.get('wps')} words/s", flush=True)
    return rows


def report(results):
    env = results["environment"]
    print(f"\n# DeepSpeed launch  device={env.get('device')} torch={env.get('torch')} "
          f"commit={env.get('commit')} date={env.get('date')} {results['config']}")
    print(f"{'variant':42} {'gpus':>4} {'words/s':>10} {'vs transformer':>15} {'whole run':>10} "
          f"{'final loss':>10}")
    for gpus in sorted({r["gpus"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["gpus"] == gpus]
        base = rows[0].get("wps")
        for r in rows:
            wps, loss = r.get("wps"), r.get("final_loss")
            ratio = f"{wps / base:5.2f}x" if wps and base else "    -"
            print(f"{r['variant']:42} {gpus:4d} {wps or 0:10.0f} {ratio:>15} "
                  f"{r.get('wps_run') or 0:10.0f} {loss if loss is not None else '-':>10}  "
                  f"{r.get('note', '')[:80]}")
    if results.get("two_gpus"):
        print(f"two processes: {results['two_gpus']}")


def main():
    parser = training_parser(__doc__.split("\n\n")[0], default_precision="bf16")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="rows to run (the first is the baseline of the ratios)")
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.max_tokens, args.updates, args.log_interval = "transformer_tiny", 1024, 6, 2
        args.warmup_intervals, args.pairs, args.vocab = 1, 600, 300
    if args.cpu:
        args.precision = "fp32"  # DeepSpeed refuses fp16 on the CPU; bf16 there is not a benchmark
    args.precision_flags = ["--cpu"] if args.cpu else []  # precision comes from the config

    ensure_fastpatch_installed()
    work = args.work or tempfile.mkdtemp(prefix="bench-deepspeed-")
    log_dir = args.log_dir or os.path.join(args.out, "deepspeed-logs")
    os.makedirs(log_dir, exist_ok=True)
    env = environment() if torch.cuda.is_available() else dict(device="cpu", torch=torch.__version__)
    env["date"] = datetime.date.today().isoformat()
    results = dict(environment=env, config=dict(arch=args.arch, zero=args.zero,
                                                precision=args.precision,
                                                max_tokens=args.max_tokens, updates=args.updates,
                                                variants=args.variants))
    json_path = os.path.join(args.out, "deepspeed.json")

    def save(rows, done=()):
        with open(json_path, "w") as f:
            json.dump(dict(results, rows=list(done) + rows), f, indent=1)

    start = time.monotonic()
    data = preprocess(synthetic_corpus(os.path.join(work, "text"), args.pairs, args.vocab),
                      os.path.join(work, "data-bin"))
    results["data_seconds"] = round(time.monotonic() - start, 1)
    print(f"== data: {results['data_seconds']} s", flush=True)
    config = ds_config(work, args.zero, args.precision)
    variants = [VARIANTS[key] for key in args.variants]
    results["rows"] = bench(args, data, work, log_dir, config, 1, variants, save)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        done = results["rows"]
        results["rows"] = done + bench(args, data, work, log_dir, config, 2, variants[:2],
                                       lambda rows: save(rows, done))
        results["two_gpus"] = "run"
    else:
        results["two_gpus"] = f"not run: {gpus} GPU(s) on this machine, 2 needed"
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    report(results)
    print(f"\n(logs of every launch in {log_dir}; JSON in {json_path})")


if __name__ == "__main__":
    main()
