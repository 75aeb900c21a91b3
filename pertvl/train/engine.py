"""`pertvl train`: the shards stream into a DeepSpeed engine wrapping the dual encoder and its losses.

One process per rank, whatever started it (python, torchrun, the deepspeed launcher, srun).
Counting: one optimizer step takes A = gradient_accumulation_steps micro-batches on every rank; an
epoch holds floor(batches_per_epoch / A) steps (the < A micro-batches left are read, not trained
on, so a step never spans two epochs); max_steps, the LR schedule and checkpoints count steps.

Exact resume: a checkpoint holds DeepSpeed's state, every rank's RNG and the client state (epoch,
step in epoch, global step, W&B id, config); the stream restarts at the same sample with the same
augmentation, the DataLoader iterator draws its seed under `fork_rng`, and BatchNorm statistics
are averaged over ranks after every step, so a run killed at step k and resumed reaches
bit-identical parameters. Evaluation during training (train.eval_every) scores an fp32 copy on
rank 0 and touches neither the training module nor any RNG: weights are the same without it.

RUN_DIR: config.yaml, metrics.jsonl, samples.jsonl, ranks/rank{R}.json, checkpoints/, wandb/,
final/ (DualEncoder.save_pretrained, fp32 safetensors).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pertvl.config import RunConfig, load_config, save_config
from pertvl.errors import UserError
from pertvl.files import FolderLock, atomic_write_text, lock_folder
from pertvl.train import checkpoint as ckpt
from pertvl.train.launch import (
    check_precision,
    detect_dist_env,
    init_distributed,
    load_ds_config,
    shutdown_distributed,
)
from pertvl.train.monitor import Monitor, memory_metrics
from pertvl.train.rundir import CONFIG_NAME, FINAL_NAME
from pertvl.train.signals import PREEMPTED_EXIT_CODE, PreemptionFlag
from pertvl.train.watchdog import Watchdog, exit_deadline

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
RANKS_DIR = "ranks"


# ------------------------------------------------------------------------------------ planning


@dataclass(frozen=True)
class StepPlan:
    """How micro-batches become optimizer steps (A = grad_accum micro-batches per step and rank)."""

    micro_batch: int
    grad_accum: int
    world_size: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def samples_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def plan_steps(*, micro_batch: int, grad_accum: int, world_size: int, batches_per_epoch: int,
               max_steps: int | None, epochs: int, warmup_steps: int) -> StepPlan:
    """Count optimizer steps from the stream's micro-batches per epoch (ValueError when an epoch is
    shorter than one step or there is no step to run)."""
    steps_per_epoch = batches_per_epoch // grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {batches_per_epoch} micro-batch(es) per rank, fewer than the {grad_accum} one "
            "optimizer step accumulates; use more data, a smaller micro-batch or less accumulation"
        )
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1 (or null for epochs), got {max_steps}")
    if max_steps is None and epochs < 1:
        raise ValueError(f"train.epochs must be >= 1, got {epochs}")
    total = int(max_steps) if max_steps is not None else int(epochs) * steps_per_epoch
    return StepPlan(micro_batch, grad_accum, world_size, batches_per_epoch, steps_per_epoch, total,
                    min(max(0, int(warmup_steps)), total))


# ------------------------------------------------------------------------------- small helpers


def resolve_config(config: str | os.PathLike | None, overrides: list[str] | None = None, *,
                   no_wandb: bool = False, **flags: Any) -> dict[str, Any]:
    """The run config: DEFAULTS <- CONFIG file <- --set overrides <- the flags that are not None
    (shards, out, deepspeed_config, max_steps, seed, resume: keys of data or train)."""
    cfg = load_config(config, overrides)
    for key, value in flags.items():
        if value is not None:
            cfg["data" if key == "shards" else "train"][key] = value
    if no_wandb:
        cfg["wandb"]["enabled"] = False
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed for dropout after initialisation."""
    digest = hashlib.blake2b(f"pertvl-train/{seed}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def param_checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter and floating buffer (name, dtype, shape, bytes), in module order."""
    h = hashlib.sha256()
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    for name, tensor in tensors:
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def sync_float_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average floating buffers (BatchNorm running statistics) over the ranks: DeepSpeed averages
    gradients only, and the checkpoint (rank 0's module) must describe every rank."""
    if world_size < 2:
        return
    buffers = [b for _, b in module.named_buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in buffers])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= world_size
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset : offset + n].view_as(b).to(b.dtype))
        offset += n


