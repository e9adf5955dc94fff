"""lightseq-train / lightseq-generate end to end on the bundled corpus, against fairseq's own
commands with the same seed and flags (fp32, dropout 0, CPU)."""
import os
import shutil
import traceback

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq_helpers import (argv, fairseq_train, hypotheses, lightseq_generate,  # noqa: E402
                             lightseq_train, plain_fairseq_generate, preprocess, quiet_stdout,
                             train_flags)

from fastpatch.integrations.fairseq import corpus  # noqa: E402
from fastpatch.integrations.fairseq.checkpoints import allow_fairseq_checkpoints  # noqa: E402
from fastpatch.integrations.fairseq.demo import preprocess_args  # noqa: E402

LOSS_TOL = 1e-4


def _checkpoint(path):
    allow_fairseq_checkpoints()
    return torch.load(path, map_location="cpu")


def assert_same_losses(reference, got, what):
    assert len(got) == len(reference) > 0, what
    for update, (a, b) in enumerate(zip(reference, got), start=1):
        assert abs(a["loss"] - b["loss"]) <= LOSS_TOL, \
            f"{what}: update {update}: loss {b['loss']:.7f} vs fairseq {a['loss']:.7f}"


@pytest.mark.parametrize("ls_modules", [False, True], ids=["same_flags", "ls_modules"])
def test_lightseq_train_matches_fairseq_train(data_bin, tmp_path, ls_modules):
    """Same flags (or the ls_* twins of arch, optimizer and criterion): the loss of every update
    equals fairseq-train's, the model was fused, and the checkpoint is a plain transformer one."""
    reference = fairseq_train(train_flags(data_bin, tmp_path / "fairseq"))
    got = lightseq_train(train_flags(data_bin, tmp_path / "lightseq", ls_modules=ls_modules))
    assert all(r["replaced"] == 0 for r in reference)
    assert all(r["replaced"] == 4 for r in got), "lightseq-train did not accelerate the model"
    assert_same_losses(reference, got, "lightseq-train")

    ours = _checkpoint(tmp_path / "lightseq" / "checkpoint_last.pt")
    theirs = _checkpoint(tmp_path / "fairseq" / "checkpoint_last.pt")
    assert list(ours["model"]) == list(theirs["model"])
    assert ours["cfg"]["model"].arch == "transformer_tiny"
    for key, value in theirs["model"].items():
        assert ours["model"][key].dtype == value.dtype and ours["model"][key].shape == value.shape


def test_bf16_runs_without_the_tpu_fairseq_implies(data_bin, tmp_path):
    """fairseq 0.12 turns --bf16 into --tpu and then asks for an XLA device; lightseq-train
    trains in bf16 on the device it was given (the CPU here, a GPU in the cuda tests)."""
    flags = train_flags(data_bin, tmp_path / "fairseq", max_update=3, extra=["--bf16"])
    with pytest.raises(AttributeError, match="xla_device"):
        with argv(["fairseq-train"] + flags):
            from fairseq_cli import train

            train.cli_main()
    got = lightseq_train(train_flags(data_bin, tmp_path / "lightseq", max_update=3,
                                     extra=["--bf16"]))
    assert len(got) == 3 and all(r["replaced"] == 4 for r in got)
    assert all(0 < r["loss"] < 20 for r in got)
    common = _checkpoint(tmp_path / "lightseq" / "checkpoint_last.pt")["cfg"]["common"]
    assert common["bf16"] and not common["tpu"]


@pytest.fixture(scope="module")
def lightseq_checkpoint(data_bin, tmp_path_factory):
    """A model trained by lightseq-train with the ls_* modules, long enough to translate."""
    save_dir = tmp_path_factory.mktemp("ls-trained")
    lightseq_train(train_flags(data_bin, save_dir, max_update=40, ls_modules=True,
                               extra=["--max-tokens", "4000", "--lr", "3e-3"]))
    return str(save_dir / "checkpoint_last.pt")


GENERATE = ["--gen-subset", "valid", "--beam", "4", "--max-len-a", "1.2", "--max-len-b", "5",
            "--cpu", "--max-tokens", "4000"]


@pytest.mark.parametrize("on_engine", [True, False], ids=["engine", "fused_layers"])
def test_plain_fairseq_generate_matches_lightseq_generate(data_bin, lightseq_checkpoint, tmp_path,
                                                          monkeypatch, caplog, on_engine):
    """A lightseq-train checkpoint loads in plain fairseq-generate (no --user-dir), and
    lightseq-generate produces the same hypotheses with beam 4: on the decoding engine (on the
    CPU only when asked for; it is the default on CUDA) and over the fused layers alone."""
    from fastpatch.integrations.fairseq.engine import ENV_FLAG

    plain = plain_fairseq_generate([data_bin, "--path", lightseq_checkpoint,
                                    "--results-path", str(tmp_path / "plain"), *GENERATE])
    assert plain.returncode == 0, plain.stderr[-3000:]
    monkeypatch.setenv(ENV_FLAG, "1" if on_engine else "0")
    with quiet_stdout(), caplog.at_level("INFO", logger="fastpatch.fairseq"):
        lightseq_generate([data_bin, "--path", lightseq_checkpoint,
                           "--results-path", str(tmp_path / "fused"), *GENERATE])
    said = "runs on the decoding engine" if on_engine else f"fairseq's decoder: {ENV_FLAG}=0"
    assert said in caplog.text
    expected, got = hypotheses(tmp_path / "plain", "valid"), hypotheses(tmp_path / "fused", "valid")
    assert len(expected) == len(corpus.generate()["valid"]) == len(got)
    assert len({text for text, _ in expected.values()}) > 20, "model too untrained to compare"
    for index, (text, score) in expected.items():
        assert got[index][0] == text, f"sentence {index}"
        assert abs(got[index][1] - score) < 1e-4


