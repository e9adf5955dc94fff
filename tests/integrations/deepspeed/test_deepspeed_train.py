"""DeepSpeed training end to end on the CPU, one process (a world of one; and two processes once),
against lightseq-train with the same seed and flags (fp32, dropout 0): ZeRO stages 0, 1 and 2,
resuming, the checkpoint in fairseq-generate; fastpatch.accelerate on DeepSpeed engines; the HF
Trainer with a DeepSpeed config.

Tolerance of the loss parity, 1e-5 per update: both runs execute the same fused kernels on the same
batches in the same order; they differ in where the 1/sample-size normalization is applied (to the
loss before backward here, to the gradients after it in fairseq: one rounding of each gradient
element, relative 6e-8) and in that ZeRO steps Adam on flattened fp32 partitions (the same
element-wise arithmetic). On the machine the tests were written on the losses agree bit for bit.
"""
import pytest
import torch

pytest.importorskip("fairseq")
pytest.importorskip("deepspeed")

from deepspeed_helpers import entry_args, losses, run_worker, write_config  # noqa: E402
from fairseq_helpers import argv, hypotheses, lightseq_train, quiet_stdout, train_flags  # noqa: E402

from fastpatch.integrations.deepspeed.checkpoint import EXTRA_STATE_KEY  # noqa: E402
from fastpatch.integrations.fairseq import corpus  # noqa: E402
from fastpatch.integrations.fairseq.checkpoints import allow_fairseq_checkpoints  # noqa: E402

LOSS_TOL = 1e-5
UPDATES = 8


def _checkpoint(path):
    allow_fairseq_checkpoints()
    return torch.load(path, map_location="cpu")


@pytest.fixture(scope="module")
def runs(ds_data_bin, tmp_path_factory):
    """In one DeepSpeed process: ZeRO-1 for 8 updates; ZeRO-0 and ZeRO-2 for 4; ZeRO-1 for 4
    updates, then the same command again with --max-update 8 (fairseq restores checkpoint_last);
    bf16 under ZeRO-0 and ZeRO-2 for 3; ZeRO-1 from a lightseq-train checkpoint for 3. Plus, in
    this process, the lightseq-train references."""
    work = tmp_path_factory.mktemp("ds-train")
    configs = {stage: write_config(work, {"zero_optimization": {"stage": stage}}, f"zero{stage}.json")
               for stage in (0, 1, 2)}
    bf16 = {stage: write_config(work, {"zero_optimization": {"stage": stage}, "bf16": {"enabled": True}},
                                f"zero{stage}-bf16.json") for stage in (0, 2)}
    plan = {"task": "train", "runs": [
        {"name": "zero1", "argv": entry_args(ds_data_bin, work / "zero1", configs[1], UPDATES)},
        {"name": "zero0", "argv": entry_args(ds_data_bin, work / "zero0", configs[0], 4)},
        {"name": "zero2", "argv": entry_args(ds_data_bin, work / "zero2", configs[2], 4)},
        {"name": "first_half", "argv": entry_args(ds_data_bin, work / "resumed", configs[1], 4)},
        {"name": "second_half", "argv": entry_args(ds_data_bin, work / "resumed", configs[1], UPDATES)},
        {"name": "zero0_bf16", "argv": entry_args(ds_data_bin, work / "zero0-bf16", bf16[0], 3)},
        {"name": "zero2_bf16", "argv": entry_args(ds_data_bin, work / "zero2-bf16", bf16[2], 3)},
    ]}
    # a lightseq-train checkpoint (no DeepSpeed state) to start a DeepSpeed run from
    lightseq_train(train_flags(ds_data_bin, work / "start", max_update=2, ls_modules=True))
    restore = ["--restore-file", str(work / "start" / "checkpoint_last.pt")]
    plan["runs"].append({"name": "from_lightseq", "argv": entry_args(
        ds_data_bin, work / "from-lightseq", configs[1], 3, extra=restore)})
    result = run_worker(work, plan)
    reference = lightseq_train(train_flags(ds_data_bin, work / "lightseq", max_update=UPDATES,
                                           ls_modules=True))
    from_lightseq = lightseq_train(train_flags(ds_data_bin, work / "from-lightseq-ref", max_update=3,
                                               ls_modules=True, extra=restore + ["--reset-optimizer"]))
    return dict(result, reference=reference, from_lightseq_reference=from_lightseq, work=work)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_match_lightseq_train(runs, stage):
    got = runs[f"zero{stage}"]
    reference = losses(runs["reference"])[: len(got)]
    assert all(r["replaced"] == 4 for r in got), "the DeepSpeed run did not accelerate the model"
    assert len(got) == (UPDATES if stage == 1 else 4)
    for update, (a, b) in enumerate(zip(reference, losses(got)), start=1):
        assert abs(a - b) <= LOSS_TOL, f"ZeRO-{stage} update {update}: {b:.8f} vs {a:.8f}"