def _image_dtype(engine: Any) -> torch.dtype | None:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None


def _data_metrics(counts: Counter) -> dict[str, int]:
    """data/skipped, data/skipped/<reason> and data/masked/<reason> from the stream's counts."""
    skipped = {k: v for k, v in counts.items() if k.startswith("skipped/")}
    out = {"data/skipped": sum(skipped.values())} if counts else {}
    out.update({f"data/{k}": v for k, v in skipped.items() if v})
    out.update({f"data/{k}": v for k, v in counts.items() if k.startswith("masked/")})
    return out


# --------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TrainResult:
    """What a rank's `train` call ended with: exit_code 0 or PREEMPTED_EXIT_CODE."""

    rank: int
    global_step: int
    exit_code: int
    final_dir: Path | None


# -------------------------------------------------------------------------------------- trainer

Evaluator = Callable[[torch.nn.Module, int], dict[str, Any]]
"""evaluate(model, step) -> {"eval/KEY/metric": value, ...}: scores an eval-mode fp32 DualEncoder."""


@contextlib.contextmanager
def _rng_kept(fork_rng: Callable[[], contextlib.AbstractContextManager]):
    """python's, numpy's and torch's global RNG states as they were on entry, whatever runs inside."""
    py, np_state = random.getstate(), np.random.get_state()
    try:
        with fork_rng():
            yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


