"""Optimizer-state precision of ``MegatronCPStrategy``: Megatron-Core's precision-aware distributed optimizer.

Megatron's default mixed-precision Adam keeps, per parameter, an fp32 main weight and two fp32 Adam moments (12
bytes, sharded by the distributed optimizer) and copies the bf16 gradient shard to fp32 before each step (4 bytes
more at the step). Its precision-aware optimizer (``OptimizerConfig.use_precision_aware_optimizer``) hands the update
to Transformer Engine's ``FusedAdam``, which:

- reads the gradients straight from DDP's gradient buffer (no fp32 copy);
- keeps the fp32 main weights itself; with bf16 weights only their 16 low bits (``store_param_remainders``): the
  bf16 weight is the high half, so the fp32 main weight is exact and the update is that of fp32 main weights;
- stores the Adam moments in the dtypes asked for (bf16 halves them; the update itself is computed in fp32).

:class:`OptimizerPrecisionSettings` names these the way a strategy argument is set, checks the combinations before
anything is built and turns them into Megatron's ``OptimizerConfig`` fields. ``"auto"``, the strategy's default,
is resolved by :func:`resolve_optimizer_precision`: fp32 moments and main weights kept as remainders where the
precision-aware optimizer can run (Megatron's default update but for the bf16 rounding of clipped gradients, without
its fp32 gradient copy and its copy of the main weights back into the model), Megatron's default optimizer
elsewhere, and a resumed checkpoint's own optimizer state when resuming (:func:`resumed_settings`). From YAML::

    trainer:
      strategy:
        class_path: lightning_llama_fp8.MegatronCPStrategy
        init_args:
          optimizer_precision: {exp_avg_dtype: bf16, exp_avg_sq_dtype: bf16}
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

MomentDtype = Literal["fp32", "bf16"]
#: Moment dtype names -> torch dtype names (torch is imported only where Megatron's config is built: `llama-fp8 plan`
#: stays light).
MOMENT_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16"}
MOMENT_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2}


@dataclass
class OptimizerPrecisionSettings:
    """Megatron-Core's precision-aware distributed optimizer (Transformer Engine's ``FusedAdam``), on bf16 weights.

    Bytes per parameter of this rank's optimizer shard: main weights 2 (remainders) or 4, plus 2 (bf16) or 4 (fp32)
    per moment; no fp32 gradient copy at the step. Needs the distributed optimizer, Transformer Engine and bf16
    weights (FP8 compute is fine; FP8 weights, ``fp8_param_gather``, are refused: Transformer Engine's FP8 Adam kernel
    takes fp32 moments and fp32 main weights only, and that path was never shown to train or resume here).

    Args:
        exp_avg_dtype: dtype of Adam's first moment, ``bf16`` (default) or ``fp32``.
        exp_avg_sq_dtype: dtype of Adam's second moment, the same as ``exp_avg_dtype`` (Transformer Engine steps
            mixed dtypes through an fp32 copy of the bf16 moment of every parameter: memory the setting is meant to
            save).
        store_param_remainders: keep only the 16 low bits of each fp32 main weight (its high half is the bf16
            weight): exact, 2 bytes per parameter instead of 4 (default). ``False``: whole fp32 main weights; needed
            with ``checkpoint_optimizer_sharding="fully_reshardable"``, whose checkpoints Megatron writes and reads as
            fp32 main weights.
    """

    exp_avg_dtype: MomentDtype = "bf16"
    exp_avg_sq_dtype: MomentDtype = "bf16"
    store_param_remainders: bool = True

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be one of {', '.join(MOMENT_DTYPES)}, got {value!r}"
            for name, value in (("exp_avg_dtype", self.exp_avg_dtype), ("exp_avg_sq_dtype", self.exp_avg_sq_dtype))
            if value not in MOMENT_DTYPES
        ]
        if not problems and self.exp_avg_dtype != self.exp_avg_sq_dtype:
            problems.append(
                f"exp_avg_dtype ({self.exp_avg_dtype}) and exp_avg_sq_dtype ({self.exp_avg_sq_dtype}) must be the "
                "same: Transformer Engine steps mixed dtypes through an fp32 copy of every bf16 moment (4 more bytes "
                "per parameter at each step)"
            )
        if not isinstance(self.store_param_remainders, bool):
            problems.append(f"store_param_remainders must be true or false, got {self.store_param_remainders!r}")
        if problems:
            raise ValueError("optimizer_precision: " + "; ".join(problems) + ".")

    def check(
        self,
        use_distributed_optimizer: bool,
        fp8_param_gather: bool,
        optimizer_offloaded: bool,
        checkpoint_optimizer_sharding: str = "dp_reshardable",
    ) -> None:
        """Raise ``ValueError`` for the combinations Megatron or Transformer Engine cannot run (or that were never
        shown to train: those are refused rather than run unchecked)."""
        problems = []
        if not use_distributed_optimizer:
            problems.append(
                "needs use_distributed_optimizer=True (Megatron's precision-aware optimizer is its distributed one)"
            )
        if optimizer_offloaded:
            problems.append(
                "cannot be combined with optimizer_offload (the offloaded optimizer keeps fp32 state on the CPU with "
                "its own Adam); choose one"
            )
        if fp8_param_gather:
            problems.append(
                "needs bf16 weights (FP8 compute is fine): with FP8 weights (fp8_param_gather) Transformer Engine's "
                "FP8 Adam kernel takes fp32 moments and fp32 main weights only (bf16 moments or remainders fail at the "
                "first step), and resuming that path was never shown here. Set fp8_param_gather: false"
            )
        if self.store_param_remainders and checkpoint_optimizer_sharding == "fully_reshardable":
            problems.append(
                "store_param_remainders cannot go with checkpoint_optimizer_sharding='fully_reshardable': Megatron "
                "writes the 16-bit remainders into that format's fp32 main weights, and cannot load them back. Set "
                "store_param_remainders: false (4 bytes per parameter instead of 2) or keep 'dp_reshardable'"
            )
        if problems:
            raise ValueError("optimizer_precision: " + "; ".join(problems) + ".")

    def check_transformer_engine(self) -> None:
        """Raise ``ValueError`` where Transformer Engine is not installed (Megatron would fail building the optimizer,
        after the model)."""
        if not transformer_engine_installed():
            raise ValueError(
                "optimizer_precision: Megatron's precision-aware optimizer is Transformer Engine's FusedAdam, and "
                "Transformer Engine is not installed here (pip install 'lightning-llama-fp8[te]'); or drop "
                "optimizer_precision."
            )

    def optimizer_config_kwargs(self) -> dict[str, Any]:
        """The precision fields of Megatron's ``OptimizerConfig``."""
        import torch

        return {
            "use_precision_aware_optimizer": True,
            "exp_avg_dtype": getattr(torch, MOMENT_DTYPES[self.exp_avg_dtype]),
            "exp_avg_sq_dtype": getattr(torch, MOMENT_DTYPES[self.exp_avg_sq_dtype]),
            "main_params_dtype": torch.float32,
            "store_param_remainders": self.store_param_remainders,
        }

    def bytes_per_parameter(self) -> int:
        """GPU bytes per parameter of the optimizer shard: main weights (or their remainders) and both moments."""
        main = 2 if self.store_param_remainders else 4
        return main + MOMENT_BYTES[self.exp_avg_dtype] + MOMENT_BYTES[self.exp_avg_sq_dtype]

    def describe(self) -> str:
        """One line, e.g. ``precision-aware Adam: bf16 moments, fp32 main weights as 16-bit remainders``."""
        main = "fp32 main weights as 16-bit remainders" if self.store_param_remainders else "fp32 main weights"
        return f"precision-aware Adam: {self.exp_avg_dtype} moments, {main}, no fp32 gradient copy"

    def checkpoint_record(self) -> dict[str, Any]:
        """What a checkpoint records of these settings (its optimizer state has these dtypes)."""
        return {
            "exp_avg_dtype": self.exp_avg_dtype,
            "exp_avg_sq_dtype": self.exp_avg_sq_dtype,
            "store_param_remainders": self.store_param_remainders,
            "precision_aware": True,
        }