def test_checkpoint_is_a_fairseq_fp32_checkpoint(runs):
    """Same keys, shapes and dtypes as lightseq-train's checkpoint, the plain architecture name,
    and the weights lightseq-train reached (1e-6; the k_proj biases are left out: their gradient
    is zero up to rounding, softmax being shift-invariant, and Adam turns that rounding noise
    into steps of size lr in both runs, without effect on any output)."""
    ours = _checkpoint(runs["work"] / "zero1" / "checkpoint_last.pt")
    theirs = _checkpoint(runs["work"] / "lightseq" / "checkpoint_last.pt")
    assert list(ours["model"]) == list(theirs["model"])
    assert ours["cfg"]["model"].arch == "transformer_tiny"
    assert ours["optimizer_history"][-1]["num_updates"] == UPDATES
    assert ours["extra_state"][EXTRA_STATE_KEY]["tag"] == f"update_{UPDATES}"
    assert ours["extra_state"]["train_iterator"]["epoch"] == 1
    for key, value in theirs["model"].items():
        mine = ours["model"][key]
        assert mine.dtype == value.dtype == torch.float32 and mine.shape == value.shape, key
        if not key.endswith("k_proj.bias"):
            assert (mine - value).abs().max() <= 1e-6, key


def test_bf16_checkpoint_holds_the_fp32_master_weights(runs):
    """bf16 training: the checkpoint is fp32 and holds DeepSpeed's fp32 masters, not the bf16
    weights the model computes with; ZeRO-0 (DeepSpeed's bf16 optimizer wrapper) and ZeRO-2
    train alike, and close to fp32 training (3 updates)."""
    for stage in (0, 2):
        state = _checkpoint(runs["work"] / f"zero{stage}-bf16" / "checkpoint_last.pt")["model"]
        weights = [v for k, v in state.items() if k.endswith("fc1.weight")]
        assert all(w.dtype == torch.float32 for w in state.values() if w.is_floating_point())
        assert all((w != w.bfloat16().float()).any() for w in weights), f"ZeRO-{stage}: bf16 weights"
    zero0, zero2 = losses(runs["zero0_bf16"]), losses(runs["zero2_bf16"])
    assert zero0 == zero2
    for a, b in zip(losses(runs["reference"]), zero2):
        assert abs(a - b) <= 1e-2


def test_restart_continues_exactly(runs):
    """The second run restores checkpoint_last.pt and DeepSpeed's optimizer state: updates 5-8
    have the losses of the uninterrupted run."""
    first, second = losses(runs["first_half"]), losses(runs["second_half"])
    assert len(first) == 4 and len(second) == UPDATES - 4
    straight = losses(runs["zero1"])
    assert first == straight[:4]
    for update, (a, b) in enumerate(zip(straight[4:], second), start=5):
        assert abs(a - b) <= LOSS_TOL, f"update {update}: {b:.8f} vs {a:.8f}"


def test_lightseq_train_checkpoint_starts_a_deepspeed_run(runs):
    """A checkpoint without DeepSpeed state (lightseq-train's): the model and data position are
    restored and the optimizer starts afresh, i.e. lightseq-train --reset-optimizer."""
    got, expected = losses(runs["from_lightseq"]), losses(runs["from_lightseq_reference"])
    assert len(got) == len(expected) == 3
    for update, (a, b) in enumerate(zip(expected, got), start=1):
        assert abs(a - b) <= LOSS_TOL, f"update {update}: {b:.8f} vs {a:.8f}"


