"""Helpers for the fairseq integration tests: tiny models, in-process fairseq commands, and
recording the loss of every update."""
import argparse
import contextlib
import io
import os
import subprocess
import sys
from typing import Dict, List, Sequence

import torch

import fastpatch

HERE = os.path.dirname(os.path.abspath(__file__))


class DictTask:
    """What ``TransformerModel.build_model`` needs from a task: the two dictionaries."""

    def __init__(self, src_dict, tgt_dict=None):
        self.source_dictionary = src_dict
        self.target_dictionary = tgt_dict or src_dict


def dictionary(size: int = 40):
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(size - len(d)):
        d.add_symbol(f"w{i}")
    return d


def transformer(src_dict, tgt_dict=None, seed: int = 0, **overrides):
    """A small random ``TransformerModel`` (2+2 layers, width 32, 4 heads, dropout 0)."""
    from fairseq.models.transformer import TransformerModel
    from fairseq.models.transformer.transformer_legacy import base_architecture

    config = dict(arch="transformer", encoder_embed_dim=32, encoder_ffn_embed_dim=48,
                  encoder_layers=2, encoder_attention_heads=4, decoder_embed_dim=32,
                  decoder_ffn_embed_dim=48, decoder_layers=2, decoder_attention_heads=4,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    config.update(overrides)
    args = argparse.Namespace(**config)
    base_architecture(args)
    torch.manual_seed(seed)
    return TransformerModel.build_model(args, DictTask(src_dict, tgt_dict))


def padded_pair(d, batch: int = 4, src_len: int = 9, tgt_len: int = 7, seed: int = 0):
    """(src_tokens left-padded as fairseq's translation task, src_lengths, prev_output_tokens
    right-padded, target), with ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    low = d.nspecial
    src = torch.randint(low, len(d), (batch, src_len), generator=g)
    tgt = torch.randint(low, len(d), (batch, tgt_len), generator=g)
    for row in range(1, batch):
        src[row, : min(src_len - 1, 2 * row)] = d.pad()
        tgt[row, max(1, tgt_len - 2 * row):] = d.pad()
    src[:, -1] = d.eos()
    prev = torch.cat([torch.full((batch, 1), d.eos()), tgt[:, :-1]], dim=1)
    prev = prev.masked_fill(tgt.eq(d.pad()), d.pad())
    return src, src.ne(d.pad()).sum(1), prev, tgt


@contextlib.contextmanager
def argv(args: Sequence[str]):
    saved = sys.argv
    sys.argv = list(args)
    try:
        yield
    finally:
        sys.argv = saved


def train_flags(data, save_dir, max_update=6, ls_modules=False, extra=(), cpu=True):
    """transformer_tiny, Adam, label-smoothed CE, dropout 0, fp32 (on the CPU unless ``cpu`` is
    False); ``ls_modules`` selects the ls_* arch, optimizer and criterion."""
    prefix = "ls_" if ls_modules else ""
    return [data, "--arch", f"{prefix}transformer_tiny", "--optimizer", f"{prefix}adam",
            "--adam-betas", "(0.9, 0.98)", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt",
            "--warmup-updates", "4", "--criterion", f"{prefix}label_smoothed_cross_entropy",
            "--label-smoothing", "0.1", "--max-tokens", "2000", "--dropout", "0",
            "--max-update", str(max_update), "--seed", "1", "--num-workers", "0",
            "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--no-progress-bar",
            "--disable-validation", *(["--cpu"] if cpu else []), *extra]


@contextlib.contextmanager
def recorded_updates():
    """Records, for every ``train_step``: the loss per token and how many modules of the model
    fastpatch replaced (0 for an unaccelerated model)."""
    from fairseq.tasks import FairseqTask

    records: List[Dict] = []
    original = FairseqTask.train_step

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        loss, sample_size, logging_output = original(self, sample, model, criterion, optimizer,
                                                     update_num, ignore_grad)
        records.append({"loss": float(loss.detach()) / sample_size,
                        "replaced": len(fastpatch.report(getattr(model, "module", model)).replaced)})
        return loss, sample_size, logging_output

    FairseqTask.train_step = train_step
    try:
        yield records
    finally:
        FairseqTask.train_step = original


def preprocess(args: Sequence[str]) -> None:
    """``fairseq-preprocess`` in this process."""
    from fairseq_cli import preprocess as command

    with argv(["fairseq-preprocess"] + list(args)):
        command.cli_main()


def fairseq_train(args: Sequence[str]) -> List[Dict]:
    """Plain ``fairseq-train`` in this process; returns the recorded updates.

    fairseq 0.12 cannot run ``--bf16`` on a GPU as shipped (it implies ``--tpu``); the reference
    gets the one-flag correction ``lightseq-train`` applies, nothing else.
    """
    from fairseq_cli import train

    from fastpatch.integrations.fairseq.cli import bf16_without_implied_tpu

    with recorded_updates() as records, argv(["fairseq-train"] + list(args)), \
            bf16_without_implied_tpu(args):
        train.cli_main()
    return records


def lightseq_train(args: Sequence[str]) -> List[Dict]:
    """``lightseq-train`` in this process; returns the recorded updates."""
    from fastpatch.integrations.fairseq import cli

    with recorded_updates() as records:
        cli.train(list(args))
    return records


def lightseq_generate(args: Sequence[str]) -> None:
    from fastpatch.integrations.fairseq import cli

    cli.generate(list(args))


def plain_fairseq_generate(args: Sequence[str]) -> subprocess.CompletedProcess:
    """``fairseq-generate`` in a fresh process where fastpatch registers nothing: only torch's
    allow-list is extended (fairseq 0.12 cannot load any checkpoint under torch >= 2.6 without
    it). The script checks that no ``ls_*`` architecture exists there."""
    return subprocess.run([sys.executable, os.path.join(HERE, "plain_fairseq_generate.py"), *args],
                          capture_output=True, text=True, timeout=300)


def hypotheses(results_dir: str, subset: str = "test") -> Dict[int, tuple]:
    """sentence id -> (hypothesis string, score) from fairseq-generate's ``--results-path``."""
    found = {}
    with open(os.path.join(results_dir, f"generate-{subset}.txt"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("H-"):
                index, score, text = line.rstrip("\n").split("\t")
                found[int(index[2:])] = (text, float(score))
    return found


def quiet_stdout():
    return contextlib.redirect_stdout(io.StringIO())
