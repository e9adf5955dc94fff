"""fairseq-train vs lightseq-train (words/s) and fairseq-generate vs lightseq-generate
(sentences/s), same data, same flags, same run; optional BLEU after training the bundled task
and a two-GPU (DDP) run.

    python benchmarks/bench_fairseq.py [--out benchmarks/results] [--parts train generate bleu ddp]
        [--updates 1000] [--valid-pairs 64] [--test-pairs 1024] [--bleu-updates 1500]

* train: a synthetic WMT-shaped corpus (joined 32k vocabulary, Zipf-distributed tokens, 5-80
  tokens per sentence), fairseq's WMT en-de recipe flags (``--arch transformer_wmt_en_de
  --share-all-embeddings --fp16 --max-tokens 8192``, Adam, label-smoothed CE). Rows:
  ``fairseq-train``; ``lightseq-train`` with the same flags; ``lightseq-train`` with the ``ls_*``
  arch, optimizer and criterion. Steady words/s is the median of fairseq's own ``wps`` over the
  second half of the logged intervals (see ``parse_train``: plain fairseq-train warms up for
  ~200 updates); whole-run words/s counts every interval.
* generate: a checkpoint of that model, beam 4, ``--min-len 20 --max-len-b 30`` so that
  hypotheses have realistic length; ``--batch-size 1`` (``--valid-pairs`` sentences) and ``128``
  (``--test-pairs``); sentences/s as fairseq-generate reports it (generation time only).
* bleu: the bundled toy corpus trained by both commands with the same flags (``--bleu-updates``;
  about 9 updates per epoch, each epoch validated and saved), BLEU on its test set.
* ddp: ``--distributed-world-size 2`` when two GPUs are there; otherwise the JSON says not run.

Each fairseq command runs in its own process (as a user runs it); plain fairseq-generate gets
only fairseq's checkpoint types allow-listed for torch >= 2.6, nothing else from fastpatch.
``--cpu --smoke`` runs a tiny version of everything on the CPU (checks the script, no timings).
"""
import argparse
import datetime
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from harness import environment  # noqa: E402

PLAIN_GENERATE = ("import sys; from fastpatch.integrations.fairseq.checkpoints import "
                  "allow_fairseq_checkpoints; allow_fairseq_checkpoints(); "
                  "from fairseq_cli.generate import cli_main; sys.argv[0] = 'fairseq-generate'; "
                  "cli_main()")
COMMANDS = {
    "fairseq-train": [sys.executable, "-m", "fairseq_cli.train"],
    "lightseq-train": [sys.executable, "-m", "fastpatch.integrations.fairseq.cli", "train"],
    "fairseq-generate": [sys.executable, "-c", PLAIN_GENERATE],
    "lightseq-generate": [sys.executable, "-m", "fastpatch.integrations.fairseq.cli", "generate"],
    "fi-translate": [sys.executable, os.path.join(HERE, "translate_fi.py")],
}


def ensure_fastpatch_installed():
    """``fastpatch.integrations`` only exists in an installed fastpatch (setup.py maps it onto
    ``integrations/``); a checkout used through PYTHONPATH gets an editable install, without
    rebuilding the kernels."""
    probe = subprocess.run([sys.executable, "-c", "import fastpatch.integrations.fairseq"],
                           capture_output=True, text=True)
    if probe.returncode == 0:
        return
    print("fastpatch.integrations is not importable: pip install --no-build-isolation --no-deps "
          "-e . (FASTPATCH_BUILD_CUDA=0: keeps the kernels built in place)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-deps", "-e", ROOT], check=True, cwd=ROOT,
                   env=dict(os.environ, FASTPATCH_BUILD_CUDA="0"))


