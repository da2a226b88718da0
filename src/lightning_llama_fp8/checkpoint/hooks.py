"""The strategy's checkpoint hooks: save, check, load and remove Megatron distributed checkpoints under Lightning.

:class:`StrategyCheckpointing` does what ``MegatronCPStrategy``'s ``save_checkpoint`` / ``load_checkpoint`` /
``remove_checkpoint`` / ``load_model_state_dict`` / ``optimizer_state`` promise Lightning; the strategy hands each
of those calls to it. The checkpoint format itself (directory layout, info file, resume checks, Megatron's sharded
save and load) is the rest of ``checkpoint/``; background writes are ``background.py``.

A checkpoint is a directory: the Megatron model chunks and optimizer in Megatron's sharded format (every rank writes
its shards; it reloads into another layout), and everything else Lightning put into the checkpoint dict (loops,
callbacks, LR scheduler, data position, the module's non-Megatron state, any other optimizer) in ``lightning.pt``.
"""

from __future__ import annotations

import io
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_llama_fp8._compat.warnings import megatron_checkpoint_read_warnings_filtered
from lightning_llama_fp8.checkpoint import background, directories, preflight, resume, state_io
from lightning_llama_fp8.checkpoint import info as ckpt
from lightning_llama_fp8.checkpoint.background import AsyncCheckpointSaver, PinnedHostReserve, pinned_bytes
from lightning_llama_fp8.checkpoint.save_workers import prepare_checkpoint_writer
from lightning_llama_fp8.parallel.ddp import megatron_children
from lightning_llama_fp8.parallel.layout import PIPELINE_FIELDS

if TYPE_CHECKING:
    from collections.abc import Generator

    import lightning.pytorch as pl

    from lightning_llama_fp8.parallel.layout import ParallelLayout

log = logging.getLogger(__name__)


class CheckpointingStrategy(Protocol):
    """What the checkpoint hooks read of their strategy (``MegatronCPStrategy`` has all of it)."""

    layout: ParallelLayout
    async_save: bool
    checkpoint_optimizer_sharding: str
    use_distributed_optimizer: bool
    ddp_modules: list[torch.nn.Module]

    @property
    def lightning_module(self) -> pl.LightningModule: ...
    @property
    def optimizers(self) -> list[Any]: ...
    @property
    def is_global_zero(self) -> bool: ...
    @property
    def world_size(self) -> int: ...
    @property
    def root_device(self) -> torch.device: ...
    def broadcast(self, obj: Any, src: int = 0) -> Any: ...
    def data_parallel_group(self) -> Any: ...
    def first_failure(self, failure: str | None) -> str | None:
        """Collective: the first rank's failure text, or None when every rank succeeded."""
        ...


