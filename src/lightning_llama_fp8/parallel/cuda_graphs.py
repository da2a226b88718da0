"""CUDA graphs of the transformer layers for ``MegatronCPStrategy``: Megatron-Core's ``cuda_graph_impl =
"transformer_engine"`` (Transformer Engine's ``make_graphed_callables``: each layer's forward and backward as graphs).

After ``warmup_steps`` eager training steps of this fit, :class:`CudaGraphCapture` captures every transformer layer's
forward and backward (Megatron's ``TECudaGraphHelper``; without pipeline parallelism one capture serves every micro
batch); later training steps replay them, so each layer launches as one graph instead of dozens of kernels.
Evaluation runs eagerly (Megatron replays only in training mode). What cannot run with graphs is refused before
anything is built (:meth:`CudaGraphSettings.check`): Megatron's own layer implementation, full activation recompute
(Megatron allows it only with whole-iteration graphs), optimizer CPU offload (not tried here), document masking
(packed sequences change shape from batch to batch; Transformer Engine's layers assert on them), pipeline parallelism
(not shown to work here), NaNGuard's BF16 steps after a rollback (the graphs were captured in FP8), and callbacks that
hook a layer's output (Transformer Engine captures no module with hooks).

From YAML::

    trainer:
      strategy:
        class_path: lightning_llama_fp8.MegatronCPStrategy
        init_args:
          cuda_graphs: {modules: null, warmup_steps: 3}
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_llama_fp8._compat.megatron import graph_capture_undone_on_failure
from lightning_llama_fp8.validate import SettingError, as_int

log = logging.getLogger(__name__)

#: What Megatron can graph inside a dense Llama layer; ``None`` (or empty): the whole layer.
GRAPHABLE_MODULES = ("attn", "mlp")


@dataclass
class CudaGraphSettings:
    """Capture each transformer layer as CUDA graphs after ``warmup_steps`` training steps and replay them.

    Args:
        modules: the parts of each layer to capture, any of ``attn`` and ``mlp`` (Megatron's ``cuda_graph_modules``);
            ``None``: the whole layer.
        warmup_steps: eager training steps of each fit before the capture (Megatron's ``cuda_graph_warmup_steps``),
            at least 1.
    """

    modules: list[str] | None = None
    warmup_steps: int = 3

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.modules is not None:
            if isinstance(self.modules, str) or not self.modules:
                problems.append(f"modules must be a non-empty list of {', '.join(GRAPHABLE_MODULES)}, or null")
            else:
                unknown = [name for name in self.modules if name not in GRAPHABLE_MODULES]
                if unknown:
                    problems.append(
                        f"unknown modules {unknown} (a dense Llama layer has {', '.join(GRAPHABLE_MODULES)})"
                    )
                if len(set(self.modules)) != len(self.modules):
                    problems.append(f"modules lists a name twice: {self.modules}")
        try:
            self.warmup_steps = as_int(self.warmup_steps, "warmup_steps", at_least=1)
        except SettingError as err:
            problems.append(str(err).rstrip("."))
        if problems:
            raise ValueError("cuda_graphs: " + "; ".join(problems) + ".")

    def check(
        self,
        *,
        transformer_impl: str,
        full_recompute: bool,
        optimizer_offloaded: bool,
        document_masking: bool,
        pipeline_model_parallel_size: int,
        callback_conflicts: Sequence[str] = (),
    ) -> None:
        """Raise ``ValueError`` for what cannot run with the layers captured as graphs (before anything is built);
        ``callback_conflicts``: the callbacks that cannot go with graphs, and why (:func:`callback_conflicts`)."""
        problems = []
        if transformer_impl != "transformer_engine":
            problems.append("needs model.arch.transformer_impl 'transformer_engine' (Transformer Engine captures them)")
        if full_recompute:
            problems.append(
                "cannot go with full activation recompute (Megatron captures a recomputed layer only in whole-"
                "iteration graphs); use selective recompute or none"
            )
        if optimizer_offloaded:
            problems.append("cannot go with optimizer_offload (the two were never run together here)")
        if document_masking:
            problems.append(
                "cannot go with document masking (packed sequences change shape from batch to batch, and Transformer "
                "Engine's graphed layers assert on them)"
            )
        if pipeline_model_parallel_size > 1:
            problems.append("was not shown to work with pipeline parallelism here; set pipeline_model_parallel_size 1")
        problems.extend(f"cannot go with {conflict}" for conflict in callback_conflicts)
        if problems:
            raise ValueError("cuda_graphs: " + "; ".join(problems) + ".")

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """The CUDA-graph fields of Megatron's ``TransformerConfig`` (its RNG tracker must be Transformer Engine's)."""
        return {
            "cuda_graph_impl": "transformer_engine",
            "cuda_graph_modules": list(self.modules or []),
            "cuda_graph_warmup_steps": self.warmup_steps,
            "use_te_rng_tracker": True,
        }

    def describe(self) -> str:
        parts = ", ".join(self.modules) if self.modules else "whole layers"
        return f"CUDA graphs of the transformer layers ({parts}), captured after {self.warmup_steps} training steps"


#: A module name inside a transformer layer (``decoder.layers.3``, ``decoder.layers.3.mlp``): captured or replayed.
_IN_A_LAYER = re.compile(r"(^|\.)layers\.\d+(\.|$)")


def callback_conflicts(callbacks: list[Any]) -> list[str]:
    """The callbacks that cannot go with captured layers, each with why and what to change: NaNGuard's output watch
    (its default pattern names the layers) and FaultInjector's activation target inside a layer hook a layer's output
    (Transformer Engine captures no module with forward hooks, and hooks inside a replayed layer never run);
    FP8StatsMonitor's Transformer Engine debug statistics (TE refuses CUDA graphs with debug on); NaNGuard's BF16
    steps after a rollback (the graphs were captured in FP8)."""
    why_hooks = "Transformer Engine captures no layer with forward hooks, and hooks inside a replayed layer never run"
    conflicts = []
    for callback in callbacks:
        kind = type(callback).__name__
        watch = getattr(callback, "watch_outputs", None)
        if watch is not None:
            conflicts.append(
                f"{kind}(watch_outputs={watch!r}) ({why_hooks}; set watch_outputs=None: non-finite losses and "
                "gradients are still caught)"
            )
        if getattr(callback, "target", None) == "activation" and _IN_A_LAYER.search(getattr(callback, "name", "")):
            conflicts.append(f"{kind}(target='activation', name={callback.name!r}) ({why_hooks}; inject outside the "
                             "layers, or into a gradient)")  # fmt: skip
        if getattr(callback, "bf16_steps_after_rollback", 0):
            conflicts.append(
                f"{kind}(bf16_steps_after_rollback>0) (the graphs were captured in FP8 and would keep running FP8 "
                "during those steps)"
            )
        if getattr(callback, "te_debug_stats", None):
            conflicts.append(
                f"{kind}(te_debug_stats=...) (Transformer Engine's debug statistics do not run in CUDA graphs; drop "
                "te_debug_stats)"
            )
    return conflicts


def graphed_layers(module: Any) -> int:
    """How many modules of ``module`` hold captured CUDA graphs now (Megatron puts them on each captured layer)."""
    return sum(1 for part in module.modules() if getattr(part, "cuda_graphs", None))


def prepare_environment() -> None:
    """Settings the capture needs before CUDA and NCCL start: with PyTorch's expandable segments, NCCL must not
    register graph buffers (Megatron asserts ``NCCL_GRAPH_REGISTER=0``, else illegal memory accesses); a value set
    otherwise is refused here rather than at the capture."""
    expandable = "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if expandable and os.environ.setdefault("NCCL_GRAPH_REGISTER", "0") != "0":
        raise ValueError(
            f"cuda_graphs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True need NCCL_GRAPH_REGISTER=0 (got "
            f"{os.environ['NCCL_GRAPH_REGISTER']!r}; megatron-core refuses the capture otherwise): unset it or "
            "set it to 0."
        )


class CudaGraphCapture:
    """Captures the layers once, after the warm-up steps of a fit, and deletes the graphs at its end."""

    def __init__(self, settings: CudaGraphSettings) -> None:
        self.settings = settings
        self.steps_seen = 0
        self._helper: Any = None
        self._calculator = False

    @property
    def captured(self) -> bool:
        return self._helper is not None

    def count_step(self) -> bool:
        """Count a training step of this fit; True when the layers are to be captured before it."""
        self.steps_seen += 1
        return not self.captured and self.steps_seen > self.settings.warmup_steps

    def capture(
        self,
        ddp_modules: list[Any],
        optimizer: Any,
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        data_parallel_size: int,
        rank: int,
        overlap_param_gather: bool,
    ) -> None:
        """Capture every layer (before the step's gradients are zeroed); a capture that fails, or finds no layer to
        capture, raises, with the process-wide capture state undone."""
        from megatron.core import num_microbatches_calculator as calculator
        from megatron.core.transformer.cuda_graphs import TECudaGraphHelper

        try:  # the helper asks Megatron-LM's micro-batch calculator, which Lightning's loop never configures
            calculator.get_num_microbatches()
        except AttributeError:  # not configured
            calculator.init_num_microbatches_calculator(
                rank, None, global_batch_size, micro_batch_size, data_parallel_size
            )
            self._calculator = True
        config = ddp_modules[0].config
        helper = TECudaGraphHelper(ddp_modules, config, seq_length, micro_batch_size, optimizers=[optimizer])
        if overlap_param_gather:
            for wrapped in ddp_modules:
                wrapped.disable_forward_pre_hook(param_sync=False)
        with graph_capture_undone_on_failure(list(helper.flattened_callables)):
            helper.create_cudagraphs()
        if not helper.graphs_created():  # megatron-core only logs "No graphable layers found" and trains eagerly
            raise RuntimeError(
                f"cuda_graphs: no transformer layer could be captured ({self.settings.describe()}); megatron-core "
                "found none it can graph. Remove cuda_graphs (or set modules: null) to train without them."
            )
        if overlap_param_gather:
            for wrapped in ddp_modules:
                wrapped.enable_forward_pre_hook()
            helper.cuda_graph_set_manual_hooks()
        self._helper = helper
        log.info("%s: captured at training step %d of this fit.", self.settings.describe(), self.steps_seen)

    def close(self) -> None:
        """Delete the graphs (their memory pool) and Megatron's micro-batch calculator if this capture made it."""
        if self._helper is not None and self._helper.graphs_created():
            self._helper.delete_cuda_graphs()
        self._helper = None
        if self._calculator:
            from megatron.core import num_microbatches_calculator as calculator

            calculator.destroy_num_microbatches_calculator()
            self._calculator = False
        self.steps_seen = 0