def run(name, args, log_dir, tag, env=None):
    """Runs a command to completion; returns its output (stdout + stderr). Raises on failure.
    ``env``: variables set for this command on top of the current environment."""
    command = COMMANDS[name] + [str(a) for a in args]
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env=None if env is None else dict(os.environ, **env))
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    with open(os.path.join(log_dir, f"{tag}.log"), "w") as f:
        f.write(" ".join(command) + "\n\n" + output
                + f"\n(exit {result.returncode}, {seconds:.1f} s)\n")
    # process start-up (imports, CUDA, checkpoint loading) is most of a short command's time
    print(f"  [{tag}: {seconds:.1f} s]", flush=True)
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        raise RuntimeError(f"{name} failed (exit {result.returncode}):\n{tail}")
    return output


# ------------------------------------------------------------------------------------- data
def synthetic_corpus(directory, pairs, vocab, seed=0, valid=64, test=1024):
    """WMT-shaped token streams: Zipf-distributed ids of a joined vocabulary, 5-80 tokens; the
    target is a fixed relabelling of the source with local reordering (a learnable mapping).
    ``valid`` and ``test`` are the generation sets (batch 1 and batch 128)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (rank + 10) for rank in range(vocab)]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    relabel = list(range(vocab))
    rng.shuffle(relabel)
    os.makedirs(directory, exist_ok=True)
    splits = {"train": pairs, "valid": valid, "test": test}
    for split, count in splits.items():
        with open(os.path.join(directory, f"{split}.src"), "w") as src, \
                open(os.path.join(directory, f"{split}.tgt"), "w") as tgt:
            for _ in range(count):
                length = min(80, max(5, int(rng.gauss(27, 10))))
                ids = rng.choices(range(vocab), cum_weights=cum, k=length)
                out = [relabel[i] for i in ids]
                for k in range(0, length - 1, 3):  # swap neighbours: some reordering
                    out[k], out[k + 1] = out[k + 1], out[k]
                src.write(" ".join(words[i] for i in ids) + "\n")
                tgt.write(" ".join(words[i] for i in out) + "\n")
    return directory


def preprocess(text_dir, dest, joined=True):
    args = ["--source-lang", "src", "--target-lang", "tgt", "--destdir", dest,
            "--workers", str(min(8, os.cpu_count() or 1))]
    for split, flag in (("train", "--trainpref"), ("valid", "--validpref"), ("test", "--testpref")):
        args += [flag, os.path.join(text_dir, split)]
    if joined:
        args.append("--joined-dictionary")
    from fairseq_cli import preprocess as command

    from fastpatch.integrations.fairseq.cli import command_line

    with command_line(["fairseq-preprocess"] + args):
        command.cli_main()
    return dest


# ------------------------------------------------------------------------------------ train
def train_flags(data, args, save_dir, ls_modules, max_update, extra=()):
    prefix = "ls_" if ls_modules else ""
    flags = [data, "--arch", prefix + args.arch, "--share-all-embeddings",
             "--optimizer", prefix + "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
             "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
             "--dropout", "0.1", "--weight-decay", "0.0001",
             "--criterion", prefix + "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
             "--max-tokens", str(args.max_tokens), "--max-update", str(max_update),
             "--log-format", "json", "--log-interval", str(args.log_interval),
             "--disable-validation", "--seed", "1", "--num-workers", "2",
             "--save-dir", save_dir, "--no-epoch-checkpoints", *args.precision_flags, *extra]
    return flags


def parse_train(output, warmup_intervals=None):
    """fairseq's ``train_inner`` records of a training log -> words/s two ways.

    ``wps``: the median of fairseq's per-interval ``wps`` after ``warmup_intervals`` logged
    intervals (default: the first half of them). Plain fairseq-train on the GPU runs its first
    ~200 updates at a third of its later rate (H100, 2026-12-07: 23-50k words/s, then 120-130k),
    where the fused layers are at speed after ~30: a median over a short run's early intervals
    measures that warm-up, not the training speed. ``wps_run``: words over time of every logged
    interval, warm-up included (what the whole run took)."""
    rows = [json.loads(line[line.index("{"):]) for line in output.splitlines()
            if "| train_inner |" in line and "{" in line]
    if not rows:
        raise RuntimeError("no train_inner lines in the log")
    skip = len(rows) // 2 if warmup_intervals is None else warmup_intervals
    steady = rows[skip:] or rows[-1:]
    words = seconds = 0.0
    done = 0
    for r in rows:  # each interval: wpb words an update over the updates since the last record
        updates = int(r["num_updates"]) - done
        done = int(r["num_updates"])
        words += float(r["wpb"]) * updates
        seconds += float(r["wpb"]) * updates / float(r["wps"])
    return dict(wps=statistics.median(float(r["wps"]) for r in steady), wps_run=round(words / seconds, 1),
                steady_from_update=int(steady[0]["num_updates"]),
                wps_all=[float(r["wps"]) for r in rows],
                final_loss=float(rows[-1]["loss"]), updates=int(rows[-1]["num_updates"]),
                gb_free=float(rows[-1]["gb_free"]) if "gb_free" in rows[-1] else None)


# --train-rows key: (label, command, with the ls_* model / criterion / optimizer)
TRAIN_ROWS = {
    "fairseq": ("fairseq-train", "fairseq-train", False),
    "lightseq": ("lightseq-train", "lightseq-train", False),
    "ls-modules": ("lightseq-train ls_*", "lightseq-train", True),
}


def bench_train(args, data, work, log_dir):
    rows = []
    # fairseq-train first when it runs: the report's base
    for label, command, ls_modules in (TRAIN_ROWS[key] for key in TRAIN_ROWS if key in args.train_rows):
        save_dir = os.path.join(work, "train-" + label.replace(" ", "_").replace("*", "all"))
        flags = train_flags(data, args, save_dir, ls_modules, args.updates, ["--no-save"])
        try:
            row = parse_train(run(command, flags, log_dir, "train-" + os.path.basename(save_dir)),
                              args.warmup_intervals)
            row.update(variant=label, note="")
        except RuntimeError as exc:
            row = dict(variant=label, wps=None, note=str(exc)[-600:])
        rows.append(row)
        print(f"train {label}: {row.get('wps')} words/s", flush=True)
    return rows


# --------------------------------------------------------------------------------- generate
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                         r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)")
_BLEU = re.compile(r"BLEU4? = ([\d.]+)")


def parse_generate(output):
    match = _TRANSLATED.search(output)
    if match is None:
        raise RuntimeError("no 'Translated ... sentences/s' line in the log")
    sentences, tokens = (int(match.group(i).replace(",", "")) for i in (1, 2))
    bleu = _BLEU.search(output)
    return dict(sentences=sentences, tokens=tokens, seconds=float(match.group(3)),
                sentences_per_s=float(match.group(4)), tokens_per_s=float(match.group(5)),
                bleu=float(bleu.group(1)) if bleu else None)


# --generate-rows key: (label, command, environment); fairseq-generate always runs first (the
# base). lightseq-generate decodes on the engine on CUDA; FASTPATCH_FAIRSEQ_ENGINE=0 keeps
# fairseq's decoding loop over the fused layers (the share of the layers alone); fi-translate is
# the checkpoint exported and decoded by fastpatch.inference's own beam search (HF's rules, on
# the GPU) over fairseq's batches of the same subset (translate_fi.py)
GENERATE_ROWS = {
    "fairseq": ("fairseq-generate", "fairseq-generate", None),
    "engine": ("lightseq-generate", "lightseq-generate", None),
    "layers": ("lightseq-generate, layers only", "lightseq-generate", {"FASTPATCH_FAIRSEQ_ENGINE": "0"}),
    "fi": ("fi.Transformer (exported)", "fi-translate", None),
}


def bench_generate(args, data, work, log_dir):
    save_dir = os.path.join(work, "gen-model")
    run("fairseq-train", train_flags(data, args, save_dir, False, 1), log_dir, "gen-model")
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    rows = []
    keys = ["fairseq"] + [k for k in GENERATE_ROWS if k != "fairseq" and k in args.generate_rows]
    variants = [GENERATE_ROWS[key] for key in keys]
    for batch, subset in ((1, "valid"), (128, "test")):
        reference = None
        for label, command, env in variants:
            flags = [data, "--path", checkpoint, "--gen-subset", subset, "--beam", "4",
                     "--batch-size", str(batch), "--min-len", str(args.min_len),
                     "--max-len-b", str(args.min_len + 10), *args.precision_flags]
            if command != "fi-translate":
                flags += ["--required-batch-size-multiple", "1", "--max-len-a", "0", "--num-workers", "2"]
            tag = f"gen-{label.replace(', ', '-').replace(' ', '_')}-b{batch}"
            try:
                output = run(command, flags, log_dir, tag, env)
                row = parse_generate(output)
                row.update(variant=label, batch=batch, note="")
                found = hypotheses(output)
                if reference is None:
                    reference = found
                else:  # hypotheses identical to fairseq-generate's (fp16: near-ties may flip)
                    row["same_as_fairseq"] = sum(found.get(i) == h for i, h in reference.items())
                    row["sentences_compared"] = len(reference)
            except RuntimeError as exc:
                row = dict(variant=label, batch=batch, sentences_per_s=None, note=str(exc)[-600:])
            rows.append(row)
            print(f"generate {label} batch {batch}: {row.get('sentences_per_s')} sentences/s",
                  flush=True)
    return rows


def hypotheses(output):
    """sentence id -> best hypothesis (token string) from fairseq-generate's ``H-`` lines."""
    found = {}
    for line in output.splitlines():
        if line.startswith("H-"):
            index, _, text = line.split("\t", 2)
            found.setdefault(int(index[2:]), text)
    return found


