"""The GPU stages: each one named piece of GPU evidence, sized to fit one call of the device machine.

Run one from the repository root on the GPU machine (after ``source .gpu/setup.sh``) with
``python -m benchmarks.stage NAME OUT_DIR``; ``--list`` prints them all, ``--dry-run`` a stage's commands. Each
record holds what the stage is for, the GPUs it needs, its time limit, its steps (``Command`` lines, or functions
of ``benchmarks.lib.stage_functions`` where a stage loops over runs or summarises them), its environment knobs and
the files it leaves under OUT_DIR besides ``device.txt`` and ``commit.txt``, which every stage writes.
"""

from __future__ import annotations

from benchmarks.lib import stage_functions as functions
from benchmarks.lib.stage_run import Command, Stage

#: Most stages: the most a stage may take within the device's 600 s per call, which counts start-up too.
CALL_LIMIT_S = 590


#: The knobs every stage built on ``functions.lever`` reads (A/B runs of benchmarks.throughput).
LEVER_KNOBS = {
    "LEVER_ENV": "",
    "LEVER_PRECISION": "fp8",
    "LEVER_LAYERS": "4",
    "LEVER_BASE_ARGS": "",
    "LEVER_STEPS": "20",
    "LEVER_WARMUP": "8",
}


def _compare(out_dir: str, flags: str, *, after_success: bool = False) -> Command:
    """Ours against Megatron-LM (``benchmarks.compare_megatron_lm``) into ``{out}/<out_dir>``."""
    line = f"python3 -m benchmarks.compare_megatron_lm --out-dir {{out}}/{out_dir} {flags}"
    return Command(line, after_success=after_success)


def _gpu_tests(paths: str, log: str, **env: str) -> Command:
    """GPU tests (marker ``gpu``) with their output in ``{out}/<log>`` and on the console."""
    return Command(f"python3 -m pytest -m gpu -q {paths} -p no:cacheprovider", log=f"{{out}}/{log}", tee=True, env=env)


def _reference_run(side: str, cp: int) -> Stage:
    """One side of the 8-GPU reference run (issue 5), ``side`` ``ours`` or ``lm``, with CP ``cp``."""
    name = f"{side}-cp{cp}"
    layout = "CP2 DP4" if cp == 2 else "CP1 DP8: Megatron-LM's shipped layout"
    if side == "ours":
        purpose = f"issue 5: the shipped 8B YAML ({layout}, GBS 128), 30 steps, via the CLI"
        outputs = (f"ref8_{name}/run.json", f"ref8_{name}/ours.log", f"ref8_{name}/ours/version_0/metrics.csv")
    else:
        purpose = f"issue 5: Megatron-LM with the recipe's flags, same layout ({layout}, GBS 128), 30 steps"
        outputs = (f"ref8_{name}/run.json", f"ref8_{name}/megatron_lm.log")
    run_side = "megatron-lm" if side == "lm" else "ours"
    return Stage(
        name=f"ref8-{name}",
        gpus=8,
        purpose=purpose,
        limit_s=CALL_LIMIT_S,
        steps=(
            Command(
                f"python3 -m benchmarks.reference_run {run_side} --out-dir {{out}}/ref8_{name} --gpus 8 --cp {cp} "
                "--steps 30"
            ),
        ),
        outputs=outputs,
        notes=f"~7 min estimated; run ref8-ours-cp{cp} and ref8-lm-cp{cp} on the same machine, then anywhere: "
        f"python3 -m benchmarks.reference_run compare OUT/ref8_ours-cp{cp} OUT/ref8_lm-cp{cp}",
    )


