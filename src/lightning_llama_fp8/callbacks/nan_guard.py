"""``NaNGuard``: no non-finite loss or gradient ever reaches the weights, and the report says where it came from.

Every training step, between the backward pass and the optimizer update, the guard reduces the loss, every
gradient and Transformer Engine's FP8 scaling state to "non-finite?" flags per rank (one fp32 sum per gradient
buffer, one fused max over all amax histories and scales, no per-layer host sync), takes the maximum over all
ranks with one all-reduce and reads it back once. All ranks therefore take the same decision:

* ``policy="raise"``: write the report and stop training with :class:`NonFiniteTrainingError`.
* ``policy="skip"``: veto this update (weights, optimizer moments and LR schedule stay as they were), count it,
  continue with the next batch.
* ``policy="rollback"``: like ``skip``, and also restore Transformer Engine's FP8 scaling state (amax histories and
  scales) from the last good step, because the bad step's forward and backward have already written their
  non-finite amaxes into it; optionally run the next ``bf16_steps_after_rollback`` steps without FP8, then go back.
  Weights and optimizer state need no copy: the guard never lets a non-finite update through, so they are still
  those of the last good step.

Why the FP8 state is checked too: TE's casts to FP8 saturate, so an Inf activation entering an FP8 GEMM becomes
the largest FP8 value and the loss and gradients stay finite. Only the amax TE recorded for that input shows it,
and with delayed scaling that Inf then sits in the amax history (TE keeps the old scale while the amax is not
finite), freezing the tensor's scale for ``amax_history_len`` steps. The guard treats such a step as bad like any
other; ``check_fp8_state=False`` turns this part off. It sees what is still in the history when the step ends: TE
folds each micro-batch's amaxes into it (forward and backward) and drops the oldest row, so an Inf stays visible
while the history is longer than the micro-batches per step; with ``amax_history_len=1`` (Megatron's default, not
the recipe's 1024) nothing is kept and the guard warns that this check is blind. An Inf recorded by a validation
forward is folded in by the next training step, which is then reported as bad.

More than ``max_consecutive_bad_steps`` bad steps in a row end training with the report (a persistent fault is
not something to skip forever). The report (JSON, one file per bad step, next to the logs) names the step, the
ranks, whether the loss and/or which parameters' gradients were non-finite, the first watched layer (forward
order) whose output went non-finite, i.e. where the NaN/Inf appeared, and the TE modules whose FP8 state went
non-finite with their amax and scale at that moment (an Inf shows there; TE's amax kernels skip NaN). With
``skip`` the Inf amaxes a bad step leaves in TE's history are zeroed, so they cannot freeze scales later.
Checkpoints are checked too: a checkpoint holding a non-finite weight is refused before it is written, so nothing
already saved is replaced.

The loss is read from ``pl_module.last_loss`` when the module sets it before its optimizer step (as
``LlamaLightningModule`` does); otherwise a non-finite loss is still caught through the gradients it produces.
Vetoing uses ``strategy.skip_optimizer_step`` (``MegatronCPStrategy``); with other strategies the guard drops the
gradients (``optimizer.zero_grad(set_to_none=True)``), which torch optimizers treat as "no update".
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_llama_fp8.fp8.state import (
    any_nonfinite,
    fp8_scaling_summary,
    fp8_state_tensors,
    nonfinite_fp8_state,
    sanitize_fp8_state,
)
from lightning_llama_fp8.parallel.pipeline import global_module_name, pipeline_stage
from lightning_llama_fp8.validate import as_bool, as_int

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

Policy = Literal["raise", "skip", "rollback"]
# Megatron's transformer layers as LightningModule submodules: "model.module.decoder.layers.3".
TRANSFORMER_LAYERS = r"(^|\.)layers\.\d+$"
_GLOBAL_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
POLICIES = ("raise", "skip", "rollback")


def _refuse_file_as_report_dir(path: Path) -> None:
    """A report_dir that is, or lies under, a regular file could never be created: refuse it now, not at the first
    bad step (the strategy also tries writing there before training starts)."""
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ValueError(f"NaNGuard report_dir {path} {where}; give a directory (it is created if missing).")


class NonFiniteTrainingError(RuntimeError):
    """Training produced a non-finite loss or gradient (or a checkpoint with a non-finite weight)."""


class NaNGuard(Callback):
    """Detect NaN/Inf in the loss and gradients every step, on all ranks, before the update; report and recover.

    Args:
        policy: ``raise``, ``skip`` or ``rollback`` (see the module docstring).
        max_consecutive_bad_steps: with ``skip``/``rollback``, stop after this many bad steps in a row.
        bf16_steps_after_rollback: with ``rollback``, steps to run without FP8 after a bad step (needs a precision
            plugin with ``set_fp8_enabled``, i.e. ``TEFP8Precision``); 0 keeps FP8 on.
        report_dir: where the JSON reports go (default: the trainer's log dir, else its root dir).
        max_reported_parameters: parameter names listed per rank in a report (0: none, only the counts).
        watch_outputs: regular expression over ``named_modules()`` names whose outputs are checked, on the device,
            for NaN/Inf at every forward (default: Megatron's transformer layers). On a bad step the report names
            the first of them whose output went non-finite: where a NaN appeared (TE's FP8 amaxes ignore NaN, so
            only an Inf shows in FP8 state). One fp32 sum per module per micro batch, no host sync; ``None``
            turns it off.
        check_fp8_state: also treat a step as bad when an amax history or scale of TE's delayed-scaling state
            holds NaN/Inf (see the module docstring). No effect without delayed-scaling FP8.
    """

    def __init__(
        self,
        policy: Policy = "raise",
        max_consecutive_bad_steps: int = 3,
        bf16_steps_after_rollback: int = 0,
        report_dir: str | os.PathLike[str] | None = None,
        max_reported_parameters: int = 20,
        watch_outputs: str | None = TRANSFORMER_LAYERS,
        check_fp8_state: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"NaNGuard policy must be one of {', '.join(POLICIES)}; got {policy!r}.")
        max_consecutive_bad_steps = as_int(max_consecutive_bad_steps, "NaNGuard max_consecutive_bad_steps", at_least=1)
        bf16_steps_after_rollback = as_int(bf16_steps_after_rollback, "NaNGuard bf16_steps_after_rollback", at_least=0)
        max_reported_parameters = as_int(max_reported_parameters, "NaNGuard max_reported_parameters", at_least=0)
        check_fp8_state = as_bool(check_fp8_state, "NaNGuard check_fp8_state")
        if bf16_steps_after_rollback and policy != "rollback":
            raise ValueError("bf16_steps_after_rollback only applies to policy='rollback'.")
        if watch_outputs is not None:
            try:
                re.compile(watch_outputs)
            except re.error as err:
                raise ValueError(
                    f"NaNGuard watch_outputs {watch_outputs!r} is not a regular expression: {err}."
                ) from None
        if report_dir is not None:
            _refuse_file_as_report_dir(Path(report_dir))
        self.policy = policy
        self.max_consecutive_bad_steps = max_consecutive_bad_steps
        self.bf16_steps_after_rollback = bf16_steps_after_rollback
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self.max_reported_parameters = max_reported_parameters
        self.watch_outputs = watch_outputs
        self.check_fp8_state = check_fp8_state
        self._fp8_tensors: list[Tensor] | None = None  # see _fp8_state
        self._watched: list[str] = []  # module names, forward order
        self._output_sums: Tensor | None = None  # per watched module: this step's output sums (NaN/Inf stick)
        self._hooks: list[Any] = []
        self.bad_steps: list[int] = []  # global steps whose update was vetoed (or that raised)
        self.reports: list[Path] = []
        self.consecutive_bad_steps = 0
        self._fp8_snapshot: list[Tensor] | None = None  # copies of _fp8_tensors after the last good step
        self._fp8_resume_step: int | None = None  # first step that runs in FP8 again after a BF16 window

    # ------------------------------------------------------------------ Lightning hooks
    def output_directories(self, trainer: pl.Trainer) -> list[tuple[Path, bool, str]]:
        """Where the reports of bad steps go (global rank zero writes them), for the strategy's pre-flight check."""
        return [(self.report_dir or Path(trainer.log_dir or trainer.default_root_dir), False, "report_dir")]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.bf16_steps_after_rollback and not callable(getattr(trainer.precision_plugin, "set_fp8_enabled", None)):
            raise ValueError(
                f"NaNGuard(bf16_steps_after_rollback={self.bf16_steps_after_rollback}) needs a precision plugin that "
                f"can switch FP8 off (TEFP8Precision); this trainer uses {type(trainer.precision_plugin).__name__}. "
                "Set bf16_steps_after_rollback=0 or use plugins=[TEFP8Precision()]."
            )
        if self.bf16_steps_after_rollback and getattr(trainer.precision_plugin, "fp8_param_gather", False):
            raise ValueError(
                "NaNGuard(bf16_steps_after_rollback>0) cannot run BF16 steps while TEFP8Precision stores weights in "
                "FP8 (fp8_param_gather=True): there is no BF16 copy of them. Set fp8_param_gather=False or "
                "bf16_steps_after_rollback=0."
            )
        plugin = trainer.precision_plugin
        delayed = getattr(plugin, "recipe", None) == "delayed"
        if self.check_fp8_state and delayed and getattr(plugin, "amax_history_len", 2) < 2:
            rank_zero_warn(
                "NaNGuard(check_fp8_state=True) cannot see an Inf in FP8 state with amax_history_len=1: "
                "Transformer Engine drops each amax when it folds it into the history, so an Inf that its "
                "saturating FP8 cast hid from loss and gradients goes unnoticed. Use amax_history_len >= the "
                "micro-batches per step + 1 (the recipe uses 1024)."
            )
        if self.report_dir is None:
            self.report_dir = Path(trainer.log_dir or trainer.default_root_dir)
        _refuse_file_as_report_dir(self.report_dir)  # found now, not at the first bad step

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fit start: LlamaLightningModule builds its model in configure_model, after the setup hooks.
        self._remove_hooks()
        self._fp8_tensors = self._fp8_snapshot = None
        if self.watch_outputs is None:
            return
        pattern = re.compile(self.watch_outputs)
        watched = [(name, m) for name, m in pl_module.named_modules() if name and pattern.search(name)]
        self._watched = [name for name, _ in watched]
        if not watched:
            rank_zero_warn(f"NaNGuard(watch_outputs={self.watch_outputs!r}) matches no module: no output is watched.")
        self._output_sums = torch.zeros(len(watched), dtype=torch.float32, device=pl_module.device)
        for index, (_, module) in enumerate(watched):
            self._hooks.append(module.register_forward_hook(self._output_watcher(index)))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._output_sums is not None:
            self._output_sums.zero_()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_bad, grads_bad, fp8_bad = self._nonfinite_flags(trainer, pl_module)
        if not (loss_bad or grads_bad or fp8_bad):
            self.consecutive_bad_steps = 0
            if self.policy == "rollback":
                # After a good forward/backward the FP8 scaling state is the "last good" one.
                self._save_fp8_snapshot(pl_module)
            return

        step = trainer.global_step
        self.consecutive_bad_steps += 1
        self.bad_steps.append(step)
        stop = self.policy == "raise" or self.consecutive_bad_steps > self.max_consecutive_bad_steps
        action = "raise" if stop else self.policy
        report = self._report(trainer, pl_module, step, (loss_bad, grads_bad, fp8_bad), action)
        summary = _summarize(report)
        if stop:
            if self.policy != "raise":
                limit = self.max_consecutive_bad_steps
                summary += f" That is {self.consecutive_bad_steps} bad steps in a row (limit {limit})."
            raise NonFiniteTrainingError(summary)

        log.warning("%s", summary)
        what = _describe_nonfinite(loss_bad, grads_bad, fp8_bad)
        _veto_update(trainer, optimizer, f"non-finite {what} at step {step}")
        if self.policy == "rollback":
            self._roll_back(trainer, pl_module)
        else:
            # The bad step's forward/backward wrote Inf amaxes into TE's history; with "max" over 1024 steps they
            # would freeze those scales for as long. Drop them (zero = "no amax", as TE writes itself).
            sanitize_fp8_state(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("nan_guard/bad_steps", float(len(self.bad_steps)), on_step=True, sync_dist=False)
        if self._fp8_resume_step is not None and trainer.global_step >= self._fp8_resume_step:
            trainer.precision_plugin.set_fp8_enabled(pl_module, True)
            self._fp8_resume_step = None
            log.warning("NaNGuard: FP8 back on from step %d.", trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise NonFiniteTrainingError(
                f"Refusing to write a checkpoint at step {trainer.global_step}: non-finite values in "
                f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Earlier checkpoints are untouched."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"bad_steps": list(self.bad_steps), "consecutive_bad_steps": self.consecutive_bad_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.bad_steps = list(state_dict.get("bad_steps", []))
        self.consecutive_bad_steps = int(state_dict.get("consecutive_bad_steps", 0))

    # ------------------------------------------------------------------ detection
    def _nonfinite_flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[bool, bool, bool]:
        """Loss, gradients, FP8 state: non-finite on any rank? One all-reduce, one host sync."""
        grads = gradient_tensors(trainer, pl_module)
        device = grads[0].device if grads else pl_module.device
        flags = torch.zeros(3, device=device)
        loss = getattr(pl_module, "last_loss", None)
        if isinstance(loss, Tensor):
            flags[0] = (~torch.isfinite(loss.detach().float())).any()
        if grads:
            # A sum propagates NaN/Inf and needs no tensor-sized temporary (isfinite(t).all() would allocate one).
            sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])
            flags[1] = (~torch.isfinite(sums)).any()
        fp8_tensors = self._fp8_state(pl_module) if self.check_fp8_state else []
        if fp8_tensors:
            flags[2] = any_nonfinite(fp8_tensors).to(device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_bad, grads_bad, fp8_bad = flags.tolist()
        return bool(loss_bad), bool(grads_bad), bool(fp8_bad)

    def _fp8_state(self, pl_module: pl.LightningModule) -> list[Tensor]:
        """TE's live amax histories and scales (empty without delayed scaling), looked up once per fit.

        TE creates them in the first FP8 forward, which precedes the first check, and keeps the same tensors
        afterwards (switching FP8 off and on for a BF16 window included); only a new amax_history_len replaces them.
        """
        if self._fp8_tensors is None:
            self._fp8_tensors = fp8_state_tensors(pl_module)
        return self._fp8_tensors

    def _output_watcher(self, index: int) -> Any:
        def watch(module: torch.nn.Module, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and self._output_sums is not None:
                # Accumulate the output's sum in place: a NaN/Inf in any micro batch stays in it, and the step
                # costs one reduction and one add per module, no host sync (read only on bad steps).
                self._output_sums.narrow(0, index, 1).add_(tensor.detach().sum(dtype=torch.float32))

        return watch

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ------------------------------------------------------------------ recovery
    def _save_fp8_snapshot(self, pl_module: pl.LightningModule) -> None:
        """Copy the FP8 state into buffers allocated once: one fused copy per good step, no module walk."""
        live = self._fp8_state(pl_module)
        with torch.no_grad():
            if self._fp8_snapshot is None:
                self._fp8_snapshot = [t.detach().clone() for t in live]
            elif live:
                torch._foreach_copy_(self._fp8_snapshot, live)

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fp8_snapshot is not None:
            # In place: TE's quantizers and global amax buffers hold these very tensors (see load_fp8_state).
            with torch.no_grad():
                if self._fp8_snapshot:
                    torch._foreach_copy_(self._fp8_state(pl_module), self._fp8_snapshot)
        else:  # bad before any good step: nothing to go back to, so at least drop the non-finite entries
            sanitize_fp8_state(pl_module)
        if self.bf16_steps_after_rollback:
            trainer.precision_plugin.set_fp8_enabled(pl_module, False)
            # Steps bad+1 .. bad+N run in BF16; global_step already counts the (vetoed) bad step when it ends.
            self._fp8_resume_step = trainer.global_step + 1 + self.bf16_steps_after_rollback
            log.warning("NaNGuard: running the next %d steps without FP8.", self.bf16_steps_after_rollback)

    # ------------------------------------------------------------------ report
    def _report(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: int,
        flags: tuple[bool, bool, bool],
        action: str,
    ) -> dict[str, Any]:
        """Gather every rank's findings (bad steps only, so the per-parameter checks cost nothing normally)."""
        local = self._local_findings(trainer, pl_module)
        ranks: list[Any] = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
        first_fp8 = next((name for r in ranks for name in r["nonfinite_fp8_modules"]), None)
        first_fwd = next((name for r in ranks for name in r["nonfinite_fp8_forward_modules"]), None)
        first_output = min(
            (r["nonfinite_outputs"][0] for r in ranks if r["nonfinite_outputs"]), key=self._forward_order, default=None
        )
        loss_bad, grads_bad, fp8_bad = flags
        report = {
            "step": step,
            "policy": self.policy,
            "action": action,
            "loss_nonfinite": loss_bad,
            "gradients_nonfinite": grads_bad,
            # An Inf that FP8 casts saturated: loss and gradients finite, TE's amax history not (module docstring).
            "fp8_state_nonfinite": fp8_bad,
            "ranks_with_nonfinite_loss": [r["rank"] for r in ranks if r["loss_nonfinite"]],
            "ranks_with_nonfinite_gradients": [r["rank"] for r in ranks if r["nonfinite_gradient_count"]],
            # The first watched module (forward order) whose output went non-finite on any rank: where it started.
            "first_nonfinite_output": first_output,
            # Where an Inf first appeared in the forward pass (the first FP8 module whose input went bad);
            # backward state goes bad in every layer the gradient crosses, so it only says "somewhere upstream".
            "first_nonfinite_fp8_forward_module": first_fwd,
            "first_nonfinite_fp8_module": first_fp8,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "bad_steps": list(self.bad_steps),
            "ranks": ranks,
        }
        if trainer.is_global_zero and self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            path = self.report_dir / f"nan_report_step{step:07d}.json"
            path.write_text(json.dumps(report, indent=2))
            self.reports.append(path)
            report["path"] = str(path)
        return report

    def _forward_order(self, name: str) -> tuple[int, int]:
        """Where a watched module runs in the forward pass: transformer layers by their global index (the same on
        every pipeline stage), then the others in this rank's watch order."""
        match = _GLOBAL_LAYER.search(name)
        if match is not None:
            return (0, int(match.group(1)))
        return (1, self._watched.index(name) if name in self._watched else len(self._watched))

    def _local_findings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        loss = getattr(pl_module, "last_local_loss", None)  # this rank's share, if the module keeps it
        loss = loss if isinstance(loss, Tensor) else getattr(pl_module, "last_loss", None)
        bad_params = nonfinite_gradients(pl_module)
        finite = torch.isfinite(self._output_sums).tolist() if self._output_sums is not None else []
        bad_outputs = [name for name, ok in zip(self._watched, finite, strict=True) if not ok]
        bad_fp8 = nonfinite_fp8_state(pl_module)
        bad_fp8_forward = nonfinite_fp8_state(pl_module, direction="fwd") if bad_fp8 else []
        summary = fp8_scaling_summary(pl_module) if bad_fp8 else {}
        # Under pipeline parallelism each stage numbers its layers from 0: report global layer numbers and the stage.
        modules = dict(pl_module.named_modules())

        def named(names: list[str]) -> list[str]:
            return [global_module_name(name, modules) for name in names]

        bad_params = named(bad_params)
        bad_outputs, bad_fp8, bad_fp8_forward = named(bad_outputs), named(bad_fp8), named(bad_fp8_forward)
        summary = {global_module_name(name, modules): value for name, value in summary.items()}
        return {
            "rank": trainer.global_rank,
            "pipeline_stage": pipeline_stage(),
            "loss": float(loss) if isinstance(loss, Tensor) else None,
            "loss_nonfinite": isinstance(loss, Tensor) and not bool(torch.isfinite(loss.detach().float()).all()),
            "nonfinite_gradient_count": len(bad_params),
            "nonfinite_gradients": bad_params[: self.max_reported_parameters],
            "nonfinite_outputs": bad_outputs[: self.max_reported_parameters],
            "nonfinite_fp8_modules": bad_fp8,
            "nonfinite_fp8_forward_modules": bad_fp8_forward,
            "fp8_state": {name: summary.get(name) for name in bad_fp8[: self.max_reported_parameters]},
        }


# ---------------------------------------------------------------------------------------------- helpers
def gradient_tensors(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Tensor]:
    """The tensors holding this step's gradients: Megatron DDP's contiguous grad buffers, else ``param.grad``."""
    buffers: list[Tensor] = []
    for ddp in getattr(trainer.strategy, "ddp_modules", []):
        for buffer in [*getattr(ddp, "buffers", []), *getattr(ddp, "expert_parallel_buffers", [])]:
            buffers.append(buffer.grad_data)
    if buffers:
        return buffers
    return [g for _, g in _named_gradients(pl_module)]


def nonfinite_gradients(module: torch.nn.Module) -> list[str]:
    """Names of parameters whose gradient holds NaN/Inf (one host sync for all of them)."""
    return _nonfinite_names(_named_gradients(module))


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Keys of floating-point tensors in ``state_dict`` that hold NaN/Inf (one host sync for all of them)."""
    return _nonfinite_names(
        [(k, v) for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
    )


def _nonfinite_names(named: list[tuple[str, Tensor]]) -> list[str]:
    # One fp32 sum per tensor (propagates NaN/Inf), gathered on the first tensor's device, read back once.
    if not named:
        return []
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(t.sum(dtype=torch.float32)).to(device) for _, t in named]).tolist()
    return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]


def _named_gradients(module: torch.nn.Module) -> list[tuple[str, Tensor]]:
    # Megatron DDP accumulates into param.main_grad (a view into its buffer); plain modules use param.grad.
    named = []
    for name, param in module.named_parameters():
        grad = getattr(param, "main_grad", None)
        grad = grad if grad is not None else param.grad
        if grad is not None:
            named.append((name, grad))
    return named


def _first_tensor(output: Any) -> Tensor | None:
    """The first floating-point tensor of a module output (Megatron layers return tuples)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() and output.numel() else None
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _veto_update(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, reason: str) -> None:
    skip = getattr(trainer.strategy, "skip_optimizer_step", None)
    if callable(skip):
        skip(reason)
    else:
        optimizer.zero_grad(set_to_none=True)


def _describe_nonfinite(loss_bad: bool, grads_bad: bool, fp8_bad: bool) -> str:
    parts = (("loss", loss_bad), ("gradients", grads_bad), ("FP8 scaling state", fp8_bad))
    return " and ".join(part for part, bad in parts if bad)


def _summarize(report: dict[str, Any]) -> str:
    fp8_bad = report.get("fp8_state_nonfinite", False)
    what = _describe_nonfinite(report["loss_nonfinite"], report["gradients_nonfinite"], fp8_bad)
    params = sorted({p for r in report["ranks"] for p in r["nonfinite_gradients"]})
    text = f"NaNGuard: non-finite {what} at step {report['step']} (policy {report['policy']}: {report['action']})."
    if report["ranks_with_nonfinite_loss"]:
        text += f" Loss non-finite on ranks {report['ranks_with_nonfinite_loss']}."
    if report["ranks_with_nonfinite_gradients"]:
        shown = ", ".join(params[:5]) + (" ..." if len(params) > 5 else "")
        text += f" Gradients non-finite on ranks {report['ranks_with_nonfinite_gradients']}: {shown}."
    if report["first_nonfinite_output"]:
        text += f" First watched module with a non-finite output: {report['first_nonfinite_output']}."
    if report["first_nonfinite_fp8_forward_module"]:
        text += f" First FP8 module with a non-finite input: {report['first_nonfinite_fp8_forward_module']}."
    elif report["first_nonfinite_fp8_module"] and not report["first_nonfinite_output"]:
        text += f" First FP8 module with non-finite scaling state: {report['first_nonfinite_fp8_module']}."
    if "path" in report:
        text += f" Report: {report['path']}"
    return text