class Trainer:
    """Builds the engine, stream and monitor of one rank and runs the training loop."""

    def __init__(self, cfg: dict[str, Any], local_rank: int | None = None,
                 evaluate: Evaluator | None = None, lock: FolderLock | None = None) -> None:  # fmt: skip
        self.config = RunConfig.from_dict(cfg)
        if self.config.train.eval_every > 0 and evaluate is None:
            raise ValueError("train.eval_every > 0 needs an evaluation: train with `pertvl train` (or pass "
                             "pertvl.evaluate.in_training.make_evaluator(config) as `evaluate`)")
        self.evaluate = evaluate if self.config.train.eval_every > 0 else None
        self._eval_model: torch.nn.Module | None = None
        # How this process starts, not what the run is: saved as null.
        self.resume_from, self.config.train.resume = self.config.train.resume, None
        self.run_dir = Path(self.config.train.out)
        self.env = detect_dist_env(argv_local_rank=local_rank)
        self.lock = lock  # rank 0 holds the run folder's write lock (taken here unless given)
        lock_error = self._lock_run_dir() if self.env.rank == 0 and lock is None else None
        self.device = init_distributed(self.env)
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self._agree_on_lock(lock_error)
        self.seed = self.config.train.seed

    def _lock_run_dir(self) -> str | None:
        """Rank 0 takes the run folder's write lock (one run per folder); the reason when it cannot."""
        try:
            self.lock = lock_folder(self.run_dir, " ".join(["pertvl", *sys.argv[1:]]))
        except UserError as e:
            return str(e)
        return None

    def _agree_on_lock(self, error: str | None) -> None:
        """Every rank stops when rank 0 could not lock the run folder (one tiny all_reduce)."""
        if self.world_size > 1:
            flag = torch.tensor([1 if error else 0], dtype=torch.int32, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and error is None:
                error = f"rank 0 could not lock the run folder {self.run_dir} (its log says who holds it)"
        if error:
            raise UserError(error)

    # -- construction ---------------------------------------------------------------------------
    def build(self) -> None:
        import deepspeed

        from pertvl.data.stream import build_train_stream
        from pertvl.losses import PretrainLoss
        from pertvl.model import create_model
        from pertvl.train.instruments import Instruments
        from pertvl.train.optim import build_optimizer, build_scheduler, tower_param_groups
        from pertvl.train.speed import apply_levers

        train, data = self.config.train, self.config.data
        self._refuse_fresh_start_over_checkpoints()  # every rank (one shared run folder): all stop
        ds_config = load_ds_config(train.deepspeed_config, micro_batch=train.micro_batch,
                                   grad_accum=train.grad_accum, gradient_clipping=train.gradient_clipping,
                                   world_size=self.world_size)
        check_precision(ds_config, train.deepspeed_config)  # before minutes of model building
        micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]

        seed_everything(self.seed)  # identical initialisation on every rank
        model = create_model(self.config.model)
        self.loss_fn = PretrainLoss(self.config.loss)
        self.model_kwargs = self.loss_fn.model_kwargs()
        self.pert_counting = self.loss_fn.config.uses_perturbations

        self.stream = build_train_stream(
            data.shards, data.split, tokenizer=model.tokenizer, batch_size=micro, world_size=self.world_size,
            rank=self.rank, num_workers=data.num_workers, seed=self.seed, augment=data.augment,
            pert_types=self.loss_fn.config.pert_types,  # the batch's columns: L_pert's negatives
            max_length=data.max_length, resampled=data.resampled, image_size=data.image_size,
            shuffle_buffer=data.shuffle_buffer, download_retries=data.download_retries, verify=data.verify,
            max_damaged_shards=data.max_damaged_shards,
        )
        # Record the size actually trained at (export and evaluation read it from config.yaml).
        data.image_size = int(data.image_size or self.stream.source.image_size)
        self.plan = plan_steps(micro_batch=micro, grad_accum=accum, world_size=self.world_size,
                               batches_per_epoch=self.stream.batches_per_epoch, max_steps=train.max_steps,
                               epochs=train.epochs, warmup_steps=train.warmup_steps)
        self.instruments = Instruments(self.rank, self.run_dir, train.profile_steps, self.device)
        self.instruments.count_model(model, data.image_size, self.loss_fn.terms, **self.model_kwargs)
        optimizer = build_optimizer(
            tower_param_groups(model, train.lr, train.image_lr_mult), lr=train.lr, momentum=train.momentum,
            weight_decay=train.weight_decay,
        )  # fmt: skip
        scheduler = build_scheduler(optimizer, self.plan.warmup_steps, self.plan.total_steps,
                                    train.min_lr_ratio)
        apply_levers(model, compile=train.compile, channels_last=train.channels_last,
                     attention_fp32=train.attention_fp32)
        model.to(self.device)
        # A 16-bit engine keeps fp32 masters of trainable parameters only: keep the frozen ones'.
        half = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad] if half else []
        self._frozen_fp32 = {n: p.detach().to("cpu", copy=True) for n, p in frozen}
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config)
        if self.engine.gradient_accumulation_steps() != accum:
            raise RuntimeError(
                f"DeepSpeed runs {self.engine.gradient_accumulation_steps()} accumulation steps, planned {accum}"
            )
        self.image_dtype = _image_dtype(self.engine)
        self.instruments.time_peak(self.device, self.image_dtype or torch.float32)
        torch.manual_seed(_rank_seed(self.seed, self.rank))  # dropout differs per rank; restored on resume
        log.info(
            "rank %d: %d micro-batches of %d per epoch, %d optimizer steps per epoch (accumulation %d, "
            "%d samples/step over %d rank(s)), %d steps in all, warm-up %d; ZeRO %d, %s",
            self.rank, self.plan.batches_per_epoch, micro, self.plan.steps_per_epoch, accum,
            self.plan.samples_per_step, self.world_size, self.plan.total_steps, self.plan.warmup_steps,
            self.engine.zero_optimization_stage(), self.image_dtype or torch.float32,
        )  # fmt: skip

    def _refuse_fresh_start_over_checkpoints(self) -> None:
        if self.resume_from is None and ckpt.list_checkpoints(self.run_dir):
            raise UserError(
                f"{self.run_dir} already holds checkpoints; pass --resume latest to continue that run, "
                "or choose a new --out (a fresh run would mix its checkpoints and logs with the old ones)"
            )

    def _data_plan(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "micro_batch": self.plan.micro_batch,
            "grad_accum": self.plan.grad_accum,
            "num_workers": self.config.data.num_workers,
            "seed": self.seed,
            "num_samples": int(self.stream.source.num_samples),
            "batches_per_epoch": self.plan.batches_per_epoch,
        }

    # -- resume ---------------------------------------------------------------------------------
    def resume(self) -> dict[str, Any] | None:
        which = self.resume_from
        if which is None:
            return None
        state = ckpt.resume(self.engine, self.run_dir, which)
        if state is None:
            log.info("--resume %s: no checkpoint in %s yet; starting fresh", which, self.run_dir)
            return None
        if state.get("global_step") is None:
            raise ValueError(f"{state['checkpoint']}: no pertvl training state in the checkpoint")
        old_plan = state.get("data_plan") or {}
        changed = {k: (old_plan.get(k), v) for k, v in self._data_plan().items() if old_plan.get(k) != v}
        if changed:
            log.warning(
                "resuming %s with a different data plan %s (checkpoint, now): training continues, but "
                "not as an exact replay of the interrupted run",
                state["checkpoint"], changed,
            )  # fmt: skip
        if int(self.engine.global_steps) != int(state["global_step"]):
            raise RuntimeError(
                f"{state['checkpoint']}: DeepSpeed restored step {self.engine.global_steps}, pertvl's state "
                f"says {state['global_step']}"
            )
        log.info(
            "resumed %s: global step %d, epoch %d, step %d of the epoch",
            state["checkpoint"], state["global_step"], state["epoch"], state["step_in_epoch"],
        )  # fmt: skip
        return state

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.build()
        state = self.resume()
        global_step = int(state["global_step"]) if state else 0
        epoch = int(state["epoch"]) if state else 0
        step_in_epoch = int(state["step_in_epoch"]) if state else 0
        if step_in_epoch >= self.plan.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        data_counts: Counter = Counter(state.get("data_counts") or {}) if state else Counter()

        tracking = self.config.wandb
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config.to_dict(), self.run_dir / CONFIG_NAME)
            samples_path = self.run_dir / SAMPLES_FILE
            if samples_path.is_file():
                Monitor._truncate_after(samples_path, global_step)
        self.monitor = Monitor(
            self.run_dir, self.config.to_dict(), enabled_wandb=tracking.enabled, project=tracking.project,
            run_name=tracking.name, tags=tracking.tags, rank=self.rank,
            resume_run_id=state.get("wandb_run_id") if state else None, mode=tracking.mode,
            resume_step=global_step,
        )  # fmt: skip
        self._write_rank_file(global_step, final=False, checksum=False)  # pid etc. for tools and tests
        samples_file = (
            open(self.run_dir / SAMPLES_FILE, "a", buffering=1)
            if self.rank == 0 and self.config.train.log_samples
            else None
        )
        flag = PreemptionFlag().install()
        train = self.config.train
        self.watchdog = Watchdog(rank=self.rank, stall_timeout_s=train.stall_timeout_s,
                                 stop_grace_s=train.stop_grace_s, stop_requested=lambda: flag.requested)
        self.watchdog.start()
        bar = self.monitor.progress(self.plan.total_steps, initial=global_step)
        last_loss = None
        last_saved = global_step if state else -1
        preempted = False
        self.engine.train()
        try:
            while global_step < self.plan.total_steps and not preempted:
                self.stream.set_epoch(epoch, start_batch=step_in_epoch * self.plan.grad_accum)
                batches = iter(self.stream)
                fresh_iterator = True
                while step_in_epoch < self.plan.steps_per_epoch and global_step < self.plan.total_steps:
                    metrics, ids = self._train_step(batches, fresh_iterator)
                    self.watchdog.beat()
                    fresh_iterator = False
                    global_step += 1
                    step_in_epoch += 1
                    if int(self.engine.global_steps) != global_step:  # accumulation boundary mis-counted
                        raise RuntimeError(
                            f"DeepSpeed is at optimizer step {self.engine.global_steps}, the loop at {global_step}"
                        )
                    if global_step % self.config.train.log_every == 0 or global_step == self.plan.total_steps:
                        losses = self._reduced_losses(metrics.pop("_loss_sums"))
                        metrics = {**losses, **metrics, "epoch": epoch}  # losses first: the progress bar shows them
                        metrics.update(self._pert_metrics(metrics.pop("_pert_used")))
                        metrics.update(_data_metrics(data_counts))
                        self.monitor.log(metrics, step=global_step)
                        last_loss = metrics["loss/total"]
                    self._log_samples(samples_file, global_step, epoch, step_in_epoch, ids)
                    bar.update(1)
                    # Before the checkpoint of the same step: a run resumed from it has that evaluation.
                    if self._evaluation_due(global_step):
                        self._evaluate(global_step, epoch=global_step / self.plan.steps_per_epoch)
                    every = self.config.train.checkpoint_every
                    if every > 0 and global_step % every == 0 and global_step < self.plan.total_steps:
                        self._save(global_step, epoch, step_in_epoch, data_counts)
                        last_saved = global_step
                    if flag.agreed(self.device):
                        preempted = True
                        break
                if step_in_epoch >= self.plan.steps_per_epoch:
                    # Read the epoch's last (< accumulation) micro-batches: the stream then reports
                    # the samples it skipped, summed over ranks here.
                    for _ in batches:
                        pass
                    data_counts.update(self._epoch_data_counts(epoch))
                    epoch, step_in_epoch = epoch + 1, 0
                else:
                    batches.close()  # stopped mid-epoch (max_steps or a signal): end the loader
            if preempted:
                log.warning(
                    "rank %d: %s received; checkpointing step %d and exiting with %d",
                    self.rank, flag.signal_name or "a peer's stop signal", global_step, PREEMPTED_EXIT_CODE,
                )  # fmt: skip
            with self.watchdog.phase("final checkpoint and save"):
                if last_saved != global_step:
                    self._save(global_step, epoch, step_in_epoch, data_counts)
                # Checksum first: writing RUN_DIR/final widens rank 0's 16-bit module to fp32 in place.
                self._write_rank_file(global_step, final=not preempted)
                final_dir = None if preempted else self._save_final(global_step)
            exit_code = PREEMPTED_EXIT_CODE if preempted else 0
            if self.rank == 0:
                self.monitor.summary(
                    {"global_step": global_step, "epoch": epoch, "preempted": preempted,
                     "final_loss": last_loss, **_data_metrics(data_counts), **self.instruments.summary()}
                )  # fmt: skip
        except BaseException:
            self.monitor.finish(exit_code=1)
            raise
        finally:
            self.watchdog.stop()
            self.stream.close()
            if not preempted:
                # After a stop signal the handlers stay: a launcher that sees a peer exit first sends
                # SIGTERM to this rank while it finishes, which must not kill it half-way.
                flag.uninstall()
            if samples_file is not None:
                samples_file.close()
        self.monitor.finish(exit_code=exit_code)
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()  # leave together: a launcher tears the job down when the first rank exits
        return TrainResult(self.rank, global_step, exit_code, final_dir)

    def _train_step(self, batches, fresh_iterator: bool) -> tuple[dict[str, Any], list[str]]:
        """One optimizer step: A micro-batches through forward, backward and engine.step()."""
        engine, instruments = self.engine, self.instruments
        instruments.start_step(engine.global_steps + 1)
        t_start = time.perf_counter()
        lr = float(engine.get_lr()[0])
        wait = 0.0
        names = self.loss_fn.names  # "total" and the preset's terms, whatever they are
        # Summed on the device, read (one host sync) only at a log step.
        sums = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        pert_used = torch.zeros(len(self.loss_fn.config.pert_types), dtype=torch.int64)
        ids: list[str] = []
        for micro in range(self.plan.grad_accum):
            t_wait = time.perf_counter()
            # The DataLoader iterator draws its seed from the global torch RNG: isolate it so that
            # dropout's stream does not depend on where an epoch was entered (fresh or resumed).
            ctx = self._fork_rng() if fresh_iterator and micro == 0 else contextlib.nullcontext()
            with ctx, instruments.phase("data_wait"):
                batch = next(batches)
            wait += time.perf_counter() - t_wait
            ids.extend(batch.ids)
            if self.pert_counting:
                pert_used += batch.pert_valid.to(torch.bool).sum(0).cpu()
            instruments.count(batch, self.monitor)
            with instruments.phase("to_device"):
                batch = batch.to(self.device, image_dtype=self.image_dtype)
            with instruments.phase("forward"), instruments.forward(engine.module):
                out = engine(batch, **self.model_kwargs)
            with instruments.phase("losses"):
                losses = self.loss_fn(out, rank=self.rank, world_size=self.world_size)  # fp32
            with instruments.phase("backward"):
                engine.backward(losses.total)
            with instruments.phase("optimizer"):
                engine.step()
            sums += losses.stacked(names).detach().to(torch.float64)
        sync_float_buffers(engine.module, self.world_size)
        step_time = time.perf_counter() - t_start
        metrics: dict[str, Any] = {
            "_loss_sums": sums / self.plan.grad_accum,
            "_pert_used": pert_used if self.pert_counting else None,
            "lr": lr,
            "perf/step_time_s": step_time,
            "perf/samples_per_s": self.plan.samples_per_step / step_time,
            "perf/data_wait_s": wait,
            "perf/data_wait_frac": wait / step_time,
            **memory_metrics(self.device),
        }
        metrics.update(instruments.end_step(step_time))
        if engine.fp16_enabled():
            metrics["train/skipped_steps"] = int(engine.skipped_steps)
        return metrics, ids

    def _evaluation_due(self, global_step: int) -> bool:
        every = self.config.train.eval_every
        return self.evaluate is not None and (global_step % every == 0 or global_step == self.plan.total_steps)

    def _evaluate(self, global_step: int, epoch: float) -> None:
        """Rank 0 scores a copy of the encoders and logs eval/…; the others wait at the barrier."""
        with self.watchdog.phase("evaluate"):
            if self.rank == 0:
                t0 = time.perf_counter()
                with _rng_kept(self._fork_rng):
                    metrics = self.evaluate(self._eval_snapshot(), global_step)
                metrics = {**metrics, "eval/epoch": epoch, "eval/time_s": time.perf_counter() - t0}
                self.monitor.log(metrics, step=global_step)
            if self.world_size > 1:
                dist.barrier()

    def _eval_snapshot(self) -> torch.nn.Module:
        """An fp32 copy of the module in eval mode, built once and refreshed from the weights of now."""
        from pertvl.model import create_model

        if self._eval_model is None:
            self._eval_model = create_model(self.config.model).to(self.device)
        state = {k: v.detach() for k, v in self.engine.module.state_dict().items()}
        state.update(self._frozen_fp32)  # a 16-bit engine's frozen parameters, exactly
        with torch.no_grad():
            self._eval_model.load_state_dict(state)  # copied into the fp32 tensors
        return self._eval_model.eval()

    def _fork_rng(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _summed(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks, on the CPU."""
        values = values.to(self.device)
        if self.world_size > 1:
            dist.all_reduce(values)
        return values.cpu()

    def _reduced_losses(self, sums: torch.Tensor) -> dict[str, float]:
        """"loss/{name}" of the total and of every term, averaged over ranks."""
        values = self._summed(sums.to(torch.float64)) / self.world_size
        return {f"loss/{name}": float(v) for name, v in zip(self.loss_fn.names, values, strict=True)}

    def _pert_metrics(self, used: torch.Tensor | None) -> dict[str, int]:
        """data/pert_negatives(/<type>): L_pert's negatives of this step over all ranks."""
        if used is None:
            return {}
        counts = [int(v) for v in self._summed(used).tolist()]
        return {"data/pert_negatives": sum(counts),
                **{f"data/pert_negatives/{t}": v for t, v in zip(self.loss_fn.config.pert_types, counts, strict=True)}}

    def _epoch_data_counts(self, epoch: int) -> Counter:
        from pertvl.data.stream import MASK_REASONS, SKIP_REASONS

        names = [f"skipped/{k}" for k in (*SKIP_REASONS, "ignored_members")] + [f"masked/{k}" for k in MASK_REASONS]
        local = [*(self.stream.skipped.get(k, 0) for k in (*SKIP_REASONS, "ignored_members")),
                 *(self.stream.masked.get(k, 0) for k in MASK_REASONS)]  # fmt: skip
        counts = self._summed(torch.tensor(local, dtype=torch.int64))
        out = Counter({name: int(v) for name, v in zip(names, counts.tolist(), strict=True)})
        skipped = sum(v for k, v in out.items() if k.startswith("skipped/"))
        if self.rank == 0:
            (log.warning if skipped else log.info)(
                "epoch %d: %d sample(s) skipped over all ranks %s", epoch, skipped,
                {k: v for k, v in out.items() if v and k.startswith("skipped/")},
            )  # fmt: skip
        return out

    def _log_samples(self, handle, step: int, epoch: int, step_in_epoch: int, ids: list[str]) -> None:
        if not self.config.train.log_samples:
            return
        if self.world_size > 1:
            gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(ids, gathered, dst=0)
        else:
            gathered = [ids]
        if handle is not None:
            first_batch = (step_in_epoch - 1) * self.plan.grad_accum
            handle.write(json.dumps({"step": step, "epoch": epoch, "batch": first_batch, "ids": gathered}) + "\n")

    # -- persistence ----------------------------------------------------------------------------
    def _save(self, global_step: int, epoch: int, step_in_epoch: int, data_counts: Counter) -> None:
        client_state = {
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "stream_position": {"epoch": epoch, "batch": step_in_epoch * self.plan.grad_accum},
            "global_step": global_step,
            "wandb_run_id": self.monitor.run_id,
            "config": self.config.to_dict(),
            "data_plan": self._data_plan(),
            "data_counts": dict(data_counts),
            "loss_terms": list(self.loss_fn.names[1:]),  # what loss/* holds in this run's metrics
        }
        with self.watchdog.phase("checkpoint"):
            ckpt.save(self.engine, self.run_dir, global_step, client_state, keep_last=self.config.train.keep_last)

    def _save_final(self, global_step: int) -> Path | None:
        """RUN_DIR/final: the encoders in fp32 with save_pretrained (rank 0; others wait)."""
        final = self.run_dir / FINAL_NAME
        if self.rank == 0:
            import shutil

            model = self.engine.module
            if self.image_dtype is not None:
                model = self._fp32_model(global_step)
            # safetensors refuses ZeRO's views of its flat buffers: give every tensor its own storage.
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.data = tensor.data.clone()
            tmp = self.run_dir / f".{FINAL_NAME}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            log.info("final encoders (step %d) written to %s", global_step, final)
        if self.world_size > 1:
            dist.barrier()
        return final

    def _fp32_model(self, global_step: int) -> torch.nn.Module:
        """The module with the fp32 master weights, read back from the final checkpoint by
        DeepSpeed's zero_to_fp32 (a 16-bit engine's module holds 16-bit copies)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = self.engine.module.float()
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt.checkpoint_root(self.run_dir)), tag=ckpt.tag_for_step(global_step)
            )
        except Exception as err:  # noqa: BLE001 - any reader failure: fall back, say so
            log.warning("zero_to_fp32 could not read the final checkpoint (%s); saving the 16-bit weights "
                        "widened to fp32", err)  # fmt: skip
            return model
        state.update({k: v for k, v in self._frozen_fp32.items() if k not in state})
        missing, unexpected = model.load_state_dict(state, strict=False)
        persistent_missing = [k for k in missing if k in model.state_dict()]
        if persistent_missing or unexpected:
            raise RuntimeError(
                f"fp32 weights from the checkpoint do not match the model: missing {persistent_missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return model

    def _write_rank_file(self, global_step: int, final: bool, checksum: bool = True) -> None:
        """RUN_DIR/ranks/rank{R}.json: where this rank runs, its step, and at the end a checksum."""
        digest = param_checksum(self.engine.module) if checksum else None
        info = {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.env.local_rank,
            "launcher": self.env.launcher,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(self.device),
            "global_step": global_step,
            "finished": final,
            "param_sha256": digest,
            "loader_starts": self.stream.workers_started,  # 1 per run (or resume): workers span epochs
        }
        path = self.run_dir / RANKS_DIR / f"rank{self.rank}.json"
        atomic_write_text(path, json.dumps(info, indent=1) + "\n")


def train(cfg: dict[str, Any], local_rank: int | None = None,
          evaluate: Evaluator | None = None, lock: FolderLock | None = None) -> TrainResult:
    """Run (or resume) the training of a resolved config on this rank; `evaluate` is train.eval_every's,
    `lock` the run folder's when the caller took it (rank 0)."""
    trainer = None
    try:
        trainer = Trainer(cfg, local_rank=local_rank, evaluate=evaluate, lock=lock)
        return trainer.run()
    except BaseException as err:
        # Fail fast: the error in this rank's log, then an exit nothing can block (the launcher
        # ends the other ranks).
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        if not isinstance(err, KeyboardInterrupt | UserError):  # the CLI prints a UserError as one line
            log.error("rank %s failed:\n%s", rank, "".join(traceback.format_exception(err)).rstrip())
        exit_deadline(f"rank {rank} failed with {type(err).__name__}")
        raise
    finally:
        # Collect reference cycles holding the process group while it is alive: gloo objects
        # freed at interpreter teardown can abort the process.
        gc.collect()
        shutdown_distributed()
        for held in {trainer.lock if trainer is not None else None, lock} - {None}:
            held.release()


def cli_main(args: Any, make_evaluator: Callable[[RunConfig], Evaluator | None] | None = None,
             lock: FolderLock | None = None) -> int:
    """`pertvl train`: resolve the config, train, return 0 or PREEMPTED_EXIT_CODE."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = ("shards", "out", "deepspeed_config", "max_steps", "seed", "resume")
    flags = {k: getattr(args, k) for k in names}
    cfg = resolve_config(args.config, args.overrides, no_wandb=args.no_wandb, **flags)
    local_rank = args.train_local_rank if args.train_local_rank is not None else getattr(args, "local_rank", None)
    evaluate = make_evaluator(RunConfig.from_dict(cfg)) if make_evaluator is not None else None
    result = train(cfg, local_rank=local_rank, evaluate=evaluate, lock=lock)
    if result.exit_code == 0 and result.final_dir is not None and result.rank == 0:
        print(f"trained {result.global_step} steps; final encoders in {result.final_dir}", flush=True)
    if result.exit_code == PREEMPTED_EXIT_CODE and result.rank == 0:
        print(f"pertvl: stopped by a signal after checkpointing step {result.global_step} (exit "
              f"{PREEMPTED_EXIT_CODE}, preempted); re-run with --resume latest to continue", file=sys.stderr, flush=True)  # fmt: skip
    return result.exit_code