def test_two_processes_match_update_freq_2(ds_data_bin, tmp_path):
    """Two DeepSpeed processes (ZeRO-2, gloo on the CPU) train as one process accumulating two
    batches per update (fairseq shards batch 2k to rank 0 and 2k+1 to rank 1, and
    --update-freq 2 groups the same two): each rank's batch losses are lightseq-train's, and the
    checkpoint rank 0 writes after gathering the partitions holds lightseq-train's weights (3e-8
    here: the all-reduce adds the two halves in another order)."""
    config = write_config(tmp_path, {"zero_optimization": {"stage": 2}})
    ranks = run_worker(tmp_path, {"task": "train", "runs": [
        {"name": "two", "argv": entry_args(ds_data_bin, tmp_path / "two", config, 4)}]}, world_size=2)
    reference = lightseq_train(train_flags(ds_data_bin, tmp_path / "lightseq", max_update=4,
                                           ls_modules=True, extra=["--update-freq", "2"]))
    for rank, result in enumerate(ranks):
        expected = losses(reference)[rank::2]
        for update, (a, b) in enumerate(zip(expected, losses(result["two"])), start=1):
            assert abs(a - b) <= LOSS_TOL, f"rank {rank}, update {update}: {b:.8f} vs {a:.8f}"
    ours = _checkpoint(tmp_path / "two" / "checkpoint_last.pt")["model"]
    theirs = _checkpoint(tmp_path / "lightseq" / "checkpoint_last.pt")["model"]
    for key, value in theirs.items():
        if not key.endswith("k_proj.bias"):
            assert (ours[key] - value).abs().max() <= 1e-6, key


def test_checkpoint_loads_in_fairseq_generate(runs, ds_data_bin, tmp_path):
    """fairseq's own generate (no --user-dir) translates the valid set with the checkpoint."""
    from fairseq_cli import generate

    flags = [ds_data_bin, "--path", str(runs["work"] / "zero1" / "checkpoint_last.pt"),
             "--gen-subset", "valid", "--beam", "2", "--max-len-a", "1.2", "--max-len-b", "5",
             "--cpu", "--max-tokens", "4000", "--results-path", str(tmp_path)]
    allow_fairseq_checkpoints()
    with quiet_stdout(), argv(["fairseq-generate"] + flags):
        generate.cli_main()
    assert len(hypotheses(tmp_path, "valid")) == len(corpus.generate()["valid"])


def test_accelerate_walks_the_deepspeed_engine(tmp_path):
    """accelerate(engine) accelerates engine.module (after ZeRO-1 has moved every parameter into
    its flat buffer) exactly as accelerate before deepspeed.initialize does, and both train as
    the unaccelerated engine does."""
    result = run_worker(tmp_path, {"task": "engine"})
    assert result["returned_engine"] and result["module_report_same"]
    assert result["report_replaced"] == ["decoder.layers.0", "decoder.layers.1",
                                         "encoder.layers.0", "encoder.layers.1"]
    assert "walked DeepSpeedEngine.module" in result["report_notes"]
    assert result["before_replaced"] == 4
    plain = result["losses"]["plain"]
    for name in ("before", "after"):
        for step, (a, b) in enumerate(zip(plain, result["losses"][name])):
            assert abs(a - b) <= 1e-5 * abs(a), f"{name}, step {step}: {b} vs {a}"
    assert result["losses"]["before"] == result["losses"]["after"]
    assert result["before_vs_after_weights"] == 0.0
    original = ["TransformerEncoderLayerBase", "TransformerDecoderLayerBase"]
    assert result["accelerated_classes"] != original and result["reverted_classes"] == original


def test_hf_trainer_with_deepspeed_config(tmp_path):
    """transformers' Trainer with a DeepSpeed ZeRO-1 config ("auto" values filled in by the
    Trainer) trains an accelerated BERT with the plain model's losses; the engine it wraps the
    model in reports the fused layers."""
    result = run_worker(tmp_path, {"task": "hf_trainer", "workdir": str(tmp_path)})
    plain, fused = result["plain"], result["accelerated"]
    assert plain["wrapped"] == fused["wrapped"] == "DeepSpeedEngine"
    assert plain["replaced"] == 0 and fused["replaced"] >= 2
    assert len(fused["losses"]) == len(plain["losses"]) == 4
    for step, (a, b) in enumerate(zip(plain["losses"], fused["losses"])):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: {b} vs {a}"