# ------------------------------------------------------------------------------------- bleu
def bench_bleu(args, work, log_dir):
    """The bundled corpus, trained by both commands with identical flags, then BLEU (beam 4)."""
    from fastpatch.integrations.fairseq.demo import generate_args, preprocess_args, train_args

    data = os.path.join(work, "toy-bin")
    from fairseq_cli import preprocess as command

    from fastpatch.integrations.fairseq.cli import command_line

    with command_line(["fairseq-preprocess"] + preprocess_args(data)):
        command.cli_main()
    # the demo's recipe with fairseq's own modules, so that both commands get the same flags
    plain = {"ls_transformer": "transformer", "ls_adam": "adam",
             "ls_label_smoothed_cross_entropy": "label_smoothed_cross_entropy"}
    result = {}
    for trainer, generator in (("fairseq-train", "fairseq-generate"),
                               ("lightseq-train", "lightseq-generate")):
        save_dir = os.path.join(work, "toy-" + trainer)
        flags = [plain.get(f, f) for f in train_args(data, save_dir, args.bleu_updates, args.cpu)]
        results_dir = os.path.join(save_dir, "translations")
        try:  # one command failing still leaves the other's score
            run(trainer, flags + args.precision_flags, log_dir, "bleu-" + trainer)
            run(generator, generate_args(data, os.path.join(save_dir, "checkpoint_last.pt"),
                                         results_dir, args.cpu) + args.precision_flags,
                log_dir, "bleu-" + generator)
            with open(os.path.join(results_dir, "generate-test.txt")) as f:
                bleu = _BLEU.search(f.read())
            result[trainer] = float(bleu.group(1)) if bleu else None
        except RuntimeError as exc:
            result[trainer], result[trainer + " note"] = None, str(exc)[-600:]
        print(f"bleu {trainer}: {result[trainer]}", flush=True)
    if None not in (result["fairseq-train"], result["lightseq-train"]):
        result["difference"] = result["lightseq-train"] - result["fairseq-train"]
    return result


