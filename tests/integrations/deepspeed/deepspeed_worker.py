"""Runs DeepSpeed work for the tests in a process of its own (DeepSpeed initializes torch
distributed process-wide, which must not leak into the rest of the test session).

    python deepspeed_worker.py PLAN.json OUT.json

PLAN.json is ``{"task": ..., ...}``:

* ``"train"``, ``"runs": [{"name": ..., "argv": [...]}, ...]``: the DeepSpeed training entry
  in this process, one run after the other; OUT gets, per run, the loss of every update and how
  many modules of the model fastpatch replaced;
* ``"engine"``: ``fastpatch.accelerate`` before ``deepspeed.initialize`` and on the engine,
  against an unaccelerated engine, for a few ZeRO-1 steps of a small fairseq transformer;
* ``"hf_trainer"``, ``"workdir"``: the Hugging Face ``Trainer`` with a DeepSpeed config on an
  accelerated and on a plain BERT.

The caller sets MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE (a world of one).
"""
import copy
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "fairseq"))


def train(plan):
    from fairseq_helpers import recorded_updates

    from fastpatch.integrations.deepspeed.fairseq_train import main

    results = {}
    for run in plan["runs"]:
        with recorded_updates() as records:
            main(run["argv"])
        results[run["name"]] = records
    return results


def _zero1_engine(model, lr=1e-3):
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "AdamW", "params": {"lr": lr, "torch_adam": True}},
              "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=config)
    return engine


def engine():
    """Three identical models: accelerated before deepspeed.initialize, accelerated through the
    engine after it (ZeRO-1 has re-pointed every parameter into its flat buffer by then), and
    plain; four training steps on padded batches; losses compared, and the weights of the two
    accelerated engines."""
    import deepspeed

    import fastpatch
    from fairseq_helpers import dictionary, padded_pair, transformer

    deepspeed.init_distributed(auto_mpi_discovery=False)
    d = dictionary(60)
    base = transformer(d)
    before = _zero1_engine(fastpatch.accelerate(copy.deepcopy(base)))
    after = _zero1_engine(copy.deepcopy(base))
    plain = _zero1_engine(copy.deepcopy(base))
    returned = fastpatch.accelerate(after)
    report = fastpatch.report(after)
    result = {"returned_engine": returned is after,
              "report_replaced": sorted(report.replaced), "report_notes": report.notes,
              "module_report_same": fastpatch.report(after.module) is report,
              "before_replaced": len(fastpatch.report(before.module).replaced),
              "losses": {"before": [], "after": [], "plain": []}}
    for step in range(4):
        src, lengths, prev, target = padded_pair(d, batch=5, src_len=11, tgt_len=8, seed=step)
        for name, eng in (("before", before), ("after", after), ("plain", plain)):
            logits = eng(src, lengths, prev)[0]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     target.reshape(-1), ignore_index=d.pad())
            eng.backward(loss)
            eng.step()
            result["losses"][name].append(float(loss))
    # the same fused code on the same weights, however the model came to be accelerated
    reference = before.module.state_dict()
    result["before_vs_after_weights"] = max((after.module.state_dict()[k] - v).abs().max().item()
                                            for k, v in reference.items())
    layers = [after.module.encoder.layers[0], after.module.decoder.layers[0]]
    result["accelerated_classes"] = [type(m).__name__ for m in layers]
    fastpatch.revert(after)
    result["reverted_classes"] = [type(m).__name__ for m in layers]
    return result


def hf_trainer(plan):
    """HF Trainer, DeepSpeed ZeRO-1 config with "auto" values (the Trainer fills them in)."""
    from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,
                              TrainingArguments)

    import fastpatch

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            mask = torch.zeros(12, dtype=torch.long)
            mask[: 5 + i % 8] = 1  # right padding of every length
            return {"input_ids": torch.randint(5, 100, (12,), generator=g), "attention_mask": mask,
                    "labels": torch.tensor(i % 2)}

    class Losses(TrainerCallback):
        def __init__(self):
            self.values = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(float(logs["loss"]))

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    ds_config = {"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": "auto",
                 "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    result = {}
    for name, model in (("plain", copy.deepcopy(base)),
                        ("accelerated", fastpatch.accelerate(copy.deepcopy(base)))):
        losses = Losses()
        args = TrainingArguments(output_dir=os.path.join(plan["workdir"], name), use_cpu=True,
                                 per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                                 deepspeed=ds_config, report_to=[], logging_steps=1,
                                 save_strategy="no", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Batches(), callbacks=[losses])
        trainer.train()
        result[name] = {"losses": losses.values, "wrapped": type(trainer.model_wrapped).__name__,
                        "replaced": len(fastpatch.report(trainer.model_wrapped).replaced)}
    return result


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    task = plan["task"]
    result = {"train": lambda: train(plan), "engine": engine,
              "hf_trainer": lambda: hf_trainer(plan)}[task]()
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