#: The record of Megatron's default optimizer (no ``optimizer_precision``), and of checkpoints written before it.
DEFAULT_OPTIMIZER_PRECISION_RECORD: dict[str, Any] = {
    "exp_avg_dtype": "fp32",
    "exp_avg_sq_dtype": "fp32",
    "store_param_remainders": False,
    "precision_aware": False,
}


def state_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """A checkpoint's ``optimizer_state`` record as (precision_aware, exp_avg, exp_avg_sq, remainders), with the
    default optimizer's values for what an older record lacks: equal keys mean the same optimizer-state dtypes."""
    keys = ("precision_aware", "exp_avg_dtype", "exp_avg_sq_dtype", "store_param_remainders")
    return tuple(record.get(key, DEFAULT_OPTIMIZER_PRECISION_RECORD[key]) for key in keys)


def state_description(record: dict[str, Any]) -> str:
    """A checkpoint's ``optimizer_state`` record in words."""
    aware, exp_avg, exp_avg_sq, remainders = state_key(record)
    if not aware:
        return "Megatron's default (fp32 main weights and moments)"
    main = "main-weight remainders" if remainders else "fp32 main weights"
    return f"precision-aware Adam (exp_avg {exp_avg}, exp_avg_sq {exp_avg_sq}, {main})"