# -------------------------------------------------------------------------------------- ddp
def bench_ddp(args, data, work, log_dir):
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return dict(run=False, note=f"not run: {gpus} GPU(s) on this machine, 2 needed")
    result = dict(run=True)
    for command in ("fairseq-train", "lightseq-train"):
        save_dir = os.path.join(work, "ddp-" + command)
        flags = train_flags(data, args, save_dir, False, args.updates,
                            ["--no-save", "--distributed-world-size", "2"])
        try:
            result[command] = parse_train(run(command, flags, log_dir, "ddp-" + command),
                                          args.warmup_intervals)
        except RuntimeError as exc:
            result[command] = dict(wps=None, note=str(exc)[-600:])
        print(f"ddp {command}: {result[command].get('wps')} words/s", flush=True)
    return result


# ------------------------------------------------------------------------------------- main
def ratio(a, b):
    return f"{a / b:5.2f}x" if a and b else "    -"


def report(results):
    env = results["environment"]
    print(f"\n# fairseq  device={env.get('device')} torch={env.get('torch')} "
          f"commit={env.get('commit')} date={env.get('date')} {results['config']}")
    print(f"seconds per part: {results['seconds']}")
    failed = [p for p, r in results.items() if isinstance(r, dict) and "error" in r]
    for part in failed:
        print(f"{part}: FAILED {results[part]['error'][-300:]}")
    results = {p: r for p, r in results.items() if p not in failed}
    if "train" in results:
        base = results["train"][0].get("wps")
        base_run = results["train"][0].get("wps_run")
        print(f"{'training':28} {'steady w/s':>10} {'vs fairseq':>10} {'whole run':>10} "
              f"{'vs fairseq':>10}")
        for r in results["train"]:
            wps, run_wps = r.get("wps"), r.get("wps_run")
            print(f"{r['variant']:28} {wps or 0:10.0f} {ratio(wps, base):>10} {run_wps or 0:10.0f} "
                  f"{ratio(run_wps, base_run):>10}  {r.get('note', '')[:80]}")
    if "generate" in results:
        print(f"{'generation (beam 4)':31} {'batch':>5} {'sent/s':>9} {'vs fairseq':>10} "
              f"{'same hyps':>10}")
        by_batch = {}
        for r in results["generate"]:
            by_batch.setdefault(r["batch"], {})[r["variant"]] = r
        for batch, rows in by_batch.items():
            base = rows.get("fairseq-generate", {}).get("sentences_per_s")
            for variant, r in rows.items():
                s = r.get("sentences_per_s")
                same = (f"{r['same_as_fairseq']}/{r['sentences_compared']}"
                        if "same_as_fairseq" in r else "-")
                print(f"{variant:31} {batch:5d} {s or 0:9.2f} {ratio(s, base):>10} {same:>10}  "
                      f"{r.get('note', '')[:80]}")
    if "bleu" in results:
        print(f"BLEU (bundled corpus): {results['bleu']}")
    if "ddp" in results:
        d = results["ddp"]
        if not d.get("run"):
            print(f"DDP: {d['note']}")
        else:
            a, b = (d.get(k, {}).get("wps") for k in ("fairseq-train", "lightseq-train"))
            print(f"DDP x2 words/s: fairseq {a}, lightseq {b} ({ratio(b, a).strip()})")