def test_fairseq_checkpoint_continues_under_lightseq_train(data_bin, tmp_path):
    """--restore-file of a fairseq-train checkpoint: lightseq-train continues exactly as
    fairseq-train does (same data order, optimizer state and losses)."""
    fairseq_train(train_flags(data_bin, tmp_path / "start", max_update=4))
    restore = ["--restore-file", str(tmp_path / "start" / "checkpoint_last.pt")]
    reference = fairseq_train(train_flags(data_bin, tmp_path / "fairseq", max_update=8, extra=restore))
    got = lightseq_train(train_flags(data_bin, tmp_path / "lightseq", max_update=8, extra=restore))
    assert len(reference) == 4
    assert all(r["replaced"] == 4 for r in got)
    assert_same_losses(reference, got, "restored lightseq-train")


def _frames(exc):
    return [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]


def test_unknown_arch_is_fairseqs_argparse_error(data_bin, tmp_path, capsys):
    flags = train_flags(data_bin, tmp_path)
    flags[flags.index("transformer_tiny")] = "ls_transformer_nope"
    with pytest.raises(SystemExit) as exit_info:
        lightseq_train(flags)
    assert exit_info.value.code == 2
    assert "invalid choice: 'ls_transformer_nope'" in capsys.readouterr().err


def test_mismatched_dictionary_and_corrupt_checkpoint_errors(data_bin, lightseq_checkpoint, tmp_path):
    """The errors fairseq itself gives, raised before any fused kernel runs."""
    small = str(tmp_path / "small-vocab-bin")  # the same corpus with 50-word dictionaries
    preprocess(preprocess_args(small) + ["--nwordssrc", "50", "--nwordstgt", "50"])
    with pytest.raises(RuntimeError, match="size mismatch for encoder.embed_tokens.weight") as err:
        lightseq_generate([small, "--path", lightseq_checkpoint, *GENERATE])
    assert not any("fastpatch" in f and "ops" in f for f in _frames(err.value))

    corrupt = tmp_path / "corrupt.pt"
    with open(lightseq_checkpoint, "rb") as f:
        corrupt.write_bytes(f.read()[: 4096])
    with pytest.raises(RuntimeError, match="PytorchStreamReader failed") as err:
        lightseq_generate([data_bin, "--path", str(corrupt), *GENERATE])
    assert "checkpoint_utils.py" in " ".join(_frames(err.value))


def test_bundled_corpus_is_what_the_generator_writes(tmp_path):
    corpus.write_corpus(str(tmp_path))
    for name in sorted(os.listdir(corpus.DATA_DIR)):
        with open(os.path.join(corpus.DATA_DIR, name), "rb") as shipped, \
                open(tmp_path / name, "rb") as regenerated:
            assert shipped.read() == regenerated.read(), name
    sources = [pair[0] for pairs in corpus.generate().values() for pair in pairs]
    assert len(sources) == len(set(sources)) == sum(corpus.SPLITS.values())


def test_demo_runs_end_to_end(tmp_path, capsys):
    from fastpatch.integrations.fairseq import cli

    cli.train(["--demo", "--demo-dir", str(tmp_path / "demo"), "--max-update", "5", "--cpu"])
    out = capsys.readouterr().out
    assert "lightseq-train" in out and "BLEU4" in out and "source:" in out
    assert os.path.exists(tmp_path / "demo" / "checkpoints" / "checkpoint_last.pt")
    shutil.rmtree(tmp_path / "demo")


def test_lightseq_interactive_matches_fairseq_interactive(data_bin, lightseq_checkpoint, tmp_path,
                                                          capsys, monkeypatch):
    from fairseq_cli import interactive

    from fastpatch.integrations.fairseq import cli
    from fastpatch.integrations.fairseq.engine import ENV_FLAG

    monkeypatch.setenv(ENV_FLAG, "1")  # the engine, as on CUDA

    sources = [src for src, _ in corpus.generate()["test"][:6]]
    (tmp_path / "input.txt").write_text("\n".join(sources) + "\n")
    flags = [data_bin, "--path", lightseq_checkpoint, "--input", str(tmp_path / "input.txt"),
             "--beam", "4", "--cpu", "--source-lang", corpus.SOURCE_LANG,
             "--target-lang", corpus.TARGET_LANG, "--buffer-size", "3", "--batch-size", "3"]
    outputs = []
    for run in (lambda: cli.interactive(flags), lambda: interactive.cli_main()):
        with argv(["fairseq-interactive"] + flags):
            run()
        lines = capsys.readouterr().out.splitlines()
        outputs.append([line.split("\t")[-1] for line in lines if line.startswith("H-")])
    assert len(outputs[0]) == len(sources)
    assert outputs[0] == outputs[1]


def test_accelerate_a_model_loaded_by_checkpoint_utils(data_bin, lightseq_checkpoint):
    """fastpatch.accelerate on what fairseq's loaders return (a plain TransformerModel)."""
    import copy

    from fairseq import checkpoint_utils

    import fastpatch

    models, _ = checkpoint_utils.load_model_ensemble([lightseq_checkpoint],
                                                     arg_overrides={"data": data_bin})
    original = models[0].eval()
    assert type(original).__name__ == "TransformerModel"
    fused = fastpatch.accelerate(copy.deepcopy(original))
    report = fastpatch.report(fused)
    assert report.fully_accelerated and len(report.replaced) == 4, str(report)
    src = torch.randint(4, 100, (3, 9))
    src[1, :3] = 1
    lengths = src.ne(1).sum(1)
    prev = torch.randint(4, 100, (3, 6))
    with torch.no_grad():
        a, b = original(src, lengths, prev)[0], fused(src, lengths, prev)[0]
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
