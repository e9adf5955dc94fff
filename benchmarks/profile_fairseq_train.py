"""Where a training update's time goes, for fairseq-train and lightseq-train on the same data.

    python benchmarks/profile_fairseq_train.py [--rows fairseq lightseq ls-modules]
        [--skip-updates 300] [--profile-updates 20] [--out benchmarks/results]

bench_fairseq.py measured both commands at ~125k words/s on an H100 (2026-12-07, 1,000
updates): about 65 ms an update, where the model's ~3 TFLOP an update would take the GPU ~10 ms.
This runs each command as bench_fairseq.py does (same synthetic corpus and flags, one process
each), lets it train ``--skip-updates`` updates (past plain fairseq's ~200-update warm-up), then
measures three windows of ``--profile-updates`` updates around fairseq's own
``Trainer.train_step``: unprofiled (wall time an update), under ``torch.profiler`` (host time
inside ``train_step``, GPU kernel time and its busy share, kernels, host-device syncs, top
kernels and top host ops) and under ``cProfile`` (the Python functions the host time goes to,
which the op tables do not show: ``module.train()``, seeding, per-parameter loops). A GPU
mostly idle between kernels says the update is bound by the host, a busy one names the kernels
to work on.

``--host-cost`` runs on the CPU what the GPU path costs the host: the architecture's layers at
tiny widths, with fastpatch's kernels replaced by shape-only stand-ins
(``benchmarks/stand_in_kernels.py``), so each command issues the calls it issues on a GPU. On
this 2-core machine (2026-12-08, five runs) it gave 46-78 ms an update for fairseq-train and
44-70 ms for lightseq-train, the two within each run's noise: the fused layers cost the host
about what fairseq's own cost, which is why a host-bound update is no faster with them.

``--cpu --smoke`` runs a tiny version on the CPU (checks the script; no device numbers).
"""
import argparse
import contextlib
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_fairseq import (TRAIN_ROWS, ensure_fastpatch_installed, preprocess,  # noqa: E402
                           synthetic_corpus, train_flags, training_parser)
from harness import environment  # noqa: E402

# --host-cost: the architecture's layer count and structure at widths whose compute is negligible,
# batches loaded in the measured process (see profile_child's caller)
_HOST_COST_FLAGS = ["--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
                    "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
                    "--decoder-attention-heads", "2", "--num-workers", "0"]
_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
             "cudaGraphLaunch")


def _device_us(entry) -> float:
    # torch >= 2.4 names it device time; older releases cuda time
    return float(getattr(entry, "self_device_time_total", getattr(entry, "self_cuda_time_total", 0.0)))


def summarize(prof, updates: int, wall_s: float, inside_s: float, rows: int = 12) -> dict:
    """The profile of ``updates`` updates -> per-update figures and the top tables."""
    averages = prof.key_averages()
    device_us = sum(_device_us(e) for e in averages)
    kernels = sum(e.count for e in averages
                  if str(getattr(e, "device_type", "")).endswith("CUDA") and _device_us(e) > 0)
    by_name = {e.key: e for e in averages}
    launches = sum(by_name[k].count for k in _LAUNCHES if k in by_name)
    syncs = sum(by_name[k].count for k in _SYNCS if k in by_name)
    wall_ms = 1e3 * wall_s / updates
    top_device = sorted((e for e in averages if _device_us(e) > 0), key=_device_us, reverse=True)
    top_host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
    return dict(
        updates=updates, wall_ms=round(wall_ms, 2), train_step_host_ms=round(1e3 * inside_s / updates, 2),
        device_ms=round(device_us / 1e3 / updates, 2),
        device_busy=round(device_us / 1e3 / updates / wall_ms, 3) if wall_ms else None,
        kernels=round(kernels / updates, 1), launches=round(launches / updates, 1),
        syncs=round(syncs / updates, 1),
        top_device=[(e.key[:90], round(_device_us(e) / 1e3 / updates, 3), round(e.count / updates, 1))
                    for e in top_device[:rows]],
        top_host=[(e.key[:90], round(e.self_cpu_time_total / 1e3 / updates, 3), round(e.count / updates, 1))
                  for e in top_host[:rows]])


def python_hotspots(stats: pstats.Stats, updates: int, rows: int = 25) -> list:
    """The functions with the most cumulative time an update, as (``file:line(name)``, ms, calls).

    Only Python frames are kept (fairseq's trainer, the model's modules, the optimizer): the
    host time that ``torch.profiler``'s op tables do not show (``module.train()``, seeding,
    config lookups, per-parameter loops)."""
    entries = []
    for (filename, line, name), (_, calls, _, cumulative, _) in stats.stats.items():
        # built-ins, generated code, and this script's own wrapper
        if filename.startswith("~") or "<" in filename or filename == os.path.abspath(__file__):
            continue
        short = "/".join(filename.split("/")[-3:])
        entries.append((f"{short}:{line}({name})"[:90], round(1e3 * cumulative / updates, 3),
                        round(calls / updates, 1)))
    return sorted(entries, key=lambda e: e[1], reverse=True)[:rows]