class StrategyCheckpointing:
    """Checkpoint I/O for one strategy (:class:`~lightning_llama_fp8.strategy.MegatronCPStrategy`).

    Reads the strategy's settings (``checkpoint_optimizer_sharding``, ``async_save``, the layout) at each call, so
    changing them on the strategy takes effect at the next save.
    """

    def __init__(self, strategy: CheckpointingStrategy) -> None:
        self.strategy = strategy
        self.async_saver: AsyncCheckpointSaver | None = None  # created by the first background save
        self.host_reserve: PinnedHostReserve | None = None  # started by reserve_host_copy(), once per strategy
        self._host_copy_planned = False
        # (path, lightning.pt contents) read by the checks before the model was built, reused by the load.
        self.early_state: tuple[Path, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ save
    def save(self, checkpoint: dict[str, Any], filepath: Any) -> None:
        """Write a distributed checkpoint directory at ``filepath``; every rank calls it (ModelCheckpoint does).

        A ``weights_only`` save (no ``optimizer_states`` in ``checkpoint``) leaves the optimizers out.
        """
        strategy = self.strategy
        prepare_checkpoint_writer()  # before Megatron's writer spawns a process that re-runs an unguarded script
        path = Path(strategy.broadcast(str(filepath)))
        modules = self.megatron_models()
        optimizer = self.megatron_optimizer() if "optimizer_states" in checkpoint else None
        module_state = checkpoint.pop("state_dict", {})
        attributes = megatron_children(strategy.lightning_module)
        checkpoint["state_dict"] = {k: v for k, v in module_state.items() if k.split(".", 1)[0] not in attributes}
        arch = getattr(strategy.lightning_module, "arch", None)
        info = ckpt.CheckpointInfo(
            path=path,
            global_step=int(checkpoint.get("global_step", 0)),
            tensor_model_parallel_size=strategy.layout.tensor_model_parallel_size,
            context_parallel_size=strategy.layout.context_parallel_size,
            **{name: getattr(strategy.layout, name) for name in PIPELINE_FIELDS},
            world_size=strategy.world_size,
            arch=asdict(arch) if arch is not None else {},
            optimizer_sharding=(
                None
                if optimizer is None
                else strategy.checkpoint_optimizer_sharding
                if strategy.use_distributed_optimizer
                else "not_distributed"  # a plain Megatron optimizer's state follows the weights into any layout
            ),
            **preflight.resume_records(strategy.lightning_module),
        )

        def write_info(directory: Path) -> None:
            # Written last: the sizes and digests of everything above, checked before any later load.
            (directory / ckpt.INFO_FILENAME).write_text(replace(info, files=ckpt.record_files(directory)).to_json())

        if self._saves_in_background():
            self._save_in_background(path, modules, optimizer, checkpoint, write_info)
            return

        def write(directory: Path) -> None:
            state_io.save_megatron_state(
                directory, modules, optimizer, strategy.checkpoint_optimizer_sharding, strategy.data_parallel_group()
            )
            if strategy.is_global_zero:
                torch.save(checkpoint, directory / ckpt.LIGHTNING_FILENAME)
                write_info(directory)

        with self.parameters_gathered():
            directories.save_directory_atomically(path, write, strategy.is_global_zero, strategy.first_failure)

    def _saves_in_background(self) -> bool:
        """``async_save`` inside a running ``fit``, whose next steps and end publish the save; any other save (e.g.
        ``trainer.save_checkpoint`` after ``fit``, when nothing would publish it) is written at once."""
        state = self.strategy.lightning_module.trainer.state
        return self.strategy.async_save and state.fn == TrainerFn.FITTING and state.status == TrainerStatus.RUNNING

    def _save_in_background(
        self,
        path: Path,
        modules: dict[str, torch.nn.Module],
        optimizer: Any,
        checkpoint: dict[str, Any],
        write_info: Any,
    ) -> None:
        """Schedule Megatron's write of the shards; ``lightning.pt`` and the info file follow when it is done."""
        strategy = self.strategy
        # Lightning's state as it is now: the loops, callbacks and any other optimizer change in place during the
        # steps the shards take to write, so rank 0 pickles it here and writes the bytes at the finalize.
        lightning_state = io.BytesIO()
        directories.run_and_agree(
            (lambda: torch.save(checkpoint, lightning_state)) if strategy.is_global_zero else None,
            strategy.first_failure,
        )

        def write_rank_zero_files(directory: Path) -> None:
            (directory / ckpt.LIGHTNING_FILENAME).write_bytes(lightning_state.getbuffer())
            write_info(directory)

        def plan_shards(directory: Path) -> Any:
            return state_io.save_megatron_state(
                directory,
                modules,
                optimizer,
                strategy.checkpoint_optimizer_sharding,
                strategy.data_parallel_group(),
                in_background=True,
            )

        if self.host_reserve is not None:
            self.host_reserve.wait()  # else this save would pin a second set of blocks beside the reserved ones
        if self.async_saver is None:
            self.async_saver = AsyncCheckpointSaver(strategy.first_failure)
        # Gathered until the host copy is taken, which scheduling does before it returns (background.py).
        with self.parameters_gathered():
            self.async_saver.save(
                path, strategy.is_global_zero, plan_shards, write_rank_zero_files, step=checkpoint.get("global_step")
            )

    def reserve_host_copy(self) -> None:
        """With ``async_save``, once the optimizer state exists (after the first step that updated it): pin, in a
        thread, the host memory a background save copies the checkpoint into, so that the first save does not
        block training while it pins (training may wait for the pinning itself, once, after the first step:
        ``background.py``). Only where a checkpoint callback will save during
        ``fit``; once per strategy (the blocks stay in torch's host cache, as they would after the first save). A
        failure to size or pin is logged: the first save then pins for itself."""
        strategy = self.strategy
        trainer = strategy.lightning_module.trainer
        if self._host_copy_planned or not strategy.async_save or trainer.global_step < 1:
            return
        savers = trainer.checkpoint_callbacks
        if not savers or strategy.root_device.type != "cuda":
            self._host_copy_planned = True
            return
        weights_only = all(getattr(saver, "save_weights_only", False) for saver in savers)
        optimizer = None if weights_only else self.megatron_optimizer()
        if strategy.checkpoint_optimizer_sharding != "dp_reshardable":
            # fully_reshardable gathers the optimizer state into CPU tensors, which the save does not copy again;
            # building it here would all-gather the whole state for nothing.
            optimizer = None
        if optimizer is not None and not _optimizer_state_exists(optimizer):
            return  # a first step that was skipped (NaNGuard, a vetoed update): Megatron creates the state lazily
        self._host_copy_planned = True
        try:
            sharding, group = strategy.checkpoint_optimizer_sharding, strategy.data_parallel_group()
            sizes = state_io.host_copy_sizes(self.megatron_models(), optimizer, sharding, group)
        except Exception as err:  # an optimization only: the save itself will say what is wrong, if anything is
            log.warning("Could not size the host copy of a checkpoint ahead of the first background save: %r", err)
            return
        if not sizes:
            return
        need, ranks = pinned_bytes(sizes), max(int(getattr(strategy, "num_processes", 1) or 1), 1)
        available = background.available_host_memory()
        if available is not None and need * ranks > available:
            # Pinned memory cannot be swapped: pinning it ahead could get the run killed now rather than at a save.
            rank_zero_warn(
                f"Background checkpoints copy {need / 2**30:.1f} GiB per rank into pinned host memory ({ranks} ranks "
                f"on this machine: {need * ranks / 2**30:.1f} GiB), more than the {available / 2**30:.1f} GiB the "
                "machine has available now. Not pinned ahead; the first background save may fail or be killed for "
                "lack of memory. Use MegatronCPStrategy(async_save=False), or more host memory per rank."
            )
            return
        self.host_reserve = PinnedHostReserve()
        self.host_reserve.start(sizes, device=strategy.root_device)
        rank_zero_info(
            f"Pinning {need / 2**30:.1f} GiB of host memory ({len(sizes)} blocks) for the host copy of background "
            "checkpoints (rank 0's share), once, so that the first save does not stall mid-run; training may wait "
            "for it (an H200 pinned 27.1 GiB in 14 s)"
        )

    @property
    def pending_path(self) -> Path | None:
        """The checkpoint being written in the background and not yet under its name, if any."""
        return self.async_saver.pending_path if self.async_saver is not None else None

    def publish_finished_save(self) -> None:
        """Publish a background save whose writes are done on every rank; never waits (one all-reduce while one is
        pending, nothing otherwise)."""
        if self.async_saver is not None:
            self.async_saver.finalize(blocking=False)

    def finish_pending_save(self) -> None:
        """Wait for a background save and publish it."""
        if self.async_saver is not None:
            self.async_saver.finalize(blocking=True)

    def close(self) -> None:
        """Before the process groups go: wait for a pending save (the run does not exit without it)."""
        if self.async_saver is not None:
            self.async_saver.wait_before_exit()
            self.async_saver = None

    @contextmanager
    def parameters_gathered(self) -> Generator[None, None, None]:
        """Finish the parameter all-gathers that ``overlap_param_gather`` defers to the next forward pass.

        After an optimizer step each DP x CP rank holds updated values only for its own shard of the parameters;
        the rest arrive during the next forward. A checkpoint written in between would store the previous step's
        values for them (found on 2 GPUs: a CP2 checkpoint resumed with its first loss 1% off). Megatron-LM
        brackets its saves the same way. During validation the hooks are already off and parameters in sync.
        """
        paused = [ddp for ddp in self.strategy.ddp_modules if getattr(ddp, "remove_forward_pre_hook_handles", None)]
        for ddp in paused:
            ddp.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for ddp in paused:
                ddp.enable_forward_pre_hook()

    # ------------------------------------------------------------------ load
    def load(self, checkpoint_path: Any) -> dict[str, Any]:
        """Check the checkpoint against this run, load the Megatron model (and, when fitting, the optimizers) from
        it, and return the rest for Lightning to restore."""
        strategy = self.strategy
        self.finish_pending_save()  # the checkpoint asked for may be the one still being written
        path = Path(strategy.broadcast(str(checkpoint_path)))
        optimizer = self.megatron_optimizer()
        self.check(path, with_optimizer=optimizer is not None)
        with megatron_checkpoint_read_warnings_filtered():
            state_io.load_megatron_state(path, self.megatron_models(), optimizer, strategy.data_parallel_group())
        early, self.early_state = self.early_state, None
        state = early[1] if early is not None and early[0] == path else state_io.load_lightning_state(path)
        self._load_other_optimizers(state.get("optimizer_states") or [])
        trainer = strategy.lightning_module.trainer
        if trainer.state.fn == TrainerFn.FITTING:  # the resumed run renews its own last.ckpt (not last-v1.ckpt)
            resume.renew_own_last_checkpoints(state, trainer.checkpoint_callbacks)
        return state

    def check(self, path: str | os.PathLike[str], with_optimizer: bool, **resume_settings: Any) -> ckpt.CheckpointInfo:
        """Raise :class:`~lightning_llama_fp8.checkpoint.info.CheckpointError` if ``path`` cannot be loaded here
        (``resume_settings``: ``check_can_resume``'s ``global_batch_size`` / ``optimizer_settings``)."""
        strategy = self.strategy
        info = ckpt.read_checkpoint_info(path)
        resume.check_can_resume(
            info,
            getattr(strategy.lightning_module, "arch", None),
            strategy.layout.tensor_model_parallel_size,
            strategy.layout.context_parallel_size,
            with_optimizer=with_optimizer,
            pipeline=strategy.layout.pipeline_split,
            **resume_settings,
        )
        return info

    def load_module_state(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        """Restore the module's state outside the Megatron model (which :meth:`load` already loaded)."""
        megatron = tuple(f"{name}." for name in megatron_children(self.strategy.lightning_module))
        result = self.strategy.lightning_module.load_state_dict(checkpoint.get("state_dict") or {}, strict=False)
        missing = [key for key in result.missing_keys if not key.startswith(megatron)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"The checkpoint does not fit the module's non-Megatron state: missing {missing}, unexpected "
                f"{result.unexpected_keys}. Set LightningModule.strict_loading = False to load it anyway."
            )

    def _load_other_optimizers(self, states: list[dict[str, Any]]) -> None:
        """Restore the optimizers that are not Megatron's from their saved ``state_dict()`` (when fitting)."""
        from megatron.core.optimizer import MegatronOptimizer

        strategy = self.strategy
        if strategy.lightning_module.trainer.state.fn != TrainerFn.FITTING or not states:
            return
        if len(states) != len(strategy.optimizers):
            raise ckpt.CheckpointError(
                f"The checkpoint has the state of {len(states)} optimizers, this run has {len(strategy.optimizers)}."
            )
        for optimizer, state in zip(strategy.optimizers, states, strict=True):
            if not isinstance(optimizer, MegatronOptimizer):
                optimizer.load_state_dict(state)

    # ------------------------------------------------------------------ remove
    def remove(self, filepath: Any) -> None:
        """Delete a checkpoint directory (ModelCheckpoint's ``save_top_k`` rotation); rank 0 does it.

        With a background save pending, only once that save is published: until then the checkpoint it replaces
        is the newest complete one.
        """
        if self.async_saver is not None and self.async_saver.remove_after_pending_save(Path(filepath)):
            return
        if self.strategy.is_global_zero:
            directories.remove_checkpoint_directory(Path(filepath))

    # ------------------------------------------------------------------ what is saved
    def megatron_models(self) -> dict[str, torch.nn.Module]:
        """The LightningModule's Megatron models without their DDP wrappers, by checkpoint key.

        A model attribute is saved under its name; the chunks of a ``ModuleList`` attribute (virtual pipeline
        stages) under the name and their index (``model0``, ``model1``, as Megatron-LM keys them). The weights are
        stored by global layer index either way, so they reload into any pipeline split.
        """
        from megatron.core.utils import unwrap_model

        models: dict[str, torch.nn.Module] = {}
        for name, child in megatron_children(self.strategy.lightning_module).items():
            if isinstance(child, torch.nn.ModuleList):
                models.update({f"{name}{index}": unwrap_model(chunk) for index, chunk in enumerate(child)})
            else:
                models[name] = unwrap_model(child)
        return models

    def megatron_optimizer(self) -> Any:
        """The Megatron optimizer while fitting, else ``None`` (validation loads weights only)."""
        from megatron.core.optimizer import MegatronOptimizer

        strategy = self.strategy
        if strategy.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return None
        megatron = [opt for opt in strategy.optimizers if isinstance(opt, MegatronOptimizer)]
        if len(megatron) > 1:
            raise ckpt.CheckpointError(
                f"MegatronCPStrategy checkpoints one Megatron optimizer, the module has {len(megatron)}; return one "
                "(get_megatron_optimizer chains several parameter groups into one) from configure_optimizers."
            )
        return megatron[0] if megatron else None


def _optimizer_state_exists(optimizer: Any) -> bool:
    """Whether the torch optimizer(s) inside Megatron's ``optimizer`` hold state yet (they create it at their first
    step); ``True`` where that cannot be told."""
    for part in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        state = getattr(getattr(part, "optimizer", None), "state", None)
        if state is not None and len(state) == 0:
            return False
    return True
