"""The fine-tuning runs of the evidence (issue 29) as ``llama-fp8 fit`` YAML configs, and where each run's files go.

A small Llama (4 layers, hidden 512, the Llama 3 tokenizer's 128,256 ids: ~144M parameters, most of them the
embedding and output layer) is trained from scratch on the chat corpus with ``SFTDataModule`` (packed conversations,
document masking, loss on the answers), FP8 delayed scaling on one GPU, and saved once at the end for
``llama-fp8 convert``. The same recipe with the loss on every token of each conversation differs in the corpus only: a
copy whose loss mask is all ones (see ``benchmarks.sft all-tokens-corpus``).

Files: the evidence (configs, logs, CSV metrics, held-out set, records) under OUT, the bulk (training JSONL, corpora,
checkpoints, exported models) under a work directory outside the results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The two fine-tuning runs: the loss on the answers only, and on every token.
RUNS = ("answer_only", "all_tokens")


@dataclass(frozen=True)
class SmallChatModel:
    """The architecture fine-tuned on the task (``model.arch``)."""

    num_layers: int = 4
    hidden_size: int = 512
    ffn_hidden_size: int = 1536
    num_attention_heads: int = 8
    num_query_groups: int = 4
    kv_channels: int = 64
    vocab_size: int = 128256  # the Llama 3 tokenizer: its digits and words round-trip exactly
    seq_length: int = 1024

    def arch(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SFTRecipe:
    """How the small model is fine-tuned (the same for both runs)."""

    # ~20 conversations per packed sample of 1024 tokens: ~640 conversations per step, ~6 epochs of 100,000 in 1000
    # steps (many small updates learn such a task sooner than fewer large ones).
    steps: int = 1000
    global_batch_size: int = 32
    micro_batch_size: int = 16
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_steps: int = 50
    precision: str = "fp8"  # fp8 (delayed scaling) or bf16
    split: str = "98,2,0"  # conversations for training, validation (answer-token loss), test
    val_check_interval: int = 250
    seed: int = 29
    model: SmallChatModel = field(default_factory=SmallChatModel)


@dataclass(frozen=True)
class SFTPaths:
    """Where the stage's files are: ``out`` (kept as evidence) and ``work`` (bulk, left on the machine)."""

    out: Path
    work: Path

    @property
    def train_jsonl(self) -> Path:
        return self.work / "train.jsonl"

    @property
    def heldout_jsonl(self) -> Path:
        return self.out / "heldout.jsonl"

    @property
    def task_json(self) -> Path:
        return self.out / "task.json"

    @property
    def corpus(self) -> Path:
        """The chat corpus prefix ``llama-fp8 preprocess --chat`` writes."""
        return self.work / "chat"

    @property
    def all_tokens_corpus(self) -> Path:
        return self.work / "chat_all_tokens"

    def config(self, run: str) -> Path:
        return self.out / f"{run}.yaml"

    def checkpoint(self, run: str) -> Path:
        """The checkpoint saved at the last step (ModelCheckpoint ``filename: final``)."""
        return self.work / f"ckpt_{run}" / "final.ckpt"

    def exported(self, run: str) -> Path:
        return self.work / f"hf_{run}"

    def metrics_csv(self, run: str) -> Path:
        return self.out / f"{run}_csv" / "run" / "version_0" / "metrics.csv"

    def fit_log(self, run: str) -> Path:
        return self.out / f"fit_{run}.log"


def fit_config(run: str, recipe: SFTRecipe, paths: SFTPaths) -> dict[str, Any]:
    """The ``llama-fp8 fit`` config of ``run`` (one of :data:`RUNS`)."""
    if run not in RUNS:
        raise ValueError(f"unknown run {run!r}; the runs are {', '.join(RUNS)}")
    plugin: dict[str, Any] = (
        {"class_path": "lightning_llama_fp8.TEFP8Precision", "init_args": {"recipe": "delayed"}}
        if recipe.precision == "fp8"
        else {"class_path": "lightning_llama_fp8.MegatronPrecision"}
    )
    corpus = paths.corpus if run == "answer_only" else paths.all_tokens_corpus
    return {
        "seed_everything": recipe.seed,
        "trainer": {
            "accelerator": "gpu",
            "devices": 1,
            "max_steps": recipe.steps,
            "log_every_n_steps": 10,
            "val_check_interval": min(recipe.val_check_interval, recipe.steps),  # at least once, for short runs too
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "enable_checkpointing": True,
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(paths.out / f"{run}_csv"), "name": "run"},
            },
            "strategy": {"class_path": "lightning_llama_fp8.MegatronCPStrategy"},
            "plugins": [plugin],
            "callbacks": [
                {"class_path": "lightning_llama_fp8.callbacks.ManualGC"},
                {"class_path": "lightning_llama_fp8.callbacks.ThroughputMonitor", "init_args": {"window": 10}},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(paths.checkpoint(run).parent),
                        "filename": paths.checkpoint(run).stem,
                        "every_n_train_steps": recipe.steps,  # once, at the last step: what is exported
                        "save_top_k": 1,
                    },
                },
            ],
        },
        "model": {
            "arch": recipe.model.arch(),
            "optimizer": {"lr": recipe.lr, "min_lr": recipe.min_lr, "warmup_steps": recipe.warmup_steps},
        },
        "data": {
            "class_path": "lightning_llama_fp8.SFTDataModule",
            "init_args": {
                "data_path": [str(corpus)],
                "tokenizer": "llama3",
                "split": recipe.split,
                "seq_length": recipe.model.seq_length,
                "vocab_size": recipe.model.vocab_size,
                "global_batch_size": recipe.global_batch_size,
                "micro_batch_size": recipe.micro_batch_size,
                "seed": recipe.seed,
                "num_workers": 2,
            },
        },
    }


def write_fit_configs(recipe: SFTRecipe, paths: SFTPaths) -> list[Path]:
    """Both runs' configs, as YAML files under ``paths.out``."""
    import yaml

    written = []
    for run in RUNS:
        path = paths.config(run)
        header = f"# issue 29 evidence, {run}: llama-fp8 fit --config {path.name} (written by benchmarks.sft prepare)\n"
        path.write_text(header + yaml.safe_dump(fit_config(run, recipe, paths), sort_keys=False))
        written.append(path)
    return written
