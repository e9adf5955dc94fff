"""The DeepSpeed launch on the GPU: ZeRO-2 bf16 and fp16 against lightseq-train in the same
precision, checkpoints in fairseq-generate, and DeepSpeed's own launcher (two processes when the
machine has two GPUs)."""
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("fairseq")
pytest.importorskip("deepspeed")

from deepspeed_helpers import (entry_args, losses, run_worker, single_process_env,  # noqa: E402
                               write_config)
from fairseq_helpers import argv, hypotheses, lightseq_train, quiet_stdout, train_flags  # noqa: E402

from fastpatch.integrations.fairseq import corpus  # noqa: E402
from fastpatch.integrations.fairseq.checkpoints import allow_fairseq_checkpoints  # noqa: E402

pytestmark = pytest.mark.cuda

UPDATES = 50
# the bundled task at a batch a GPU notices; warmup long enough that the first updates are gentle
EXTRA = ["--max-tokens", "4000", "--lr", "1e-3", "--warmup-updates", "10"]


def _generate(data_bin, checkpoint, results, precision=()):
    from fairseq_cli import generate

    flags = [data_bin, "--path", str(checkpoint), "--gen-subset", "valid", "--beam", "4",
             "--max-len-a", "1.2", "--max-len-b", "5", "--max-tokens", "8000",
             "--results-path", str(results), *precision]
    allow_fairseq_checkpoints()
    with quiet_stdout(), argv(["fairseq-generate"] + flags):
        generate.cli_main()
    return hypotheses(results, "valid")


@pytest.fixture(scope="module")
def bf16_runs(ds_data_bin, tmp_path_factory):
    """ZeRO-2 bf16 in a DeepSpeed process of one GPU, and lightseq-train --bf16, same flags."""
    work = tmp_path_factory.mktemp("ds-cuda")
    config = write_config(work, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    plan = {"task": "train", "runs": [{"name": "zero2_bf16", "argv": entry_args(
        ds_data_bin, work / "zero2", config, UPDATES, extra=EXTRA, cpu=False)}]}
    result = run_worker(work, plan)
    reference = lightseq_train(train_flags(ds_data_bin, work / "lightseq", max_update=UPDATES,
                                           ls_modules=True, cpu=False, extra=EXTRA + ["--bf16"]))
    return dict(result, reference=reference, work=work)


def test_zero2_bf16_matches_lightseq_train_bf16(bf16_runs):
    """50 updates against lightseq-train --bf16 (same seed, data and kernels): the loss as fairseq
    logs it every 10 updates (mean of the interval) within 1e-2, and every single update after
    the first ten within 1e-2.

    The runs differ only in bf16 rounding: DeepSpeed back-propagates the normalized loss, fairseq
    the summed one and divides afterwards in fp32, so the bf16 gradients round differently. In the
    first updates (warm-up, the loss falling fast) such differences move single-update losses by
    a few 1e-2 (bf16 against fp32 on the CPU: 3e-2 at update 3, below 2e-3 after update 8)."""
    got, reference = bf16_runs["zero2_bf16"], losses(bf16_runs["reference"])
    assert len(got) == len(reference) == UPDATES
    assert all(r["replaced"] == 4 for r in got)
    got = losses(got)
    for start in range(0, UPDATES, 10):
        a, b = sum(reference[start: start + 10]) / 10, sum(got[start: start + 10]) / 10
        assert abs(a - b) <= 1e-2, f"updates {start + 1}-{start + 10}: {b:.5f} vs {a:.5f}"
    for update, (a, b) in enumerate(zip(reference, got), start=1):
        if update > 10:
            assert abs(a - b) <= 1e-2, f"update {update}: {b:.5f} vs lightseq-train --bf16 {a:.5f}"


def test_zero2_bf16_checkpoint_loads_in_fairseq_generate(bf16_runs, ds_data_bin, tmp_path):
    """The fp32 checkpoint of the bf16 run translates the valid set in fairseq-generate (fp32 and
    --bf16), and as well as lightseq-train's: the same hypothesis for most sentences after 50
    updates of nearly identical training."""
    ours = _generate(ds_data_bin, bf16_runs["work"] / "zero2" / "checkpoint_last.pt", tmp_path / "a")
    theirs = _generate(ds_data_bin, bf16_runs["work"] / "lightseq" / "checkpoint_last.pt",
                       tmp_path / "b")
    assert len(ours) == len(theirs) == len(corpus.generate()["valid"])
    same = sum(ours[i][0] == theirs[i][0] for i in theirs) / len(theirs)
    assert same >= 0.8, f"{same:.0%} identical hypotheses"
    half = _generate(ds_data_bin, bf16_runs["work"] / "zero2" / "checkpoint_last.pt",
                     tmp_path / "c", precision=["--bf16"])
    assert len(half) == len(ours)


def test_zero1_fp16_trains_like_lightseq_train_fp16(ds_data_bin, tmp_path):
    """fp16 with DeepSpeed's dynamic loss scaling (steps skipped on overflow are not counted as
    updates, as in fairseq): 50 updates, and the mean loss of the last ten within 2% of
    lightseq-train --fp16 (the two loss scalers skip different steps early on)."""
    config = write_config(tmp_path, {"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}})
    result = run_worker(tmp_path, {"task": "train", "runs": [{"name": "fp16", "argv": entry_args(
        ds_data_bin, tmp_path / "zero1", config, UPDATES, extra=EXTRA, cpu=False)}]})
    got = losses(result["fp16"])
    reference = losses(lightseq_train(train_flags(ds_data_bin, tmp_path / "lightseq",
                                                  max_update=UPDATES, ls_modules=True, cpu=False,
                                                  extra=EXTRA + ["--fp16"])))
    assert len(got) == UPDATES and all(torch.isfinite(torch.tensor(got)))
    ours, theirs = sum(got[-10:]) / 10, sum(reference[-10:]) / 10
    assert abs(ours - theirs) <= 0.02 * theirs, f"{ours:.4f} vs {theirs:.4f}"


def test_lightseq_deepspeed_through_the_launcher(ds_data_bin, tmp_path):
    """lightseq-deepspeed with launcher options runs DeepSpeed's launcher: two processes on a
    machine with two GPUs (ZeRO-2 bf16, the bundled example config), else one. The run trains
    and writes a checkpoint fairseq-generate loads."""
    from fastpatch.integrations.deepspeed import EXAMPLE_CONFIG

    gpus = min(2, torch.cuda.device_count())
    env = single_process_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # the launcher sets them per process
        env.pop(key)
    flags = train_flags(ds_data_bin, tmp_path / "ckpt", max_update=30, ls_modules=True, cpu=False,
                        extra=EXTRA + ["--log-interval", "10"])
    proc = subprocess.run([sys.executable, "-m", "fastpatch.integrations.deepspeed.cli",
                           "--num_gpus", str(gpus), "--master_port", env["MASTER_PORT"], *flags,
                           "--deepspeed_config", EXAMPLE_CONFIG],
                          env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert f"dist_world_size={gpus}" in output
    logged = [float(m) for m in re.findall(r"\| train_inner \| .*?loss=([\d.]+)", output)]
    assert len(logged) == 3 and logged[-1] < logged[0]
    assert len(_generate(ds_data_bin, tmp_path / "ckpt" / "checkpoint_last.pt", tmp_path / "gen")) \
        == len(corpus.generate()["valid"])
    assert os.path.isdir(tmp_path / "ckpt" / "deepspeed" / "update_30")