def profile_child(row: str, flags, skip: int, updates: int, out_json: str) -> None:
    """Run the training command of ``row`` in this process and measure three windows of
    ``updates`` updates each, after ``skip``, inside fairseq's ``Trainer.train_step``:
    unprofiled (the wall time an update), under ``torch.profiler`` (ops and kernels), and under
    ``cProfile`` (Python functions)."""
    from fairseq import trainer as fairseq_trainer

    original = fairseq_trainer.Trainer.train_step
    cuda = torch.cuda.is_available() and "--cpu" not in flags
    activity = torch.profiler.ProfilerActivity
    activities = [activity.CPU] + ([activity.CUDA] if cuda else [])
    state = dict(calls=0, inside=0.0, plain_steps=[])
    plain_end, torch_end, python_end = skip + updates, skip + 2 * updates, skip + 3 * updates

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def train_step(self, samples, *args, **kwargs):
        state["calls"] += 1
        calls = state["calls"]
        if calls in (skip + 1, plain_end + 1, torch_end + 1):
            sync()
            if calls == plain_end + 1:
                state["prof"] = torch.profiler.profile(activities=activities)
                state["prof"].__enter__()
            elif calls == torch_end + 1:
                state["python"] = cProfile.Profile()
                state["python"].enable()
            state["began"] = time.perf_counter()
        began = time.perf_counter()
        output = original(self, samples, *args, **kwargs)
        if skip < calls <= plain_end and not cuda:  # on a GPU one step's host time is not its cost
            state["plain_steps"].append(time.perf_counter() - began)
        if plain_end < calls <= torch_end:
            state["inside"] += time.perf_counter() - began
        if calls in (plain_end, torch_end, python_end):
            sync()
            wall = time.perf_counter() - state["began"]
            if calls == plain_end:
                state["plain_wall_ms"] = round(1e3 * wall / updates, 2)
            elif calls == torch_end:
                prof = state.pop("prof")
                prof.__exit__(None, None, None)
                state["summary"] = summarize(prof, updates, wall, state["inside"])
            else:
                state["python"].disable()
                hotspots = python_hotspots(pstats.Stats(state.pop("python")), updates)
                with open(out_json, "w") as f:
                    steps = sorted(state["plain_steps"])
                    median = round(1e3 * steps[len(steps) // 2], 2) if steps else None
                    json.dump(dict(row=row, plain_wall_ms=state["plain_wall_ms"], plain_median_ms=median,
                                   python_wall_ms=round(1e3 * wall / updates, 2),
                                   **state["summary"], top_python=hotspots), f)
        return output

    fairseq_trainer.Trainer.train_step = train_step
    command = TRAIN_ROWS[row][1]
    if command == "lightseq-train":
        from fastpatch.integrations.fairseq.cli import train

        train(flags)
    else:
        from fairseq_cli import train

        from fastpatch.integrations.fairseq.cli import command_line

        with command_line(["fairseq-train"] + flags):
            train.cli_main()


def main():
    parser = training_parser(__doc__.split("\n\n")[0], default_precision="fp16")
    parser.add_argument("--rows", nargs="+", default=list(TRAIN_ROWS), choices=list(TRAIN_ROWS))
    parser.add_argument("--skip-updates", type=int, default=300)
    parser.add_argument("--profile-updates", type=int, default=20)
    parser.add_argument("--host-cost", action="store_true",
                        help="on the CPU, the host cost of each command's GPU path: the arch's "
                             "layers at tiny widths, fastpatch's kernels replaced by stand-ins "
                             "(benchmarks/stand_in_kernels.py)")
    # the parent runs itself once per row with these
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.arch, args.max_tokens, args.pairs, args.vocab = "transformer_tiny", 1024, 600, 300
        args.skip_updates, args.profile_updates = 3, 2
    if args.host_cost:
        args.cpu = True
        if args.pairs == parser.get_default("pairs"):
            args.pairs, args.vocab = 4000, 300
    if args.cpu:
        args.precision = "fp32"
    args.precision_flags = [] if args.precision == "fp32" else [f"--{args.precision}"]
    if args.cpu:
        args.precision_flags.append("--cpu")
    total = args.skip_updates + 3 * args.profile_updates

    if args.child:
        work = os.path.dirname(args.child_json)
        flags = train_flags(args.data, args, os.path.join(work, "save-" + args.child),
                            TRAIN_ROWS[args.child][2], total,
                            ["--no-save", *(_HOST_COST_FLAGS if args.host_cost else [])])
        with contextlib.ExitStack() as stack:
            if args.host_cost:
                import stand_in_kernels

                # one thread and no loader workers: on a small machine they take the cores
                # the measured process runs on, and the timings swing by 2x between runs
                torch.set_num_threads(1)
                kernels = stack.enter_context(stand_in_kernels.installed())
            profile_child(args.child, flags, args.skip_updates, args.profile_updates, args.child_json)
        if args.host_cost:  # what the report reads beside the times
            with open(args.child_json) as f:
                result = json.load(f)
            result["stand_in_calls"] = round(kernels.calls / total, 1)
            with open(args.child_json, "w") as f:
                json.dump(result, f)
        return

    ensure_fastpatch_installed()
    work = args.work or tempfile.mkdtemp(prefix="profile-fairseq-train-")
    data = preprocess(synthetic_corpus(os.path.join(work, "text"), args.pairs, args.vocab, valid=8, test=8),
                      os.path.join(work, "data-bin"))
    env = environment() if torch.cuda.is_available() else dict(device="cpu", torch=torch.__version__)
    if args.host_cost:
        env["device"] = "cpu, host cost (stand-in kernels, tiny widths)"
    results = dict(environment=env, config=dict(arch=args.arch, precision=args.precision,
                                                max_tokens=args.max_tokens, skip_updates=args.skip_updates,
                                                profile_updates=args.profile_updates), rows=[])
    os.makedirs(args.out, exist_ok=True)
    same_options = ["--arch", args.arch, "--precision", args.precision, "--max-tokens", str(args.max_tokens),
                    "--skip-updates", str(args.skip_updates), "--profile-updates", str(args.profile_updates),
                    *(["--cpu"] if args.cpu else []), *(["--smoke"] if args.smoke else []),
                    *(["--host-cost"] if args.host_cost else [])]
    for row in args.rows:
        child_json = os.path.join(work, f"{row}.json")
        command = [sys.executable, os.path.abspath(__file__), *same_options,
                   "--child", row, "--child-json", child_json, "--data", data]
        began = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        with open(os.path.join(work, f"{row}.log"), "w") as f:
            f.write(done.stdout + done.stderr)
        if done.returncode != 0 or not os.path.exists(child_json):
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-12:])
            results["rows"].append(dict(row=row, error=tail))
            print(f"{row}: FAILED\n{tail}", flush=True)
            continue
        with open(child_json) as f:
            results["rows"].append(json.load(f))
        print(f"  [{row}: {time.monotonic() - began:.1f} s]", flush=True)
    with open(os.path.join(args.out, "profile-fairseq-train.json"), "w") as f:
        json.dump(results, f, indent=1)
    report(results)
    print(f"\n(logs in {work})")