STAGES: tuple[Stage, ...] = (
    Stage(
        name="equivalence-2",
        gpus=2,
        purpose="issue 3: 1-GPU references + TP2, CP2 p2p/a2a/all_gather, DP2 in BF16 and FP8",
        limit_s=CALL_LIMIT_S,
        steps=(Command("python3 -m benchmarks.parallel_equivalence --out-dir {out}/equivalence --gpus 2 --fp8"),),
        outputs=("equivalence/equivalence.json",),
        notes="~9 min measured on H200",
    ),
    Stage(
        name="equivalence-4",
        gpus=4,
        purpose="issue 3: the 1-GPU references + DP2, TP2 x CP2, CP2 x DP2 only",
        limit_s=CALL_LIMIT_S,
        steps=(
            Command(
                "python3 -m benchmarks.parallel_equivalence --out-dir {out}/equivalence --gpus 4 --fp8 "
                "--only dp2 tp2xcp2 cp2xdp2"
            ),
        ),
        outputs=("equivalence/equivalence.json",),
        notes="~8.6 min measured on H200",
    ),
    Stage(
        name="pipeline-2",
        gpus=2,
        purpose="issues 14/16: PP2 and PP2 x VPP2 against one GPU from the same HF weights, BF16 and FP8",
        limit_s=CALL_LIMIT_S,
        steps=(
            Command(
                "python3 -m benchmarks.parallel_equivalence --out-dir {out}/pipeline --gpus 2 --fp8 --only pp2 pp2-vpp2"
            ),
        ),
        outputs=("pipeline/equivalence.json",),
        notes="~7 min estimated",
    ),
    Stage(
        name="pipeline-4",
        gpus=4,
        purpose="issues 14/16: TP2 x PP2 and PP2 x DP2 against one GPU from the same HF weights, BF16 and FP8",
        limit_s=CALL_LIMIT_S,
        steps=(
            Command(
                "python3 -m benchmarks.parallel_equivalence --out-dir {out}/pipeline --gpus 4 --fp8 "
                "--only tp2xpp2 pp2xdp2"
            ),
        ),
        outputs=("pipeline/equivalence.json",),
        notes="~7 min estimated",
    ),
    Stage(
        name="speed-2",
        gpus=2,
        purpose="issue 3: ours vs Megatron-LM, FP8, CP2 and TP2+SP, 4 layers",
        limit_s=CALL_LIMIT_S,
        steps=(
            _compare("speed_cp2", "--precisions fp8 --cp 2 --nproc 2"),
            _compare("speed_tp2", "--precisions fp8 --tp 2 --nproc 2", after_success=True),
        ),
        outputs=("speed_cp2/compare.json", "speed_tp2/compare.json"),
        notes="~5 min measured on H200",
    ),
    Stage(
        name="speed-tp2-32",
        gpus=2,
        purpose="issue 3: ours vs Megatron-LM, FP8, TP2+SP, all 32 layers",
        limit_s=CALL_LIMIT_S,
        steps=(_compare("speed_tp2_32l", "--precisions fp8 --tp 2 --nproc 2 --layers 32 --steps 20 --warmup 8"),),
        outputs=("speed_tp2_32l/compare.json",),
        notes="~84 GB per card: H200; ~4.6 min measured",
    ),
    Stage(
        name="speed-8b-4",
        gpus=4,
        purpose="issue 5 fallback: full Llama 3 8B, TP1 CP2 DP2, ours vs Megatron-LM",
        limit_s=CALL_LIMIT_S,
        steps=(
            _compare(
                "speed_8b_tp1cp2dp2", "--precisions fp8 --cp 2 --nproc 4 --layers 32 --gbs 16 --steps 20 --warmup 8"
            ),
        ),
        outputs=("speed_8b_tp1cp2dp2/compare.json",),
        notes="~8 min estimated",
    ),
    Stage(
        name="speed-8b-2",
        gpus=2,
        purpose="issue 5 fallback: full Llama 3 8B, TP1 CP2 DP1",
        limit_s=CALL_LIMIT_S,
        steps=(
            _compare(
                "speed_8b_tp1cp2dp1", "--precisions fp8 --cp 2 --nproc 2 --layers 32 --gbs 16 --steps 16 --warmup 6"
            ),
        ),
        outputs=("speed_8b_tp1cp2dp1/compare.json",),
        notes="96 GiB per GPU measured: H200 only; ~5.6 min measured",
    ),
    _reference_run("ours", 2),
    _reference_run("lm", 2),
    _reference_run("ours", 1),
    _reference_run("lm", 1),
    Stage(
        name="nan-safety",
        gpus=1,
        purpose="issue 4: tests/gpu/test_nan_safety.py (injections, policies, recipes)",
        limit_s=420,
        steps=(_gpu_tests("tests/gpu/test_nan_safety.py", "nan_safety.log"),),
        outputs=("nan_safety.log",),
        notes="the tests' JSON records land in OUT too (GPU_RESULTS_DIR); ~3.5 min measured",
    ),
    Stage(
        name="gpu-tests",
        gpus=1,
        purpose="tests/gpu except the checkpoint tests (stage checkpoints): together they would not fit one call",
        limit_s=CALL_LIMIT_S,
        steps=(functions.gpu_tests,),
        outputs=("gpu_tests.log",),
        notes="each file in its own pytest process (gpu_tests_<file>.log; gpu_tests.log lists their exit statuses); "
        "the tests' JSON records land in OUT too (GPU_RESULTS_DIR); ~6 min",
    ),
    Stage(
        name="checkpoints",
        gpus=2,
        purpose="distributed checkpoints: resume on 1 GPU; CP2 -> TP2, DP2 -> DP2/DP1 on 2 GPUs",
        limit_s=CALL_LIMIT_S,
        steps=(
            _gpu_tests("tests/gpu/test_checkpoint_resume.py tests/gpu/test_checkpoint_layouts.py", "checkpoints.log"),
        ),
        outputs=("checkpoints.log",),
        notes="~7.5 min",
    ),
    Stage(
        name="speed-1",
        gpus=1,
        purpose="issue 15: ours vs Megatron-LM, FP8 and BF16, SPEED_LAYERS layers of Llama 3 8B, GBS 8",
        limit_s=CALL_LIMIT_S,
        steps=(
            _compare(
                "speed_{SPEED_LAYERS}l",
                "--precisions fp8 bf16 --layers {SPEED_LAYERS} --gbs 8 --steps {SPEED_STEPS} --warmup {SPEED_WARMUP}",
            ),
            functions.speed_summary,
        ),
        outputs=("speed_{SPEED_LAYERS}l/compare.json", "speed_summary.json"),
        knobs={
            "SPEED_LAYERS": "4",
            "SPEED_STEPS": "20",
            "SPEED_WARMUP": "8",
            "SPEED_SETTINGS": "the defaults of this commit",
        },
        notes="speed_summary.json rows: layers, precision, s/step of both sides, SPEED_SETTINGS; 3.9 min measured "
        "at 4 layers, 5.6 min at 16 layers with SPEED_STEPS=12 SPEED_WARMUP=5",
    ),
    Stage(
        name="weight-refresh",
        gpus=1,
        purpose="issue 15: FP8 weights refreshed without TE's discarded transposes: bitwise, per cast, lever-1 vs TE's",
        limit_s=CALL_LIMIT_S,
        steps=(
            # Same bytes as Megatron's path, kernels and time per cast (tests/gpu/test_fp8_weight_refresh.py), then
            # the training step with and without it (lever-1, B = TE's own refresh).
            Command(
                "python3 -m pytest -m gpu -q tests/gpu/test_fp8_weight_refresh.py -p no:cacheprovider",
                log="{out}/weight_refresh.log",
                tail=3,
            ),
            functions.lever_weight_refresh,
        ),
        outputs=("weight_refresh.log", "fp8_weight_refresh_*.json", "lever/summary.json"),
        knobs=LEVER_KNOBS,
        notes="the test's JSON records land in OUT (GPU_RESULTS_DIR); LEVER_* as in lever-1; 4.9 min measured",
    ),
    Stage(
        name="lever-1",
        gpus=1,
        purpose="issue 15: one speed lever against today's defaults, alternating A B A B (FP8, 4 layers, GBS 8)",
        limit_s=540,
        steps=(functions.lever,),
        outputs=("lever/summary.json", "lever/[abc][12].json"),
        knobs={"LEVER_ARGS": "", "LEVER_C_ARGS": "", **LEVER_KNOBS},
        notes="LEVER_ARGS: benchmarks.throughput flags of B; LEVER_ENV: environment of B (VAR=value ...); one of "
        "them needed (LEVER_ARGS='--grad-accum-fusion off' measures the first lever, now the default, again); "
        "LEVER_BASE_ARGS: flags of both; LEVER_C_ARGS: flags of a third setting C (A B C A B C; 16 layers BF16 with "
        "LEVER_STEPS=12 LEVER_WARMUP=5: ~7.5 min estimated); "
        "issue 28's optimizer lever on BF16 at 16 layers: LEVER_PRECISION=bf16 "
        "LEVER_LAYERS=16 LEVER_ARGS='--optimizer-precision fp32' (~6 min; LEVER_STEPS=14 LEVER_WARMUP=6 for ~5 min); "
        "~4 min estimated at 4 layers",
    ),
    Stage(
        name="fp8-casts",
        gpus=1,
        purpose="issue 15: which FP8 cast-transpose kernel TE runs (NVRTC-tuned or general), CUDA headers, GB/s",
        limit_s=300,
        steps=(functions.fp8_casts,),
        outputs=(
            "fp8_casts/default.json",
            "fp8_casts/nvrtc_off.json",
            "fp8_casts/include_*.json",
            "fp8_casts/te_env.txt",
            "fp8_casts/cuda_runtime_h.txt",
            "fp8_casts/libnvrtc.txt",
        ),
        notes="then e.g. LEVER_ENV='NVTE_CUDA_INCLUDE_DIR=<dir>' python -m benchmarks.stage lever-1 OUT (A/B, same "
        "call); ~1 min estimated",
    ),
    Stage(
        name="profile-fp8",
        gpus=1,
        purpose="where the step's time goes: FP8 and BF16, PROFILE_LAYERS layers, 3 steps profiled after 10",
        limit_s=420,
        steps=(functions.profile_fp8,),
        outputs=("profile/fp8.json", "profile/bf16.json"),
        knobs={"PROFILE_PRECISIONS": "fp8 bf16", "PROFILE_STACKS": "", "PROFILE_LAYERS": "4"},
        notes="torch.profiler: kernel time by kind, GPU idle; PROFILE_STACKS=1 adds profile/fp8_stacks.json (one FP8 "
        "step with Python stacks: which code launched each FP8 cast); ~3 min estimated at 4 layers; issue 28's BF16 "
        "question: PROFILE_PRECISIONS=bf16 PROFILE_LAYERS=16 (an H200: ~90 GiB)",
    ),
    Stage(
        name="recipes-1",
        gpus=1,
        purpose="issue 4: tokens/s of BF16 and each FP8 recipe (+ NaNGuard) on Llama-3-8B layers x4",
        limit_s=CALL_LIMIT_S,
        steps=(functions.recipes,),
        outputs=tuple(
            f"recipes/{name}.json"
            for name in ("bf16", "fp8_delayed", "fp8_delayed_guard_skip", "fp8_current", "fp8_blockwise")
        ),
        notes="~5 min estimated",
    ),
    Stage(
        name="recompute",
        gpus=1,
        purpose="issue 14: no / selective / full recompute, ours vs Megatron-LM, FP8, 4 layers, GBS 8",
        limit_s=CALL_LIMIT_S,
        steps=(
            # Same shapes and flags as the speed comparisons; fewer steps so three settings x two sides fit one call.
            _compare(
                "recompute",
                "--precisions fp8 --recompute {*RECOMPUTE_ROWS} --layers {RECOMPUTE_LAYERS} --gbs 8 --steps 14 "
                "--warmup 6",
            ),
            Command("cp {out}/recompute/recompute.json {out}/recompute.json", after_success=True),
        ),
        outputs=("recompute.json", "recompute/"),
        knobs={"RECOMPUTE_ROWS": "none selective full", "RECOMPUTE_LAYERS": "4"},
        notes="s/step, peak memory, plan; RECOMPUTE_ROWS may add selective-mlp; ~6.5 min measured",
    ),
    Stage(
        name="full-8b-1gpu",
        gpus=1,
        purpose="issue 14: all 32 layers on one GPU, full recompute + half the optimizer on the CPU; then no offload",
        limit_s=CALL_LIMIT_S,
        steps=(functions.full_8b_one_gpu,),
        outputs=("full_8b_one_gpu.json", "full_8b/"),
        notes="H200 only, ~70 GiB of host RAM; 6 steps, then 4 without offload (expected not to fit); 3.6 min measured",
    ),
    Stage(
        name="one-gpu-8b",
        gpus=1,
        purpose="issue 28: the full 8B on one GPU: precision-aware optimizer (bf16 moments) vs today's offload config",
        limit_s=CALL_LIMIT_S,
        steps=(functions.one_gpu_8b,),
        outputs=("one_gpu_8b.json", "one_gpu_8b/"),
        knobs={
            "ONE_GPU_8B_ROWS": "bf16_moments bf16_moments_block4 offload_0.5",
            "ONE_GPU_8B_STEPS": "24",
            "ONE_GPU_8B_ROW_S": "bf16_moments=200 bf16_moments_current=200 bf16_moments_block4=220 offload_0.5=300",
        },
        notes="H200 (needs_h200: about 125 GiB); rows from benchmarks.lib.stage_functions.ONE_GPU_8B_ROWS, each run "
        "while the stage has its estimated time left",
    ),
    Stage(
        name="moments-check",
        gpus=1,
        purpose="issue 28: bf16 Adam moments vs Megatron's default optimizer, 1B text example on real text",
        limit_s=CALL_LIMIT_S,
        steps=(functions.moments_check,),
        outputs=("moments/",),
        knobs={
            "MOMENTS_STEPS": "300",
            "MOMENTS_RUN_NAMES": "default bf16_moments default_seed2",
            "MOMENTS_CONCURRENT": "0",
        },
        notes="the real-text corpus, then examples/configs/llama3_1b_text.yaml for each run of MOMENTS_RUN_NAMES "
        "(default: seed 1234; bf16_moments: seed 1234 with optimizer_precision bf16; default_seed2: seed 4321), "
        "validation every 50 steps; ~3.3 min per run on an H100: split the runs over two calls with "
        "MOMENTS_RUN_NAMES and summarize with python -m benchmarks.real_text moments, or MOMENTS_CONCURRENT=1: all "
        "runs at once on the one GPU (~35 GiB each, 3 fit an H200; their losses compared, not their speed)",
    ),
    Stage(
        name="offload-check",
        gpus=1,
        purpose="issue 14: FP8, 8 layers, optimizer offload 0.5 against two runs without (losses, s/step, peak)",
        limit_s=540,
        steps=(functions.offload_check,),
        outputs=("offload/summary.json",),
        notes="~4 min estimated",
    ),
    Stage(
        name="hf-parity",
        gpus=1,
        purpose="issue 13: tests/gpu/test_hf_parity.py: logits, KL, greedy vs transformers; FP8 export",
        limit_s=360,
        steps=(
            # The tests turn TF32 off for FP32 GEMMs (NVIDIA_TF32_OVERRIDE=0); the FP32 cases once more with it
            # allowed record what TF32 costs.
            _gpu_tests("tests/gpu/test_hf_parity.py", "hf_parity.log", HF_PARITY_OUT="{out}"),
            Command(
                "python3 -m pytest -m gpu -q tests/gpu/test_hf_parity.py -k fp32 -p no:cacheprovider",
                env={"NVIDIA_TF32_OVERRIDE": "1", "HF_PARITY_OUT": "{out}/tf32_allowed"},
                log="{out}/hf_parity_tf32_allowed.log",
                tail=1,
            ),
        ),
        outputs=("hf_parity.json", "hf_parity.log", "tf32_allowed/hf_parity.json", "hf_parity_tf32_allowed.log"),
        notes="~2 min",
    ),
    Stage(
        name="hf-convert-8b",
        gpus=1,
        purpose="issue 13: benchmarks.hf_convert, Llama 3 8B both ways",
        limit_s=600,
        steps=(
            Command(
                "python3 -m benchmarks.hf_convert --work-dir {HF_BENCH_DIR} --out {out}/hf_convert_8b.json",
                log="{out}/hf_convert_8b.log",
                tee=True,
            ),
        ),
        outputs=("hf_convert_8b.json", "hf_convert_8b.log"),
        knobs={"HF_BENCH_DIR": "/tmp/hf_convert_bench"},
        notes="~48 GB of disk under HF_BENCH_DIR, ~20 GB of host RAM; ~15 min estimated: more than one device call, "
        "so the stage stops at 600 s; on a machine without that limit run its command directly",
    ),
    Stage(
        name="real-text",
        gpus=1,
        purpose="issue 12: installed text files -> llama-fp8 preprocess -> the 1B text example vs mock data",
        limit_s=CALL_LIMIT_S,
        steps=(functions.real_text,),
        outputs=(
            "real_text/real_text_training.json",
            "real_text/corpus.json",
            "real_text/real_text.corpus.json",
            "real_text/preprocess.log",
            "real_text/fit_real.stderr",
            "real_text/fit_mock.stderr",
        ),
        notes="the GPU machine's Python packages' .py/.md/.rst/.txt files; the text example 300 steps with validation "
        "every 50, the same config on mock data 200 steps; ~8 min estimated",
    ),
    Stage(
        name="telemetry",
        gpus=1,
        purpose="issue 15: ThroughputMonitor (CSV log) + Megatron-LM, FP8, 4 layers, 30 steps each; the 1B CLI run",
        limit_s=CALL_LIMIT_S,
        steps=(functions.telemetry,),
        outputs=(
            "telemetry/ours_fp8.json",
            "telemetry/ours_csv/",
            "telemetry/megatron_lm_fp8.log",
            "telemetry/tb/",
            "telemetry/fit_1b.stdout",
            "telemetry/fit_1b.stderr",
            "telemetry/unguarded.log",
        ),
        notes="the 1B config through `llama-fp8 fit` for 30 steps (console: step bar, no dependency warnings; "
        "TensorBoard log), then a script without a main guard that saves checkpoints; 4.5 min measured; then on a "
        "CPU: python -m benchmarks.plot_training --ours OUT/telemetry/ours_csv "
        "--megatron-lm OUT/telemetry/megatron_lm_fp8.log --out OUT/telemetry/loss_speed.png",
    ),
    Stage(
        name="checkpoint-stall",
        gpus=1,
        purpose="issue 15: checkpoint saves of the 4-layer model (FP8, seq 8192, GBS 8), sync then async_save",
        limit_s=CALL_LIMIT_S,
        steps=(functions.checkpoint_stall,),
        outputs=("checkpoint_stall.json", "checkpoint_stall/sync.json", "checkpoint_stall/async.json"),
        knobs={
            "CKPT_STALL_RUNS": "sync async",
            "CKPT_STALL_DIR": "/dev/shm/checkpoint_stall",
            "CKPT_ASYNC_EVERY": "60",
            "CKPT_ASYNC_SAVES": "2",
        },
        notes="two saves with the optimizer each, synchronously, then CKPT_ASYNC_SAVES with async_save "
        "CKPT_ASYNC_EVERY steps apart: blocked s per save (and how much of it waited for the previous background "
        "write), each write's s and GiB/s, the shortest save interval that does not wait, tokens/s during the "
        "background write; CKPT_STALL_RUNS: any of sync, async, async_host_register; two checkpoints at most, under "
        "CKPT_STALL_DIR; ~6 min estimated, 8.9 min measured with a third run. Issue 30's saves every 8 steps: "
        "CKPT_STALL_RUNS=async CKPT_ASYNC_EVERY=8 (~2.5 min estimated)",
    ),
    Stage(
        name="reproducibility",
        gpus=1,
        purpose="issue 30: two runs, and a resume, bitwise equal? Per default switched, and in deterministic mode",
        limit_s=CALL_LIMIT_S,
        steps=(functions.reproducibility,),
        outputs=(
            "reproducibility.json",
            "reproducibility_candidates.json",
            "reproducibility_cost.json",
            "reproducibility/process_a.json",
            "reproducibility/process_b.json",
            "reproducibility/process_a.log",
            "reproducibility/process_b.log",
        ),
        knobs={"REPRO_CKPT_DIR": "/dev/shm/reproducibility", "REPRO_ARGS": "", "REPRO_COST_LAYERS": "4"},
        notes="the small Llama of the checkpoint tests (4 layers, seq 2048, GBS 4, FP8 delayed, FP8 weights), 10 "
        "steps per candidate of benchmarks.lib.reproducibility in two processes (the second in reverse order), the "
        "two modes also resumed from step 5 (checkpoints under REPRO_CKPT_DIR, 1.7 GB each); REPRO_ARGS: more "
        "flags of its `run` (--only NAME..., --arch recipe); then Trainer(deterministic=True) against the default "
        "at the recipe's shapes with REPRO_COST_LAYERS layers (0: not run); ~5 min estimated",
    ),
    Stage(
        name="document-masking",
        gpus=1,
        purpose="issue 27: document masking: isolation + as-if-alone on real text, then ours vs Megatron-LM on it",
        limit_s=CALL_LIMIT_S,
        steps=(functions.document_masking,),
        outputs=(
            "document_masking.json",
            "document_masking_isolation.json",
            "document_masking/tests.log",
            "document_masking/speed/document_masking_speed.json",
            "document_masking/speed/",
            "document_masking/corpus.json",
            "document_masking/real_text.corpus.json",
        ),
        knobs={"MASKING_PRECISIONS": "fp8 bf16", "MASKING_STEPS": "14", "MASKING_WARMUP": "6"},
        notes="tests/gpu/test_document_masking.py (a 4-layer Llama, forward only: BF16, FP8 delayed / blockwise / "
        "current, FP32), the real-text corpus, then Llama-3-8B layers x4, seq 8192, GBS 8 per precision: Megatron-LM "
        "--dataloader-inter-document-masking, ours masked, ours unmasked; ~7 min estimated",
    ),
    Stage(
        name="document-masking-training",
        gpus=1,
        purpose="issue 27: the 1B text example on real text, document masking on vs off: both validation curves",
        limit_s=CALL_LIMIT_S,
        steps=(functions.document_masking_training,),
        outputs=(
            "document_masking_training/document_masking_training.json",
            "document_masking_training/document_masking_val_loss.svg",
            "document_masking_training/masked.yaml",
            "document_masking_training/unmasked.yaml",
            "document_masking_training/fit_masked.stderr",
            "document_masking_training/fit_unmasked.stderr",
        ),
        knobs={"MASKING_TRAIN_STEPS": "300"},
        notes="the real-text corpus, then examples/configs/llama3_1b_text.yaml (no checkpoints, CSV logs) masked and "
        "unmasked, MASKING_TRAIN_STEPS steps each with validation every 50; ~8 min estimated",
    ),
    Stage(
        name="sft",
        gpus=1,
        purpose="issue 29: chat data -> preprocess --chat -> packed answer-only fine-tuning -> convert -> transformers",
        limit_s=CALL_LIMIT_S,
        steps=(
            Command(
                "python3 -m benchmarks.sft prepare --out-dir {out} --work-dir {SFT_WORK_DIR} --train {SFT_TRAIN} "
                "--steps {SFT_STEPS} --precision {SFT_PRECISION} --lr {SFT_LR}"
            ),
            Command(
                "python3 -m lightning_llama_fp8.cli preprocess --chat --input {SFT_WORK_DIR}/train.jsonl "
                "--output-prefix {SFT_WORK_DIR}/chat --max-seq-length 1024 --workers 8 --overwrite --no-progress",
                log="{out}/preprocess.log",
                tail=4,
            ),
            Command(
                "python3 -m benchmarks.sft all-tokens-corpus --corpus {SFT_WORK_DIR}/chat "
                "--out-prefix {SFT_WORK_DIR}/chat_all_tokens"
            ),
            *(
                step
                for run in ("answer_only", "all_tokens")
                for step in (
                    Command(
                        f"python3 -m lightning_llama_fp8.cli fit --config {{out}}/{run}.yaml",
                        log=f"{{out}}/fit_{run}.log",
                        tail=3,
                    ),
                    Command(
                        f"python3 -m lightning_llama_fp8.cli convert {{SFT_WORK_DIR}}/ckpt_{run}/final.ckpt "
                        f"{{SFT_WORK_DIR}}/hf_{run} --tokenizer llama3 --overwrite",
                        log=f"{{out}}/convert_{run}.log",
                        tail=6,
                    ),
                )
            ),
            Command(
                "python3 -m benchmarks.sft evaluate --out-dir {out} --work-dir {SFT_WORK_DIR}",
                log="{out}/evaluate.log",
                tee=True,
            ),
            Command(
                "python3 -m benchmarks.sft speed --data sft --corpus {SFT_WORK_DIR}/chat --steps {SFT_SPEED_STEPS} "
                "--out {out}/speed_sft.json",
                log="{out}/speed_sft.log",
                tail=2,
            ),
            Command(
                "python3 -m benchmarks.sft speed --data pretrain --steps {SFT_SPEED_STEPS} "
                "--out {out}/speed_pretrain.json",
                log="{out}/speed_pretrain.log",
                tail=2,
            ),
            Command("python3 -m benchmarks.sft summarize --out-dir {out} --work-dir {SFT_WORK_DIR}"),
        ),
        outputs=(
            "sft.json",
            "task.json",
            "heldout.jsonl",
            "train_sample.jsonl",
            "answer_only.yaml",
            "all_tokens.yaml",
            "evaluation.json",
            "speed_sft.json",
            "speed_pretrain.json",
            "preprocess.log",
            "fit_answer_only.log",
            "fit_all_tokens.log",
            "answer_only_csv/",
            "all_tokens_csv/",
            "evaluate.log",
        ),
        knobs={
            "SFT_WORK_DIR": "/tmp/sft_work",
            "SFT_TRAIN": "100000",
            "SFT_STEPS": "1000",
            "SFT_PRECISION": "fp8",
            "SFT_LR": "1e-3",
            "SFT_SPEED_STEPS": "15",
        },
        notes="a 4-layer hidden-512 Llama with the Llama 3 tokenizer fine-tuned from scratch on SFT_TRAIN synthetic "
        "conversations (reverse words / sort numbers), SFT_STEPS steps at GBS 32 x seq 1024 with the loss on the "
        "answers, then the same with the loss on every token; both exported and asked the 400 held-out prompts in "
        "transformers (greedy), with the untrained model; then Llama-3-8B layers x4, seq 8192, GBS 8, FP8 on the "
        "packed conversations and on mock data, SFT_SPEED_STEPS steps each. Corpora, checkpoints and exports under "
        "SFT_WORK_DIR (~6 GB); ~8 min estimated",
    ),
    Stage(
        name="suite",
        gpus=1,
        purpose="everything one commit has to prove in one call: tests/gpu, then ours vs Megatron-LM",
        limit_s=CALL_LIMIT_S,
        steps=(functions.suite,),
        outputs=("gpu_tests.log", "bench/compare.json"),
        knobs={"SKIP_TESTS": "0", "SKIP_BENCH": "0"},
        notes="arguments after OUT_DIR go to benchmarks.compare_megatron_lm; SKIP_TESTS=1 / SKIP_BENCH=1 leave a "
        "part out",
        takes_args=True,
    ),
)

STAGES_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