def state_record(settings: OptimizerPrecisionSettings | None) -> dict[str, Any]:
    """What a checkpoint records of the optimizer state kept under ``settings`` (``None``: Megatron's default)."""
    return settings.checkpoint_record() if settings is not None else dict(DEFAULT_OPTIMIZER_PRECISION_RECORD)


#: ``MegatronCPStrategy(optimizer_precision=AUTO)``, the default: see :func:`resolve_optimizer_precision`.
AUTO = "auto"
#: What ``MegatronCPStrategy(optimizer_precision=...)`` takes: settings, ``"auto"`` or ``None`` (Megatron's default).
OptimizerPrecision = OptimizerPrecisionSettings | Literal["auto"] | None


def check_setting(setting: Any) -> None:
    """Raise ``ValueError`` unless ``setting`` is ``OptimizerPrecisionSettings``, ``"auto"`` or ``None``."""
    if setting is not None and setting != AUTO and not isinstance(setting, OptimizerPrecisionSettings):
        raise ValueError(
            "optimizer_precision must be 'auto', null or OptimizerPrecisionSettings fields "
            "(OptimizerPrecisionSettings(...) in Python, a mapping of its fields in a YAML config; None for "
            f"Megatron's default), got {setting!r}."
        )


def resolve_optimizer_precision(
    setting: OptimizerPrecision,
    *,
    use_distributed_optimizer: bool,
    fp8_param_gather: bool,
    optimizer_offloaded: bool,
    checkpoint_optimizer_sharding: str,
    transformer_engine_layers: bool,
) -> OptimizerPrecisionSettings | None:
    """The optimizer-state precision a new run keeps for ``setting`` (``None``: Megatron's default optimizer; a
    resumed run keeps its checkpoint's instead, :func:`resumed_settings`).

    Settings and ``None`` stand as given. ``"auto"``:

    - fp32 moments and fp32 main weights (as remainders of the bf16 weights where checkpoints are
      ``dp_reshardable``, which can hold them) where Megatron's precision-aware optimizer runs: the distributed
      optimizer, no optimizer offload, bf16 weights (not ``fp8_param_gather``) and Transformer Engine's layers
      (``transformer_engine_layers``: the TE layer spec, with Transformer Engine installed). The update is that of
      Megatron's default optimizer (fp32 moments, exact fp32 main weights) but for one rounding: gradient clipping
      scales the bf16 gradients in DDP's buffer, where Megatron's default scales an fp32 copy. Transformer Engine's
      FusedAdam steps straight from that buffer: no fp32 gradient copy and no copy of the main weights back into
      the model. Its checkpoints, like every ``dp_reshardable`` one, reload with their TP, CP and pipeline split,
      and (holding remainders) cannot be re-saved as ``fully_reshardable``: a run that may change layout later sets
      ``fully_reshardable`` from the start, and gets whole fp32 main weights;
    - else Megatron's default optimizer.
    """
    if setting != AUTO:
        return setting  # type: ignore[return-value]
    if not (use_distributed_optimizer and transformer_engine_layers) or fp8_param_gather or optimizer_offloaded:
        return None
    return OptimizerPrecisionSettings(
        exp_avg_dtype="fp32",
        exp_avg_sq_dtype="fp32",
        store_param_remainders=checkpoint_optimizer_sharding == "dp_reshardable",
    )