def training_parser(description: str, default_precision: str, default_updates: int = 150
                    ) -> argparse.ArgumentParser:
    """The training-run options shared with bench_deepspeed.py (same data, same flags)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--arch", default="transformer_wmt_en_de")
    parser.add_argument("--precision", default=default_precision, choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--updates", type=int, default=default_updates)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--warmup-intervals", type=int, default=None,
                        help="logged intervals left out of the steady words/s median "
                             "(default: the first half)")
    parser.add_argument("--pairs", type=int, default=60000, help="synthetic training pairs")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--log-dir", help="one log per command (default: a folder in --out)")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: checks that every part runs, timings mean nothing")
    return parser


def main():
    parser = training_parser(__doc__.split("\n\n")[0], default_precision="fp16", default_updates=1000)
    parser.add_argument("--parts", nargs="+", default=["train", "generate", "bleu", "ddp"],
                        choices=["train", "generate", "bleu", "ddp"])
    parser.add_argument("--min-len", type=int, default=20, help="generation --min-len")
    parser.add_argument("--train-rows", nargs="+", default=list(TRAIN_ROWS), choices=list(TRAIN_ROWS),
                        help="train part: which commands run")
    parser.add_argument("--generate-rows", nargs="+", default=list(GENERATE_ROWS),
                        choices=list(GENERATE_ROWS), help="generate part: which commands run")
    parser.add_argument("--valid-pairs", type=int, default=64,
                        help="synthetic sentences generated at batch 1")
    parser.add_argument("--test-pairs", type=int, default=1024,
                        help="synthetic sentences generated at batch 128")
    parser.add_argument("--bleu-updates", type=int, default=1500)
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.max_tokens, args.updates, args.log_interval = "transformer_tiny", 1024, 6, 2
        args.warmup_intervals, args.pairs, args.vocab, args.bleu_updates = 1, 600, 300, 4
    if args.cpu:
        args.precision = "fp32"  # the JSON says what ran: fairseq's --cpu runs in fp32
    args.precision_flags = [] if args.precision == "fp32" else [f"--{args.precision}"]
    if args.cpu:
        args.precision_flags.append("--cpu")

    ensure_fastpatch_installed()
    work = args.work or tempfile.mkdtemp(prefix="bench-fairseq-")
    log_dir = args.log_dir or os.path.join(args.out, "fairseq-logs")
    os.makedirs(log_dir, exist_ok=True)
    env = environment() if torch.cuda.is_available() else dict(device="cpu", torch=torch.__version__)
    env["date"] = datetime.date.today().isoformat()
    config = dict(arch=args.arch, precision=args.precision, max_tokens=args.max_tokens,
                  updates=args.updates)
    if "generate" in args.parts:
        config.update(valid_pairs=args.valid_pairs, test_pairs=args.test_pairs)
    if "bleu" in args.parts:
        config.update(bleu_updates=args.bleu_updates)
    results = dict(environment=env, config=config, seconds={})
    json_path = os.path.join(args.out, "fairseq.json")

    def timed(part, function, *part_args):
        start = time.monotonic()
        try:  # a part that fails (e.g. generate's model) leaves the later parts to run
            results[part] = function(*part_args)
        except RuntimeError as exc:
            results[part] = dict(error=str(exc)[-1500:])
        results["seconds"][part] = round(time.monotonic() - start, 1)
        print(f"== {part}: {results['seconds'][part]} s", flush=True)
        # after every part: a run cut by a time cap keeps the parts it finished
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)

    data = None
    if {"train", "generate", "ddp"} & set(args.parts):
        start = time.monotonic()
        data = preprocess(synthetic_corpus(os.path.join(work, "text"), args.pairs, args.vocab,
                                           valid=args.valid_pairs, test=args.test_pairs),
                          os.path.join(work, "data-bin"))
        results["seconds"]["data"] = round(time.monotonic() - start, 1)
        print(f"== data: {results['seconds']['data']} s", flush=True)
    for part, function, part_args in (("train", bench_train, (args, data, work, log_dir)),
                                      ("generate", bench_generate, (args, data, work, log_dir)),
                                      ("bleu", bench_bleu, (args, work, log_dir)),
                                      ("ddp", bench_ddp, (args, data, work, log_dir))):
        if part in args.parts:
            timed(part, function, *part_args)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    report(results)
    print(f"\n(logs of every command in {log_dir}; JSON in {json_path})")


if __name__ == "__main__":
    main()
