"""Tokens/s/GPU of this package on the reference recipe's layer shapes (ours side of the comparison).

Runs ``Trainer.fit`` with ``LlamaLightningModule`` + ``MegatronCPStrategy`` + ``TEFP8Precision`` (or BF16)
on mock data (or a corpus: ``--data-path``), with the flags of Megatron-LM's ``train_llama3_8b_h100_fp8.sh`` scaled
down exactly as
``benchmarks/scripts/megatron_lm_baseline.sh`` scales them, and writes one JSON record.

    python -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps 30 --out ours_fp8.json
    torchrun --nproc_per_node 2 -m benchmarks.throughput --cp 2 ...
    python -m benchmarks.throughput --layers 32 --recompute full --optimizer-offload-fraction 0.5 ...
    python -m benchmarks.throughput --steps 160 --save-every 80 --save-mode async --ckpt-dir /tmp/ckpts ...
    python -m benchmarks.throughput --deterministic ...     # Trainer(deterministic=True): what deterministic mode costs

With ``--save-every N`` a ModelCheckpoint saves every N steps (``save_top_k=1``), synchronously or in the background
(``--save-mode``), and the record's ``checkpoint`` part has, per save, how long training was blocked (the save call
plus the finalize step that published it) and the median tokens/s of the steps run during a background write
relative to the other steps (the ``checkpoint-stall`` stage of ``benchmarks/stages.py``); with background saves
also how long each save waited for the previous background write (``waited_for_previous_s``), each write's seconds,
and the shortest save interval in steps that would not wait.

With ``--allow-oom`` a CUDA out-of-memory error ends the run with a record (``"fits": false``, the peak so far)
instead of a traceback, for "does this fit?" runs. Every record carries ``plan_gib``, what ``llama-fp8 plan``
predicts for the run's peak.

Step time is wall time between consecutive training-step ends (the loss read at each step end waits for the
GPU), the same quantity as Megatron-LM's "elapsed time per iteration" at ``--log-interval 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any

# The recipe's setting; must be in place before CUDA starts (it orders communication kernels).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from benchmarks.lib.internals import plan_training
from benchmarks.lib.kernel_profile import StepProfiler
from lightning_llama_fp8 import (
    CudaGraphSettings,
    IndexedDataModule,
    LlamaConfig,
    LlamaLightningModule,
    MegatronCPStrategy,
    MegatronPrecision,
    MockDataModule,
    OptimizerOffloadSettings,
    OptimizerPrecisionSettings,
    OptimizerSettings,
    ParallelLayout,
    RecomputeSettings,
    TEFP8Precision,
)
from lightning_llama_fp8.callbacks import ManualGC, NaNGuard, ThroughputMonitor
from lightning_llama_fp8.parallel.cuda_graphs import graphed_layers
from lightning_llama_fp8.parallel.optimizer_precision import AUTO, OptimizerPrecision, state_record


def recipe_arch(num_layers: int, seq_length: int) -> LlamaConfig:
    """Llama-3-8B layers with the recipe's choices (rotary base 1e6, layernorm-1p, init 0.0134, cuDNN attention).

    Vocab 128256, as the baseline's NullTokenizer (--vocab-size 128256, end-of-document id 128255; no padding
    needed at TP 1 or 2), so the two output layers are the same GEMM.
    """
    return LlamaConfig(
        num_layers=num_layers,
        seq_length=seq_length,
        vocab_size=128256,
        rotary_base=1_000_000,
        init_method_std=0.0134,
        zero_centered_gamma=True,
        attention_backend="fused",
    )


def small_arch(num_layers: int, seq_length: int) -> LlamaConfig:
    """A ~60M-parameter Llama for layout-equivalence runs: 8 heads / 4 groups divide by TP 2 and CP 2 (a2a)."""
    return LlamaConfig(
        num_layers=num_layers,
        hidden_size=1024,
        ffn_hidden_size=3584,
        num_attention_heads=8,
        num_query_groups=4,
        kv_channels=128,
        vocab_size=32000,
        seq_length=seq_length,
    )


class StepLog(Callback):
    """Per-step training loss (the global per-token loss each step returns) and gradient norm; at the end, how many
    modules held captured CUDA graphs (the layers, with ``--cuda-graphs``; before the strategy deletes them)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.graphed_modules = 0

    def on_train_end(self, trainer: Trainer, pl_module: torch.nn.Module) -> None:
        self.graphed_modules = graphed_layers(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: object, outputs: object, batch: object, idx: int) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        if "train/grad_norm" in trainer.callback_metrics:
            self.grad_norms.append(float(trainer.callback_metrics["train/grad_norm"]))