def resumed_settings(
    checkpoint: str,
    record: dict[str, Any],
    *,
    use_distributed_optimizer: bool,
    fp8_param_gather: bool,
    optimizer_offloaded: bool,
    checkpoint_optimizer_sharding: str,
    needs_transformer_engine_here: bool = True,
) -> OptimizerPrecisionSettings | None:
    """What ``"auto"`` keeps when resuming ``checkpoint``: the optimizer state its ``record`` names. Raises
    ``ValueError`` naming the checkpoint and the fix where this run cannot keep it (``fit``'s config check and the
    strategy both ask here, before anything is built; a plan made on a machine without Transformer Engine passes
    ``needs_transformer_engine_here=False``)."""
    description = state_description(record)

    def cannot_keep(err: ValueError) -> ValueError:
        return ValueError(
            f"Checkpoint {checkpoint} keeps its optimizer state as {description}, which optimizer_precision 'auto' "
            f"resumes as it is, and this run cannot: {err} Resume with the settings the checkpoint was written with, "
            "or start a new run from its weights (llama-fp8 convert, then model.init_weights)."
        )

    try:
        settings = settings_from_record(record)
    except ValueError as err:  # a record with dtypes this package does not know
        raise cannot_keep(err) from err
    if settings is None:
        return None
    if settings.store_param_remainders and checkpoint_optimizer_sharding == "fully_reshardable":
        raise ValueError(
            f"Checkpoint {checkpoint} keeps its optimizer state as {description}: the 16-bit remainders of the fp32 "
            "main weights, which reload only with checkpoint_optimizer_sharding='dp_reshardable' and the "
            "checkpoint's TP, CP and pipeline split (any DP size). Resume with 'dp_reshardable'; to change the "
            "layout, start a new run from its weights (llama-fp8 convert, then model.init_weights). Runs that may "
            "change layout later: set checkpoint_optimizer_sharding='fully_reshardable' from the start ('auto' then "
            "keeps whole fp32 main weights)."
        )
    try:
        settings.check(use_distributed_optimizer, fp8_param_gather, optimizer_offloaded, checkpoint_optimizer_sharding)
        if needs_transformer_engine_here:
            settings.check_transformer_engine()
    except ValueError as err:
        raise cannot_keep(err) from err
    return settings


def transformer_engine_installed() -> bool:
    """Whether Transformer Engine can be imported here (looked up, not imported)."""
    return importlib.util.find_spec("transformer_engine") is not None


def settings_from_record(record: dict[str, Any]) -> OptimizerPrecisionSettings | None:
    """The settings that keep optimizer state as a checkpoint records it (``state_record``'s inverse; a record
    without ``precision_aware``, from checkpoints written before it, is Megatron's default)."""
    aware, exp_avg, exp_avg_sq, remainders = state_key(record)
    if not aware:
        return None
    return OptimizerPrecisionSettings(exp_avg, exp_avg_sq, store_param_remainders=bool(remainders))
