"""The DeepSpeed entry's arguments: fairseq's and DeepSpeed's parsed together, the config checked
with errors that name the file and the problem, lightseq-deepspeed's command line, shipped configs."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fairseq")
pytest.importorskip("deepspeed")

from deepspeed_helpers import entry_args, write_config  # noqa: E402

import fastpatch.integrations.deepspeed as ds_integration  # noqa: E402
from fastpatch.integrations.deepspeed import cli  # noqa: E402
from fastpatch.integrations.deepspeed.config import DeepSpeedConfigError, load_config  # noqa: E402
from fastpatch.integrations.deepspeed.fairseq_train import UsageError, parse_args  # noqa: E402
from fastpatch.integrations.fairseq import USER_DIR  # noqa: E402


def test_entry_parses_fairseq_and_deepspeed_arguments(tmp_path):
    config = write_config(tmp_path, {"zero_optimization": {"stage": 1}, "train_batch_size": 32,
                                     "bf16": {"enabled": True}})
    argv = entry_args(str(tmp_path / "data"), tmp_path / "ckpt", config,
                      extra=["--update-freq", "2", "--clip-norm", "0.5"])
    args, engine_config = parse_args(["--local_rank=0", "--deepspeed"] + argv)
    assert (args.arch, args.optimizer, args.criterion) == (
        "ls_transformer_tiny", "ls_adam", "ls_label_smoothed_cross_entropy")
    assert args.device_id == 0 and args.deepspeed and args.deepspeed_config == config
    assert args.max_tokens == 2000 and args.update_freq == [2] and not args.no_fastpatch
    # fairseq decides the batches; DeepSpeed gets one "micro batch" per fairseq batch
    assert "train_batch_size" not in engine_config
    assert engine_config["train_micro_batch_size_per_gpu"] == 1
    assert engine_config["gradient_accumulation_steps"] == 2
    assert engine_config["gradient_clipping"] == 0.5
    assert engine_config["zero_allow_untested_optimizer"] is True  # ls_adam as client optimizer
    assert engine_config["data_types"]["buffer_dtype"] == "bf16"
    assert load_config(config)["train_batch_size"] == 32  # the file itself is only read


def test_clip_norm_default_is_fairseqs_not_deepspeeds(tmp_path):
    """DeepSpeed clips at 1.0 by default, fairseq not at all: without gradient_clipping in the
    config, fairseq's --clip-norm (default 0) decides."""
    config = write_config(tmp_path, {"zero_optimization": {"stage": 2}})
    _, engine_config = parse_args(entry_args("data", tmp_path, config))
    assert engine_config["gradient_clipping"] == 0.0
    config = write_config(tmp_path, {"gradient_clipping": 0.7})
    _, engine_config = parse_args(entry_args("data", tmp_path, config))
    assert engine_config["gradient_clipping"] == 0.7
    assert "zero_allow_untested_optimizer" not in engine_config  # no ZeRO, nothing to vouch for


