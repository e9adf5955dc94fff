"""Run every op benchmark (benchmarks/bench_*.py exposing cases()) and write JSON + a table.

    python benchmarks/bench_ops.py [--only NAME ...] [--out benchmarks/results]
"""
import argparse
import datetime
import glob
import importlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import environment, run_case  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", default=None, help="module suffixes, e.g. cross_entropy")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    modules = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "bench_*.py"))
                     if not p.endswith("bench_ops.py"))
    if args.only:
        modules = [m for m in modules if any(m.endswith(o) for o in args.only)]
    env = environment()
    env["date"] = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in modules:
        module = importlib.import_module(name)
        if not hasattr(module, "cases"):
            continue
        for case in module.cases():
            case_rows = run_case(case)
            rows.extend(case_rows)
            times = " ".join(f"{r['variant']}={r['ms']:.3f}" if r["ms"] else f"{r['variant']}=fail"
                             for r in case_rows)
            print(f"[{name}] {case.op} {case.shape} {case.dtype}: {times}", flush=True)
            # after every case: a run cut by its time cap keeps what it measured
            with open(os.path.join(args.out, "ops.json"), "w") as f:
                json.dump(dict(environment=env, rows=rows), f, indent=1)
    print_table(env, rows)


def print_table(env, rows):
    print(f"\n# ops  device={env['device']} torch={env['torch']} commit={env['commit']} date={env['date']}")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["variant"]] = r
    # kernels e/c/f: GPU kernel time of one call per variant; far below the wall time = host-bound
    print(f"{'op':34} {'shape':28} {'dtype':9} {'eager':>8} {'compile':>8} {'fused':>8} {'x eager':>8} "
          f"{'x comp':>7} {'mem f/e':>8}  kernels e/c/f")
    for (op, shape, dtype), v in keyed.items():
        def ms(k):
            return v.get(k, {}).get("ms")
        e, c, f = ms("eager"), ms("compile"), ms("fastpatch")
        fmt = lambda t: f"{t:8.3f}" if t else "    fail"
        sp = lambda a, b: f"{a / b:7.2f}x" if a and b else "      -"
        pe, pf = v.get("eager", {}).get("peak_mb"), v.get("fastpatch", {}).get("peak_mb")
        mem = f"{pf / pe:7.2f}" if pe and pf else "      -"
        kernels = "/".join(f"{v[k]['kernel_ms']:.3f}" if v.get(k, {}).get("kernel_ms") else "-"
                           for k in ("eager", "compile", "fastpatch"))
        print(f"{op[:34]:34} {shape[:28]:28} {dtype:9} {fmt(e)} {fmt(c)} {fmt(f)} {sp(e, f)} {sp(c, f)} {mem}"
              f"  {kernels}")
    # where the fused variant's GPU time goes, for the rows slower than eager or compile
    for (op, shape, dtype), v in keyed.items():
        f = v.get("fastpatch", {})
        rivals = [v.get(k, {}).get("ms") for k in ("eager", "compile")]
        if f.get("ms") and f.get("top_kernels") and any(r and r < f["ms"] for r in rivals):
            kernels = "; ".join(f"{name[:48]} {ms:.3f} x{count:g}" for name, ms, count in f["top_kernels"][:4])
            total = f"{f['kernel_ms']:.3f}" if f.get("kernel_ms") is not None else "?"
            print(f"  slower: {op} {shape} {dtype}: kernels {total} of {f['ms']:.3f} ms: {kernels}")
    for r in rows:
        if r["note"].startswith("failed"):
            print(f"  ! {r['op']} {r['shape']} {r['variant']}: {r['note']}")


if __name__ == "__main__":
    main()