def report(results):
    env, config = results["environment"], results["config"]
    print(f"\n# fairseq training profile  device={env.get('device')} torch={env.get('torch')} "
          f"commit={env.get('commit')} date={env.get('date')} {config}")
    # wall: unprofiled mean; median: of single steps (CPU only: on a GPU a step's host time is
    # not its cost); the other columns come from the torch.profiler window (its own wall time,
    # slowed by the profiler, is the base of "busy")
    print(f"{'per update':22} {'wall ms':>8} {'median':>8} {'host in step':>12} {'GPU ms':>8} {'busy':>6} "
          f"{'kernels':>8} {'syncs':>6}")
    good = [r for r in results["rows"] if "error" not in r]
    if any("stand_in_calls" in r for r in good):
        print("(stand-in kernel calls an update: "
              + ", ".join(f"{r['row']} {r.get('stand_in_calls')}" for r in good) + ")")
    for r in good:
        busy = f"{100 * r['device_busy']:5.1f}%" if r.get("device_busy") is not None else "-"
        median = f"{r['plain_median_ms']:8.2f}" if r.get("plain_median_ms") is not None else "       -"
        print(f"{r['row']:22} {r['plain_wall_ms']:8.2f} {median} {r['train_step_host_ms']:12.2f} "
              f"{r['device_ms']:8.2f} {busy:>6} {r['kernels']:8.1f} {r['syncs']:6.1f}")
    for r in good:
        print(f"\n{r['row']}: top device time (ms an update, calls an update)")
        for name, ms, calls in r["top_device"]:
            print(f"  {ms:8.3f} {calls:7.1f}  {name}")
        print(f"{r['row']}: top host self time")
        for name, ms, calls in r["top_host"]:
            print(f"  {ms:8.3f} {calls:7.1f}  {name}")
        print(f"{r['row']}: top Python functions, cumulative (under cProfile: "
              f"{r['python_wall_ms']:.2f} ms an update)")
        for name, ms, calls in r["top_python"]:
            print(f"  {ms:8.3f} {calls:7.1f}  {name}")


if __name__ == "__main__":
    main()