CONFIG_ERRORS = [
    ("missing", None, "no such file"),
    ("directory", "DIR", "is a directory"),
    ("not_json", "{'zero_optimization': 1}", "is not valid JSON: Expecting property name enclosed "
                                             "in double quotes at line 1 column 2"),
    ("truncated", '{"zero_optimization": {"stage": 1}', "is not valid JSON"),
    ("list", "[1, 2]", "must be a JSON object, got a list"),
    ("duplicate", '{"fp16": {}, "fp16": {}}', "key 'fp16' appears twice"),
    ("zero3", {"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
    ("zero_stage_text", {"zero_optimization": {"stage": "2"}}, "zero_optimization.stage must be 0, "
                                                               "1 or 2, got \"2\""),
    ("zero_bool", {"zero_optimization": True}, "zero_optimization must be an object"),
    ("fp16_and_bf16", {"fp16": {"enabled": True}, "bf16": {"enabled": True}},
     "fp16.enabled and bf16.enabled are both true"),
    ("bf16_alias_twice", {"bf16": {}, "bfloat16": {}}, "both \"bf16\" and its alias"),
    ("enabled_text", {"fp16": {"enabled": "yes"}}, "fp16.enabled must be true or false"),
    ("auto", {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
     "optimizer.params.lr is \"auto\""),
    ("amp", {"amp": {"enabled": True}}, "amp (NVIDIA apex) is not supported"),
    ("optimizer_without_type", {"optimizer": {"params": {"lr": 1e-3}}}, "optimizer.type must name"),
    ("negative_clip", {"gradient_clipping": -1}, "gradient_clipping must be a number >= 0"),
]


@pytest.mark.parametrize("content,problem", [c[1:] for c in CONFIG_ERRORS],
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_config_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "ds.json"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, dict):
        path.write_text(json.dumps(content))
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DeepSpeedConfigError) as err:
        load_config(str(path))
    assert str(err.value).startswith(f"DeepSpeed config {path}: ")
    assert problem in str(err.value)


def without(argv, *flags):
    """``argv`` without each flag of ``flags`` and its value."""
    argv = list(argv)
    for flag in flags:
        at = argv.index(flag)
        del argv[at: at + 2]
    return argv


ADAM = ("--optimizer", "--adam-betas")  # the default flags' ls_adam
DS_LR = ADAM + ("--lr", "--lr-scheduler", "--warmup-updates")
DS_ADAMW = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
CONFLICTS = [
    # id, config, flags removed from the default ones, flags added, error, message
    ("bf16_flag", {}, (), ["--bf16"], UsageError, "--bf16: precision comes from the DeepSpeed config"),
    ("fp16_flag", {}, (), ["--fp16"], UsageError, "set \"fp16\": {\"enabled\": true}"),
    ("two_optimizers", DS_ADAMW, (), [], UsageError,
     "defines an optimizer (AdamW) and --optimizer ls_adam is given"),
    ("no_optimizer", {}, ADAM, [], UsageError, "no optimizer: give --optimizer"),
    ("lr_next_to_config_optimizer", DS_ADAMW, ADAM, [], UsageError,
     "--lr: the learning rate is optimizer.params.lr"),
    ("two_schedulers", {"scheduler": {"type": "WarmupLR", "params": {}}}, (), [], UsageError,
     "--lr-scheduler inverse_sqrt: the DeepSpeed config"),
    ("accumulation_mismatch", {"gradient_accumulation_steps": 4}, (), ["--update-freq", "2"],
     DeepSpeedConfigError, "gradient_accumulation_steps is 4 but --update-freq is 2"),
    ("clip_mismatch", {"gradient_clipping": 1.0}, (), ["--clip-norm", "0.1"], DeepSpeedConfigError,
     "gradient_clipping is 1.0 but --clip-norm is 0.1"),
    ("per_epoch_update_freq", {}, (), ["--update-freq", "2,1"], UsageError, "per-epoch values"),
    ("world_size", {}, (), ["--distributed-world-size", "2"], UsageError,
     "the DeepSpeed launcher decides the processes"),
    ("fsdp", {}, (), ["--ddp-backend", "fully_sharded"], UsageError, "DeepSpeed's ZeRO replaces FSDP"),
    ("ema", {}, (), ["--store-ema"], UsageError, "--store-ema is not supported"),
    ("no_fastpatch_with_ls_arch", {}, (), ["--no-fastpatch"], UsageError,
     "use --arch transformer_tiny to train fairseq's layers"),
]


@pytest.mark.parametrize("config,removed,extra,error,message", [c[1:] for c in CONFLICTS],
                         ids=[c[0] for c in CONFLICTS])
def test_fairseq_arguments_checked_against_config(tmp_path, config, removed, extra, error, message):
    argv = without(entry_args("data", tmp_path / "ckpt", write_config(tmp_path, config)), *removed)
    with pytest.raises(error) as err:
        parse_args(argv + extra)
    assert message in str(err.value)


def test_config_optimizer_and_scheduler_replace_fairseqs(tmp_path):
    config = dict(DS_ADAMW, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 4}})
    argv = without(entry_args("data", tmp_path / "ckpt", write_config(tmp_path, config)), *DS_LR)
    args, engine_config = parse_args(argv)
    assert args.optimizer is None and engine_config["optimizer"]["type"] == "AdamW"


def test_missing_config_argument_and_file_fail_before_anything_heavy(tmp_path):
    """The entry's own errors come before fairseq, DeepSpeed or torch distributed are touched."""
    code = ("import sys\nfrom fastpatch.integrations.deepspeed.fairseq_train import main\n"
            "for argv in (['data'], ['data', '--deepspeed_config', sys.argv[1]]):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        print(exc)\n"
            "print(sorted(m for m in ('fairseq', 'deepspeed') if m in sys.modules))\n")
    missing = str(tmp_path / "nope.json")
    out = subprocess.run([sys.executable, "-c", code, missing], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("lightseq-deepspeed: error: --deepspeed_config is required")
    assert lines[1] == f"lightseq-deepspeed: error: DeepSpeed config {missing}: no such file"
    assert lines[2] == "[]"


def test_lightseq_deepspeed_command_line():
    launcher, training = cli.command(["--num_gpus", "2", "--master_port", "29600", "data-bin",
                                      "--arch", "ls_transformer_tiny", "--deepspeed_config", "c.json"])
    assert launcher == ["--num_gpus", "2", "--master_port", "29600"]
    assert training == ["data-bin", "--arch", "ls_transformer_tiny", "--deepspeed_config", "c.json",
                        "--user-dir", USER_DIR]
    launcher, training = cli.command(["data-bin", "--user-dir=mine", "--deepspeed_config", "c.json"])
    assert launcher == [] and training == ["data-bin", "--user-dir=mine", "--deepspeed_config", "c.json"]
    assert os.path.isfile(ds_integration.ENTRY)


@pytest.mark.parametrize("path", [ds_integration.EXAMPLE_CONFIG,
                                  ds_integration.EXAMPLE_CONFIG_DS_OPTIMIZER],
                         ids=["fairseq_optimizer", "deepspeed_optimizer"])
def test_shipped_configs_are_valid(path, tmp_path):
    config = load_config(path)
    assert config["zero_optimization"]["stage"] == 2 and config["bf16"]["enabled"]
    assert path.endswith(".json")  # setup.py ships fastpatch.integrations.deepspeed/*.json
    argv = entry_args("data", tmp_path, path)
    parse_args(without(argv, *DS_LR) if "optimizer" in config else argv)
