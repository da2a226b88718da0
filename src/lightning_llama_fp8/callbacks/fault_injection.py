"""``FaultInjector``: put a NaN or Inf into one activation, gradient or loss at one chosen step.

NaN handling (``NaNGuard``, Megatron's ``check_for_nan_in_grad``, a user's own) is code that runs only when
something has already gone wrong, so it is rarely exercised. This callback makes the fault happen on purpose, at
a known step, place and rank, so that tests and users can check that the handling catches it, reports the right
place and recovers.

Mechanics (all hooks are idle except between ``on_train_batch_start`` and ``on_train_batch_end`` of the batches
whose ``trainer.global_step`` equals ``step``):

* ``activation`` / ``loss``: a forward hook on the named module returns its output with the first element of the
  first floating-point tensor replaced (tensor outputs, and tuples/lists such as Megatron's
  ``(hidden_states, bias)``). ``loss`` is the same mechanism, aimed by default at ``model``: in
  :class:`~lightning_llama_fp8.model.LlamaLightningModule` that is the Megatron GPTModel (wrapped in Megatron DDP
  once training starts), which returns the per-token losses when given labels.
* ``gradient``: ``param.register_hook`` on the named parameter returns the gradient with its first element
  replaced. Tensor hooks run before the gradient is accumulated, so the poisoned value reaches ``param.grad`` and,
  under Megatron DDP, the ``main_grad`` buffer it copies from there. (With ``gradient_accumulation_fusion`` the
  weight-gradient GEMM of Transformer Engine's layers writes into ``main_grad`` directly and no hook sees it:
  :attr:`FaultInjector.needs_unfused_weight_gradients` has ``MegatronCPStrategy`` leave that fusion off by
  default, and refuse it when asked for.)

The poisoned output or gradient is a new tensor (a clone), never an in-place edit of one autograd may have saved.
The replaced element is a constant for autograd: gradients turn non-finite only where the model's own arithmetic
carries the bad value on (every weight downstream of a poisoned activation, for instance). A poisoned loss is the
last node, so its gradients stay finite: that tests loss checks; use ``gradient`` to test gradient checks.
With several micro-batches per step (gradient accumulation, Megatron's schedule) every micro-batch of that step is
poisoned; ``injections`` gets one entry per poisoned tensor.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_llama_fp8.parallel.pipeline import gather_over_pipeline, global_module_name
from lightning_llama_fp8.validate import as_int

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)

Target = Literal["activation", "gradient", "loss"]
FaultValue = Literal["nan", "inf"]
TARGETS = ("activation", "gradient", "loss")
VALUES = {"nan": float("nan"), "inf": float("inf")}
DEFAULT_LOSS_MODULE = "model"


class FaultInjector(Callback):
    """Replace one element of an activation, a gradient or the loss with NaN/Inf at one training step.

    Args:
        target: ``activation`` (output of module ``name``), ``gradient`` (gradient of parameter ``name``) or
            ``loss`` (output of module ``name``, by default ``"model"``, the module that returns the loss).
        name: module name as in ``pl_module.named_modules()`` (activation, loss), or parameter name as in
            ``pl_module.named_parameters()`` (gradient); names are those seen at fit start, i.e. after the
            strategy wrapped the model (Megatron DDP adds ``.module``: ``model.module.decoder.layers.0...``).
        step: the ``trainer.global_step`` at which to inject, i.e. during the (step+1)-th optimizer step.
        value: ``nan`` or ``inf``.
        ranks: global ranks that inject; ``None`` for all. Other ranks register no hook at all.

    ``injections`` lists what was injected: dicts with ``step``, ``rank``, ``target``, ``name``, ``value``.
    """

    def __init__(
        self,
        target: Target,
        name: str | None = None,
        *,
        step: int,
        value: FaultValue = "nan",
        ranks: list[int] | None = None,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"FaultInjector target must be one of {', '.join(TARGETS)}; got {target!r}.")
        if name is None:
            if target != "loss":
                what = "a module name" if target == "activation" else "a parameter name"
                raise ValueError(f"FaultInjector(target={target!r}) needs name= ({what}).")
            name = DEFAULT_LOSS_MODULE
        step = as_int(step, "FaultInjector step (a trainer.global_step)", at_least=0)
        if value not in VALUES:
            raise ValueError(f"FaultInjector value must be one of {', '.join(VALUES)}; got {value!r}.")
        if ranks is not None:
            listed = [] if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Iterable) else list(ranks)
            if not listed:
                raise ValueError(
                    f"FaultInjector ranks must be a non-empty list of global ranks (or None for all), got {ranks!r}."
                )
            ranks = [
                as_int(rank, f"FaultInjector ranks[{i}] (a global rank)", at_least=0) for i, rank in enumerate(listed)
            ]
        self.target = target
        self.name = name
        self.step = step
        self.value = value
        self.ranks = ranks
        self.injections: list[dict[str, Any]] = []
        self._handle: RemovableHandle | None = None
        self._armed = False
        self._rank = 0
        self._current_step = -1

    @property
    def needs_unfused_weight_gradients(self) -> bool:
        """A gradient injection hooks the parameter's gradient, which gradient accumulation fusion never produces
        for Transformer Engine's layers: ``MegatronCPStrategy`` reads this to leave that fusion off (or refuse it)."""
        return self.target == "gradient"

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fit start rather than setup: modules built in configure_model (LlamaLightningModule's GPTModel) exist
        # only after the setup hooks, and the strategy wraps them (renaming) just before this hook.
        self._remove_hook()
        self._rank = trainer.global_rank
        # Names with global layer numbers: under pipeline parallelism the layer is on one stage only.
        all_modules = dict(pl_module.named_modules())
        if self.target == "gradient":
            params = {global_module_name(n, all_modules): p for n, p in pl_module.named_parameters()}
            param = params.get(self.name)
            # (held here, requires grad here), from every pipeline stage: a name may belong to a layer on another
            # stage, and all ranks raise the same error or none does (one raising alone would leave the others
            # waiting in the first collective).
            found = gather_over_pipeline((param is not None, param is not None and param.requires_grad))
            if not any(held for held, _ in found):
                raise ValueError(_unknown_name("parameter", self.name, list(params), "named_parameters"))
            if not any(grad for _, grad in found):
                raise ValueError(f"FaultInjector: parameter {self.name!r} does not require grad; it gets no gradient.")
            if param is not None and self._injects_here():
                self._handle = param.register_hook(self._poison_gradient)
        else:
            modules = {global_module_name(n, all_modules): m for n, m in all_modules.items()}
            if not any(gather_over_pipeline(self.name in modules)):
                raise ValueError(_unknown_name("module", self.name, list(modules), "named_modules"))
            if self.name in modules and self._injects_here():
                self._handle = modules[self.name].register_forward_hook(self._poison_output)
        if self._handle is not None and trainer.global_step > self.step:
            log.warning(
                "FaultInjector: training starts at step %d, after step %d; nothing will be injected.",
                trainer.global_step,
                self.step,
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._current_step = trainer.global_step
        self._armed = self._handle is not None and trainer.global_step == self.step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed = False

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    # ------------------------------------------------------------------ hooks on the model
    def _poison_output(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not self._armed:
            return None  # None: keep the output as it is
        poisoned, done = _poison_first(output, VALUES[self.value])
        if not done:
            raise RuntimeError(
                f"FaultInjector: the output of module {self.name!r} ({type(output).__name__}) holds no non-empty "
                "floating-point tensor to poison."
            )
        self._record()
        return poisoned

    def _poison_gradient(self, grad: Tensor) -> Tensor | None:
        if not self._armed:
            return None
        self._record()
        return _poisoned(grad, VALUES[self.value])

    # ------------------------------------------------------------------ helpers
    def _injects_here(self) -> bool:
        return self.ranks is None or self._rank in self.ranks

    def _record(self) -> None:
        entry = {
            "step": self._current_step,
            "rank": self._rank,
            "target": self.target,
            "name": self.name,
            "value": self.value,
        }
        # One warning per step, even when every micro-batch of that step is poisoned.
        if not any(e["step"] == self._current_step for e in self.injections):
            log.warning(
                "FaultInjector: injecting %s into the %s of %r at step %d on rank %d.",
                self.value,
                self.target,
                self.name,
                self._current_step,
                self._rank,
            )
        self.injections.append(entry)

    def _remove_hook(self) -> None:
        self._armed = False
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _poisoned(tensor: Tensor, value: float) -> Tensor:
    """A copy of ``tensor`` whose first element is ``value`` (autograd flows through to the other elements)."""
    out = tensor.clone()
    out[(0,) * out.dim()] = value
    return out


def _poison_first(output: Any, value: float) -> tuple[Any, bool]:
    """``output`` with its first non-empty floating-point tensor poisoned (depth-first); and whether one was."""
    if isinstance(output, Tensor):
        if (output.is_floating_point() or output.is_complex()) and output.numel() > 0:
            return _poisoned(output, value), True
        return output, False
    if isinstance(output, (tuple, list)):
        items = list(output)
        for i, item in enumerate(items):
            new, done = _poison_first(item, value)
            if done:
                items[i] = new
                if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
                    return type(output)(*items), True
                return type(output)(items), True
    return output, False


def _unknown_name(kind: str, name: str, known: Sequence[str], method: str) -> str:
    known = [k for k in known if k]  # the root module's name is ""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        hint = f"Close matches: {', '.join(repr(c) for c in close)}."
    else:
        hint = f"Some names: {', '.join(repr(k) for k in list(known)[:8])}{' ...' if len(known) > 8 else ''}."
    return f"FaultInjector: no {kind} named {name!r} in pl_module.{method}(). {hint}"
