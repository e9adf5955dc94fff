"""fairseq's ``Trainer`` with the model, optimizer and learning rate inside a DeepSpeed engine.

:class:`DeepSpeedTrainer` is handed to fairseq's own training loop (``fairseq_cli.train.main``),
so data iterators, validation, logging, stopping and checkpoint naming are fairseq's. What changes:

* the model is wrapped by ``deepspeed.initialize`` (ZeRO 0/1/2, fp16/bf16, DeepSpeed's optimizer
  and scheduler from the config), built lazily after a checkpoint's weights are loaded into the
  fp32 model, so that DeepSpeed's fp32 masters start from them;
* without an ``optimizer`` section in the config, fairseq's ``--optimizer`` (e.g. ``ls_adam``,
  fastpatch's multi-tensor Adam) is built as usual and given to DeepSpeed as the client optimizer,
  and fairseq's ``--lr-scheduler`` drives its learning rate, exactly as under ``fairseq-train``;
* ``train_step`` normalizes gradients as fairseq does: fairseq back-propagates summed losses and
  afterwards divides the gradients by the update's total sample size (tokens, or sentences with
  ``--sentence-avg``). DeepSpeed reduces gradients during backward (ZeRO-2 partitions them), so
  there is no "afterwards": the total is computed first from the batches of the update (one
  scalar all-reduce) and each batch's loss is scaled by ``world_size / total`` before backward;
  DeepSpeed's averaging over ranks then yields the same ``sum of gradients / total``;
* checkpoints hold the consolidated fp32 model (see :mod:`.checkpoint`) and point at DeepSpeed's
  own checkpoint of the optimizer state, which ``load_checkpoint`` restores.

Not supported (refused when the arguments are parsed): fairseq's own fp16/bf16/AMP flags (the
config's ``fp16``/``bf16`` sections replace them), ``--store-ema``, BMUF, model/pipeline
parallelism, FSDP and fairseq's ``--zero-sharding``, criteria with parameters.
"""
from __future__ import annotations

import logging
import time

import torch
from fairseq import checkpoint_utils, optim, utils
from fairseq.distributed import utils as distributed_utils
from fairseq.file_io import PathManager
from fairseq.logging import meters, metrics
from fairseq.optim import lr_scheduler
from fairseq.optim.fairseq_optimizer import FairseqOptimizer
from fairseq.trainer import Trainer
from omegaconf import OmegaConf

from . import checkpoint

logger = logging.getLogger("fastpatch.deepspeed")


class EngineOptimizer(FairseqOptimizer):
    """fairseq's optimizer interface over a DeepSpeed engine.

    ``param_groups`` (hence ``get_lr``/``set_lr``, which fairseq's LR schedulers call) are those of
    the engine's basic optimizer, whose groups DeepSpeed's wrappers step; ``backward`` and ``step``
    are the engine's. Gradient post-processing (``multiply_grads``, ``clip_grad_norm``) happens
    inside the engine and is refused here.
    """

    def __init__(self, cfg, engine):
        super().__init__(cfg)
        self.engine = engine
        self._optimizer = engine.basic_optimizer
        #: multiplies each loss before backward (see the module docstring)
        self.loss_factor = 1.0

    @property
    def name(self) -> str:
        """Recorded in checkpoints and compared when restoring the optimizer state."""
        return f"DeepSpeed[{type(self._optimizer).__name__}]"

    @property
    def optimizer_config(self):
        return {k: v for k, v in self.param_groups[0].items() if k != "params"}

    def backward(self, loss):
        self.engine.backward(loss * self.loss_factor, scale_wrt_gas=False)

    def step(self, closure=None, scale=1.0, groups=None):
        self.engine.step()

    def zero_grad(self):
        self.engine.optimizer.zero_grad()

    def _done_by_engine(self, *args, **kwargs):
        raise RuntimeError("under DeepSpeed, gradients are reduced, scaled and clipped by the engine")

    multiply_grads = clip_grad_norm = all_reduce_grads = _done_by_engine