def _host_memory_stats() -> dict[str, float]:
    """The time and byte counters of torch's pinned host-memory allocator (empty where torch has none)."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None or not torch.cuda.is_available():
        return {}
    return {k: float(v) for k, v in stats().items() if isinstance(v, (int, float)) and ("time" in k or "bytes" in k)}


def host_peak_rss_gib() -> float:
    """This process's peak resident host memory so far (Linux reports ``ru_maxrss`` in KiB): what a run needs of the
    host besides pinned buffers, e.g. the offloaded optimizer."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class CheckpointStall(Callback):
    """What each checkpoint save costs the training loop, and how fast the steps run during a background write.

    A save is timed from ModelCheckpoint's call into ``strategy.save_checkpoint`` to its return (sync: the whole
    write; async: state dicts, planning, the copy to host memory, and waiting for a previous save), plus the
    ``on_train_batch_start`` of the strategy that published it (async). Step times run from a step's start to its
    end (the loss read waits for the GPU), without those two, so nothing is counted twice; a step "during the
    write" started while a background save was pending.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.strategy: Any = None  # set in setup
        self.saves: list[dict[str, Any]] = []
        # (step, seconds, during a background write, while host memory for the first save was being pinned)
        self.steps: list[tuple[int, float, bool, bool]] = []
        self.exit_wait_s = 0.0
        self._step_start = 0.0
        self._during_write = False
        self._published_s = 0.0
        self._saver: Any = None  # the strategy's background saver (its timings), kept past the strategy's teardown

    def setup(self, trainer: Trainer, pl_module: object, stage: str) -> None:
        strategy: Any = trainer.strategy
        self.strategy = strategy
        save, batch_start, train_end = strategy.save_checkpoint, strategy.on_train_batch_start, strategy.on_train_end

        def timed_save(*args: Any, **kwargs: Any) -> None:
            host_before = _host_memory_stats()
            begin = time.perf_counter()
            save(*args, **kwargs)
            seconds = time.perf_counter() - begin
            self._saver = getattr(getattr(strategy, "checkpointing", None), "async_saver", None) or self._saver
            # torch's pinned host allocator around the save: a first save that allocates (and pins) its host
            # buffers shows here, later saves that reuse them do not.
            host = {k: v - host_before.get(k, 0) for k, v in _host_memory_stats().items()}
            self.saves.append({"step": trainer.global_step, "save_call_s": seconds, "host_allocator_delta": host})

        def timed_batch_start(*args: Any, **kwargs: Any) -> None:
            pending = strategy.pending_checkpoint
            begin = time.perf_counter()
            batch_start(*args, **kwargs)
            if pending is not None and strategy.pending_checkpoint is None:  # published here
                self._published_s = time.perf_counter() - begin
                self.saves[-1].update(publish_s=self._published_s, published_at_step=trainer.global_step)

        def timed_train_end() -> None:
            begin = time.perf_counter()
            train_end()
            self.exit_wait_s = time.perf_counter() - begin  # the last save's write, awaited before fit returns

        strategy.save_checkpoint, strategy.on_train_batch_start = timed_save, timed_batch_start
        strategy.on_train_end = timed_train_end

    def on_train_batch_start(self, trainer: Trainer, pl_module: object, batch: object, idx: int) -> None:
        # Callbacks run before the strategy's hook, so this start includes the strategy's finalize.
        self._during_write = getattr(trainer.strategy, "pending_checkpoint", None) is not None
        self._published_s = 0.0
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: object, outputs: object, batch: object, idx: int) -> None:
        # Before ModelCheckpoint's own on_train_batch_end (Lightning runs checkpoint callbacks last).
        seconds = time.perf_counter() - self._step_start - self._published_s
        reserve = self._reserve()
        pinning = reserve is not None and reserve.seconds is None
        self.steps.append((trainer.global_step, seconds, self._during_write, pinning))

    def summary(self, mode: str, ckpt_dir: Path, tokens_per_step: int) -> dict[str, Any]:
        timed = [(step, seconds, during) for step, seconds, during, _ in self.steps if step > self.warmup]
        # Pinning starts after step 1, within the warm-up: compare with the steps after it (the first 2 compile).
        pinning = [seconds for step, seconds, _, pin in self.steps if pin and step > 2]
        saved_steps = {save["step"] + 1 for save in self.saves}  # the step right after a save: caches refilled
        normal = [seconds for step, seconds, during in timed if not during and step not in saved_steps]
        during = [seconds for _, seconds, during in timed if during]
        files = [f for f in ckpt_dir.rglob("*") if f.is_file() and not f.is_symlink()] if ckpt_dir.is_dir() else []
        newest = max((f.parent for f in files), key=lambda d: d.stat().st_mtime, default=None)
        for save in self.saves:
            save["blocked_s"] = save["save_call_s"] + save.get("publish_s", 0.0)
        # Background saves: how long each waited for the write before it (part of its blocked time), and how long
        # each write took (from the save call's end until a finalize found it done: to within a step).
        timings = list(getattr(self._saver, "timings", []))
        for save, timing in zip(self.saves, timings, strict=False):
            save.update(waited_for_previous_s=timing.waited_for_previous_s, write_s=timing.write_s)
        writes = [timing.write_s for timing in timings if timing.write_s is not None]
        step_s = statistics.median(normal) if normal else None
        return {
            "mode": mode,
            "checkpoint_gib": sum(f.stat().st_size for f in files if f.parent == newest) / 2**30,
            "saves": self.saves,
            "blocked_s": [save["blocked_s"] for save in self.saves],
            "exit_wait_s": self.exit_wait_s,
            "steps_during_write": len(during),
            "tokens_per_s_normal": tokens_per_step / statistics.median(normal) if normal else None,
            "tokens_per_s_during_write": tokens_per_step / statistics.median(during) if during else None,
            "tokens_per_s_during_write_ratio": statistics.median(normal) / statistics.median(during)
            if normal and during
            else None,
            "host_reserve": self.host_reserve(pinning, normal),
            "waited_for_previous_s": [timing.waited_for_previous_s for timing in timings],
            "write_s": [timing.write_s for timing in timings],
            # A background save waits for none before it when the saves are at least the longest write apart.
            "shortest_nonblocking_interval_steps": math.ceil(max(writes) / step_s) if writes and step_s else None,
            "step_times": self.steps,
        }

    def _reserve(self) -> Any:
        """The strategy's ``PinnedHostReserve`` for the first async save, once started (else None)."""
        return getattr(getattr(self.strategy, "checkpointing", None), "host_reserve", None)

    def host_reserve(self, pinning: list[float], normal: list[float]) -> dict[str, Any] | None:
        """The background pinning before the first async save (``PinnedHostReserve``): size, time, step times."""
        reserve = self._reserve()
        if reserve is None:
            return None
        return {
            "reserved_gib": reserve.reserved_bytes / 2**30,
            "seconds": reserve.seconds,
            "error": repr(reserve.error) if reserve.error else None,
            "steps_while_pinning": len(pinning),
            "step_s_while_pinning_median": statistics.median(pinning) if pinning else None,
            "tokens_per_s_while_pinning_ratio": statistics.median(normal) / statistics.median(pinning)
            if normal and pinning
            else None,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--recipe", choices=("delayed", "current", "blockwise", "mxfp8"), default="delayed")
    parser.add_argument("--nan-guard", choices=("raise", "skip", "rollback"), help="add NaNGuard with this policy")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--gbs", type=int, default=8)
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--cp-comm-type", choices=("p2p", "a2a", "all_gather"), default="p2p")
    parser.add_argument("--pp", type=int, default=1, help="pipeline_model_parallel_size")
    parser.add_argument("--vpp", type=int, help="virtual_pipeline_model_parallel_size")
    parser.add_argument("--init-weights", type=Path, help="start from this Hugging Face directory (its arch, --seq)")
    parser.add_argument("--arch", choices=("recipe", "small"), default="recipe")
    parser.add_argument("--cpu-init", action="store_true", help="same initial weights for every TP size")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiplies the recipe's four learning rates")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--recompute-method", choices=("uniform", "block"))
    parser.add_argument("--recompute-num-layers", type=int)
    parser.add_argument("--recompute-modules", nargs="+")
    parser.add_argument("--optimizer-offload-fraction", type=float, default=0.0, help="0: optimizer on the GPU")
    parser.add_argument("--no-fp8-param-gather", action="store_true", help="keep BF16 weights in FP8 runs")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="MegatronCPStrategy(cuda_graphs=CudaGraphSettings()): graphed layers"
    )
    parser.add_argument(
        "--optimizer-precision",
        choices=("auto", "off", "bf16", "fp32"),
        default="auto",
        help="MegatronCPStrategy(optimizer_precision=...) with Adam moments in this dtype (off: Megatron's default; "
        "auto: the strategy's default)",
    )
    parser.add_argument(
        "--grad-accum-fusion",
        choices=("default", "on", "off"),
        default="default",
        help="MegatronCPStrategy(gradient_accumulation_fusion=None|True|False); default: on with TE layers",
    )
    parser.add_argument(
        "--weight-refresh",
        choices=("fast", "te"),
        default="fast",
        help="TEFP8Precision(fast_weight_refresh=True|False): FP8 weights refreshed without TE's discarded transposes",
    )
    parser.add_argument("--fp8-attention", action="store_true", help="TEFP8Precision(fp8_attention=True)")
    parser.add_argument(
        "--data-path",
        help="train on this corpus (IndexedDataModule, split 99,1,0 as megatron_lm_baseline.sh's DATA_PATH) instead of "
        "mock data",
    )
    parser.add_argument(
        "--document-masking", action="store_true", help="data.document_masking: each document attends only to itself"
    )
    parser.add_argument(
        "--cross-entropy",
        choices=("default", "te", "native"),
        default="default",
        help="LlamaConfig(cross_entropy_fusion_impl=None|'te'|'native'); default: TE's kernel with TE layers",
    )
    parser.add_argument(
        "--fused-qkv-rope",
        choices=("auto", "on", "off"),
        default="auto",
        help="LlamaConfig(fused_qkv_rope=...): RoPE on the whole QKV output (auto: the default, on where it applies)",
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="Trainer(deterministic=True): bitwise reproducible, slower"
    )
    parser.add_argument("--allow-oom", action="store_true", help="record an out-of-memory end instead of failing")
    parser.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps (0: none)")
    parser.add_argument("--save-mode", choices=("sync", "async"), default="sync", help="MegatronCPStrategy(async_save)")
    parser.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/bench_throughput_ckpts"))
    parser.add_argument("--profile-steps", type=int, default=0, help="profile N steps after --warmup (0: none)")
    parser.add_argument(
        "--profile-stacks", action="store_true", help="with --profile-steps: which Python code launched the FP8 casts"
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log-dir", type=Path, help="also write Lightning CSV logs here (benchmarks.plot_training)")
    args = parser.parse_args()
    recompute = (
        None
        if args.recompute == "none"
        else RecomputeSettings(args.recompute, args.recompute_method, args.recompute_num_layers, args.recompute_modules)
    )
    offload = OptimizerOffloadSettings(args.optimizer_offload_fraction) if args.optimizer_offload_fraction else None
    fp8_param_gather = args.precision == "fp8" and not args.no_fp8_param_gather
    optimizer_precision: OptimizerPrecision = (
        None
        if args.optimizer_precision == "off"
        else AUTO
        if args.optimizer_precision == "auto"
        else OptimizerPrecisionSettings(args.optimizer_precision, args.optimizer_precision)
    )

    seed_everything(1234)
    if args.init_weights is not None:  # the same initial weights in every layout, pipeline splits included
        arch = LlamaConfig.from_hf(args.init_weights, seq_length=args.seq)
    else:
        arch = (recipe_arch if args.arch == "recipe" else small_arch)(args.layers, args.seq)
    if args.cross_entropy != "default":
        arch = dataclasses.replace(arch, cross_entropy_fusion_impl=args.cross_entropy)
    if args.fused_qkv_rope != "auto":
        arch = dataclasses.replace(arch, fused_qkv_rope=args.fused_qkv_rope == "on")
    plugin = (
        TEFP8Precision(
            recipe=args.recipe,
            fp8_param_gather=fp8_param_gather,
            fast_weight_refresh=args.weight_refresh == "fast",
            fp8_attention=args.fp8_attention,
        )
        if args.precision == "fp8"
        else MegatronPrecision()
    )
    # The monitor averages the timed steps (mean; the record's step time is their median).
    telemetry = ThroughputMonitor(window=max(args.steps - args.warmup, 1), log_every_n_steps=1)
    callbacks: list[Callback] = [ManualGC(), step_log := StepLog(), telemetry]
    if args.nan_guard:
        # With --cuda-graphs the layers cannot carry NaNGuard's output hooks (refused before building).
        callbacks.append(NaNGuard(policy=args.nan_guard, **({"watch_outputs": None} if args.cuda_graphs else {})))
    profiler = StepProfiler(args.warmup, args.profile_steps, stacks=args.profile_stacks) if args.profile_steps else None
    if profiler is not None:
        callbacks.append(profiler)
    stall = CheckpointStall(args.warmup) if args.save_every else None
    if stall is not None:
        # save_top_k=1: the previous checkpoint is deleted once the next one is complete (two on disk at most).
        callbacks += [stall, ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=args.save_every, save_top_k=1)]
    devices = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    trainer = Trainer(
        accelerator="gpu",
        devices=devices,
        strategy=MegatronCPStrategy(
            tensor_model_parallel_size=args.tp,
            context_parallel_size=args.cp,
            sequence_parallel=args.tp > 1,
            cp_comm_type=args.cp_comm_type,
            pipeline_model_parallel_size=args.pp,
            virtual_pipeline_model_parallel_size=args.vpp,
            use_cpu_initialization=args.cpu_init,
            activation_recompute=recompute,
            optimizer_offload=offload,
            optimizer_precision=optimizer_precision,
            cuda_graphs=CudaGraphSettings() if args.cuda_graphs else None,
            async_save=args.save_mode == "async",
            gradient_accumulation_fusion={"default": None, "on": True, "off": False}[args.grad_accum_fusion],
        ),
        plugins=[plugin],
        max_steps=args.steps,
        callbacks=callbacks,
        logger=CSVLogger(args.log_dir, name="ours") if args.log_dir else False,
        log_every_n_steps=1,
        enable_checkpointing=stall is not None,
        deterministic=True if args.deterministic else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    scale = args.lr_scale
    module = LlamaLightningModule(
        arch,
        OptimizerSettings(
            lr=1.5e-4 * scale,
            min_lr=1e-5 * scale,
            warmup_steps=2,
            decay_steps=args.steps,
            decoupled_lr=5e-4 * scale,
            decoupled_min_lr=4.5e-5 * scale,
        ),
        init_weights=None if args.init_weights is None else str(args.init_weights),
    )
    data_args: dict[str, Any] = dict(
        seq_length=args.seq,
        vocab_size=arch.vocab_size,
        global_batch_size=args.gbs,
        micro_batch_size=args.mbs,
        document_masking=args.document_masking,
    )
    # The corpus as Megatron-LM's baseline reads it (same seed and split: the same samples).
    data = (
        MockDataModule(**data_args)
        if args.data_path is None
        else IndexedDataModule(args.data_path, split="99,1,0", **data_args)
    )
    plan = plan_training(
        arch,
        ParallelLayout(
            tensor_model_parallel_size=args.tp,
            context_parallel_size=args.cp,
            sequence_parallel=args.tp > 1,
            cp_comm_type=args.cp_comm_type,
            pipeline_model_parallel_size=args.pp,
            virtual_pipeline_model_parallel_size=args.vpp,
        ),
        int(os.environ.get("WORLD_SIZE", devices)),
        args.gbs,
        args.mbs,
        args.precision,
        fp8_param_gather=fp8_param_gather,
        recompute=recompute,
        optimizer_offload=offload,
        optimizer_precision=optimizer_precision,
        fp8_recipe=args.recipe,
        document_masking=args.document_masking,
        fp8_attention=args.fp8_attention,
    )
    memory_settings = {
        "recompute": None if recompute is None else recompute.transformer_config_kwargs(args.layers),
        "optimizer_offload_fraction": args.optimizer_offload_fraction,
        "fp8_param_gather": fp8_param_gather,
        "optimizer_precision": args.optimizer_precision,
        "cuda_graphs": args.cuda_graphs,
        "plan_gib": plan.memory.total / 2**30,
        "plan_host_gib": plan.memory.host / 2**30,
    }
    try:
        trainer.fit(module, datamodule=data)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
        out_of_memory = isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()
        if not (args.allow_oom and out_of_memory):
            raise
        record = {
            "impl": "lightning-llama-fp8",
            "device": torch.cuda.get_device_name(),
            "layers": args.layers,
            "global_batch_size": args.gbs,
            "fits": False,
            "steps_done": trainer.global_step,
            "optimizer_state": state_record(getattr(trainer.strategy, "optimizer_precision_in_use", None)),
            "error": str(err).splitlines()[0],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "host_peak_rss_gib": host_peak_rss_gib(),
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            **memory_settings,
        }
        print(json.dumps(record))
        if args.out:
            args.out.write_text(json.dumps(record, indent=2))
        return

    # What ran: optimizer_precision with "auto" resolved (precision_aware false: Megatron's default optimizer).
    memory_settings["optimizer_state"] = state_record(trainer.strategy.optimizer_precision_in_use)
    times = module.step_times[max(args.warmup - 1, 0) :]  # step_times starts at step 2
    median = statistics.median(times)
    world = trainer.world_size
    tokens_per_gpu = args.gbs * args.seq / median / world
    result = {
        "fits": True,
        **memory_settings,
        "impl": "lightning-llama-fp8",
        "device": torch.cuda.get_device_name(),
        "precision": args.precision,
        "recipe": args.recipe if args.precision == "fp8" else None,
        "nan_guard": args.nan_guard,
        "layers": args.layers,
        "seq_length": args.seq,
        "global_batch_size": args.gbs,
        "micro_batch_size": args.mbs,
        "tp": args.tp,
        "cp": args.cp,
        "pp": args.pp,
        "vpp": args.vpp,
        "init_weights": None if args.init_weights is None else str(args.init_weights),
        # What ran (the default resolves per model), and what was asked for.
        "gradient_accumulation_fusion": getattr(trainer.strategy, "gradient_accumulation_fused", None),
        "gradient_accumulation_fusion_setting": args.grad_accum_fusion,
        "weight_refresh": args.weight_refresh,
        "fp8_attention": args.fp8_attention,
        "data": args.data_path or "mock",
        "document_masking": args.document_masking,
        "cross_entropy": arch.cross_entropy_impl,
        "fused_qkv_rope": module.fused_qkv_rope_in_use,  # what ran
        "deterministic": getattr(trainer.strategy, "deterministic_mode", None) is not None
        and trainer.strategy.deterministic_mode.on,
        "cp_comm_type": args.cp_comm_type,
        "arch": args.arch,
        "lr_scale": args.lr_scale,
        "cpu_init": args.cpu_init,
        "gpus": world,
        "steps": args.steps,
        "timed_steps": len(times),
        "median_step_time_s": median,
        "step_times_s": module.step_times,
        "tokens_per_sec_per_gpu": tokens_per_gpu,
        "tflops_per_gpu": arch.flops_per_token() * tokens_per_gpu / 1e12,  # published-table count
        "tflops_per_gpu_causal": arch.flops_per_token(causal=True) * tokens_per_gpu / 1e12,  # today's LM logs
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "host_peak_rss_gib": host_peak_rss_gib(),
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "graphed_modules": step_log.graphed_modules,  # what ran: 0 unless layers were captured
        "losses": step_log.losses,
        "grad_norms": step_log.grad_norms,
        "telemetry": telemetry.last_metrics,  # ThroughputMonitor over the timed steps
    }
    if stall is not None:
        result["checkpoint"] = stall.summary(args.save_mode, args.ckpt_dir, args.gbs * args.seq // world)
    if profiler is not None:
        result["kernel_profile"] = profiler.summary  # lib/kernel_profile.py; profiled steps run slower than timed ones
    if trainer.is_global_zero:
        print(json.dumps({k: v for k, v in result.items() if k not in ("step_times_s", "losses", "grad_norms")}))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