class EngineLRSchedule:
    """fairseq's LR-scheduler interface over a learning rate DeepSpeed manages: the config's
    ``scheduler`` (stepped by ``engine.step()``, its state saved in DeepSpeed's checkpoint) or the
    constant ``lr`` of the config's ``optimizer``."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self):
        return {"deepspeed": True}

    def load_state_dict(self, state_dict):
        pass

    def step_begin_epoch(self, epoch):
        return self.step_update(None)

    def step(self, epoch, val_loss=None):
        return self.step_update(None)

    def step_update(self, num_updates):
        return self.engine.get_lr()[0]


class DeepSpeedTrainer(Trainer):
    """fairseq's ``Trainer`` over ``deepspeed.initialize(model, config=ds_config)``."""

    def __init__(self, cfg, task, model, criterion, quantizer=None, *, ds_config):
        if utils.has_parameters(criterion):
            raise ValueError(f"criterion {type(criterion).__name__} has parameters: the DeepSpeed "
                             "launch trains the model's parameters only")
        self._ds_config = ds_config
        self._engine = None
        self._pending_model = None
        self._pending_engine_state = None
        super().__init__(cfg, task, model, criterion, quantizer)

    # ------------------------------------------------------------------ the engine
    @property
    def use_distributed_wrapper(self) -> bool:
        return False  # the engine does data parallelism

    @property
    def model(self):
        self._build_engine()
        return self._engine

    @property
    def optimizer(self):
        self._build_engine()
        return self._optimizer

    @property
    def lr_scheduler(self):
        self._build_engine()
        return self._lr_scheduler

    def _build_optimizer(self):
        self._build_engine()

    def _build_engine(self):
        if self._engine is not None:
            return
        import deepspeed

        config = self._ds_config
        params = [p for p in self._model.parameters() if p.requires_grad]
        client = None
        if "optimizer" not in config:
            client = optim.build_optimizer(self.cfg.optimizer, params).optimizer
        engine, _, _, _ = deepspeed.initialize(
            model=self._model, optimizer=client, model_parameters=None if client else params,
            config=config, dist_init_required=False)
        if engine.basic_optimizer.state:
            # DeepSpeed's stage-0 fp16/bf16 wrappers allocate the optimizer state by stepping once
            # on zero gradients; for Adam that step counts, so every bias correction would lag one
            # step behind fairseq's. Dropping the state (optimizers re-create it at their first
            # step) makes the first update step 1. The zero-gradient step moved no weight, except
            # for a decoupled weight decay of lr * weight_decay (relative 1e-7 at common settings).
            engine.basic_optimizer.state.clear()
        self._engine = engine
        self._optimizer = EngineOptimizer(self.cfg.optimizer, engine)
        if "optimizer" in config or "scheduler" in config:
            self._lr_scheduler = EngineLRSchedule(engine)
        else:
            self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
            self._lr_scheduler.step_update(0)
        logger.info("DeepSpeed engine: ZeRO stage %d, %s, optimizer %s", engine.zero_optimization_stage(),
                    "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32",
                    self._optimizer.name)

    # ------------------------------------------------------------------ training
    def _expected_sample_size(self, sample) -> float:
        """The sample size the criterion will return, known before the forward pass."""
        sentence_avg = getattr(self.get_criterion(), "sentence_avg", None)
        if sentence_avg is None:
            raise NotImplementedError(
                f"criterion {type(self.get_criterion()).__name__} has no sentence_avg attribute: the "
                "DeepSpeed launch needs to know each batch's sample size before backward (fairseq's "
                "criteria use the target's tokens, or sentences with --sentence-avg)")
        return float(sample["target"].size(0) if sentence_avg else sample["ntokens"])

    @metrics.aggregate("train")
    def train_step(self, samples, raise_oom=False):
        """Forward and backward of the update's batches, then one engine step (see the module
        docstring for the gradient normalization)."""
        self._set_seed()
        engine, optimizer = self.model, self.optimizer
        engine.train()
        self.criterion.train()
        metrics.log_start_time("train_wall", priority=800, round=0)

        prepared = [self._prepare_sample(sample) for sample in samples]
        expected = [0.0 if dummy else self._expected_sample_size(sample) for sample, dummy in prepared]
        total = sum(expected)
        if self.data_parallel_world_size > 1:
            total = float(distributed_utils.all_reduce(
                torch.tensor(total, dtype=torch.float64, device=self.device),
                group=self.data_parallel_process_group))
        optimizer.loss_factor = self.data_parallel_world_size / (total or 1.0)

        logging_outputs, sample_size, is_dummy_batch = [], 0, False
        for i, (sample, is_dummy_batch) in enumerate(prepared):
            engine.set_gradient_accumulation_boundary(i == len(prepared) - 1)
            loss, sample_size_i, logging_output = self.task.train_step(
                sample=sample, model=engine, criterion=self.criterion, optimizer=optimizer,
                update_num=self.get_num_updates(), ignore_grad=is_dummy_batch)
            del loss
            if not is_dummy_batch and float(sample_size_i) != expected[i]:
                raise RuntimeError(
                    f"criterion {type(self.get_criterion()).__name__} returned sample size "
                    f"{float(sample_size_i)} for a batch of {expected[i]}: the gradients of this "
                    "update would be normalized by the wrong total")
            logging_outputs.append(logging_output)
            sample_size += sample_size_i
        engine.step()

        # as fairseq: a dummy batch (a worker out of data) counts for nothing
        sample_size = 0.0 if is_dummy_batch else float(sample_size)
        if self._sync_stats():
            logging_outputs, (sample_size, _, total_train_time) = self._aggregate_logging_outputs(
                logging_outputs, sample_size, 0, self._local_cumulative_training_time(),
                ignore=is_dummy_batch)
            self._cumulative_training_time = total_train_time / self.data_parallel_world_size

        logging_output = None
        if not engine.was_step_applied():
            logger.info("NOTE: gradient overflow detected, ignoring gradient (DeepSpeed skipped "
                        "the step and lowered the loss scale)")
        else:
            self.set_num_updates(self.get_num_updates() + 1)
            if self.cuda and self.cuda_env is not None:
                gb_used = torch.cuda.max_memory_allocated() / 1024 ** 3
                torch.cuda.reset_peak_memory_stats()
                metrics.log_scalar("gb_free", self.cuda_env.total_memory_in_GB - gb_used,
                                   priority=1500, round=1, weight=0)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is None:  # DeepSpeed computes it only where it needs it
                metrics.log_speed("ups", 1.0, priority=100, round=2)
            else:
                grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32).detach().cpu()
            logging_output = self._reduce_and_log_stats(logging_outputs, sample_size, grad_norm)
        if engine.fp16_enabled():
            scale = getattr(engine.optimizer, "loss_scale", None)
            if scale is None:
                scale = getattr(engine.optimizer, "cur_scale", None)
            if scale is not None:
                metrics.log_scalar("loss_scale", float(scale), priority=700, round=4, weight=0)
        metrics.log_stop_time("train_wall")
        return logging_output

    def zero_grad(self):
        self.optimizer.zero_grad()

    # ------------------------------------------------------------------ checkpoints
    @property
    def always_call_state_dict_during_save_checkpoint(self) -> bool:
        return False  # the collectives run in consolidate_optimizer, on every rank

    def consolidate_optimizer(self):
        """Called by fairseq's ``save_checkpoint`` on every rank before the master writes: gathers
        the fp32 model and writes DeepSpeed's optimizer state (both collective)."""
        engine = self.model
        self._pending_model = checkpoint.consolidated_fp32_state_dict(engine)
        self._pending_engine_state = None
        if not self.cfg.checkpoint.no_save_optimizer_state:
            self._pending_engine_state = checkpoint.save_engine_state(
                engine, self.cfg.checkpoint.save_dir, self.get_num_updates(),
                self.is_data_parallel_master)

    def state_dict(self):
        """fairseq's checkpoint layout; ``model`` is the consolidated fp32 state dict."""
        if self._pending_model is None:
            if self.data_parallel_world_size > 1:
                raise RuntimeError("state_dict() of a multi-process DeepSpeed run: call "
                                   "consolidate_optimizer() on every rank first")
            self.consolidate_optimizer()
        model_state, engine_state = self._pending_model, self._pending_engine_state
        self._pending_model = self._pending_engine_state = None
        extra_state = {"metrics": metrics.state_dict(),
                       "previous_training_time": self.cumulative_training_time()}
        if engine_state is not None:
            extra_state[checkpoint.EXTRA_STATE_KEY] = engine_state
        return {
            "args": None,
            "cfg": (OmegaConf.to_container(self.cfg, resolve=True, enum_to_str=True)
                    if OmegaConf.is_config(self.cfg) else self.cfg),
            "model": model_state,
            "criterion": None,
            "optimizer_history": (self._optim_history or []) + [{
                "criterion_name": self.get_criterion().__class__.__name__,
                "optimizer_name": self.optimizer.name,
                "lr_scheduler_state": self.lr_scheduler.state_dict(),
                "num_updates": self.get_num_updates(),
            }],
            "task_state": self.task.state_dict() if self.task is not None else {},
            "extra_state": extra_state,
        }

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                        optimizer_overrides=None, reset_meters=False):
        """fairseq's ``load_checkpoint``: the weights go into the fp32 model before the engine is
        built; the optimizer (and DeepSpeed scheduler) state comes from DeepSpeed's checkpoint the
        file points at. A checkpoint written without DeepSpeed (``lightseq-train``,
        ``fairseq-train``) restores the model and iterator, and the optimizer starts afresh."""
        if not PathManager.isfile(filename):
            logger.info("No existing checkpoint found %s", filename)
            return None
        if self._engine is not None:
            raise RuntimeError("load_checkpoint() must run before the DeepSpeed engine is built")
        logger.info("Preparing to load checkpoint %s", filename)
        state = checkpoint_utils.load_checkpoint_to_cpu(filename) if self.data_parallel_rank == 0 else None
        if self.data_parallel_world_size > 1:
            state = distributed_utils.broadcast_object(
                state, src_rank=0, group=self.data_parallel_process_group, dist_device=self.device)
        history = state.get("optimizer_history") or []
        model = self.get_model()
        try:
            if history and "num_updates" in history[-1]:
                model.set_num_updates(history[-1]["num_updates"])
            model.load_state_dict(state["model"], strict=True, model_cfg=self.cfg.model)
        except Exception as exc:
            raise Exception(f"Cannot load model parameters from checkpoint {filename}; please "
                            "ensure that the architectures match.") from exc
        del state["model"]
        self._optim_history = history
        extra_state = state["extra_state"]

        location = checkpoint.engine_state_location(filename, extra_state)
        if not reset_optimizer and history:
            last = history[-1]
            if location is None:
                logger.warning("%s has no DeepSpeed optimizer state: the optimizer starts afresh "
                               "(as with --reset-optimizer)", filename)
            else:
                self._build_engine()  # from the weights just loaded
                if last["criterion_name"] != self.get_criterion().__class__.__name__:
                    raise ValueError(f"Criterion does not match; please reset the optimizer "
                                     f"(--reset-optimizer). {last['criterion_name']} vs "
                                     f"{self.get_criterion().__class__.__name__}")
                if last["optimizer_name"] != self.optimizer.name:
                    raise ValueError(f"Optimizer does not match; please reset the optimizer "
                                     f"(--reset-optimizer). {last['optimizer_name']} vs "
                                     f"{self.optimizer.name}")
                directory, tag = location
                loaded, _ = self._engine.load_checkpoint(
                    directory, tag=tag, load_optimizer_states=True,
                    load_lr_scheduler_states=not reset_lr_scheduler)
                if loaded is None:  # DeepSpeed only logs this
                    raise RuntimeError(f"DeepSpeed could not load its state {directory}/{tag} "
                                       f"that {filename} points at")
                if not reset_lr_scheduler:
                    self.lr_scheduler.load_state_dict(last["lr_scheduler_state"])
                self.set_num_updates(last["num_updates"])

        itr_state = extra_state["train_iterator"]
        epoch = itr_state["epoch"]
        if "previous_training_time" in extra_state:
            self._previous_training_time = extra_state["previous_training_time"]
            self._start_time = time.time()
        self.lr_step(epoch)
        if itr_state.get("version", 1) >= 2 and itr_state["iterations_in_epoch"] == 0:
            reset_meters = True  # as fairseq: a new epoch starts with fresh meters
        if "metrics" in extra_state and not reset_meters:
            metrics.load_state_dict(extra_state["metrics"])
            for meter in metrics.get_meters("default"):
                if isinstance(meter, meters.TimeMeter):
                    meter.reset()
        logger.info("Loaded checkpoint %s (epoch %d @ %d updates)", filename, epoch,
                    self.get_num_updates())
        return extra_state
