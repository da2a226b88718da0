#!/usr/bin/env bash
# One named piece of GPU evidence per call, sized to fit a 10-minute device call (start-up included).
# Run from the repo root on the GPU machine after `source .gpu/setup.sh`; writes logs/JSON under OUT_DIR.
#
#   bash benchmarks/gpu_stage.sh STAGE OUT_DIR
#
# Stages (GPUs needed; wall time measured on H200 unless marked as an estimate):
#   equivalence-2   (2) issue 3: 1-GPU references + TP2, CP2 p2p/a2a/all_gather, DP2 in BF16 and FP8  (~9 min)
#   equivalence-4   (4) issue 3: the references + DP2, TP2 x CP2, CP2 x DP2 only                     (~8.6 min)
#   pipeline-2      (2) issues 14/16: PP2 and PP2 x VPP2 against one GPU from the same HF weights, BF16 and FP8
#                       -> OUT/pipeline/equivalence.json (~7 min est.)
#   pipeline-4      (4) issues 14/16: TP2 x PP2 and PP2 x DP2, the same way (~7 min est.)
#   speed-2         (2) issue 3: ours vs Megatron-LM, FP8, CP2 and TP2+SP, 4 layers                    (~5 min)
#   speed-tp2-32    (2) issue 3: ours vs Megatron-LM, FP8, TP2+SP, all 32 layers (H200: ~84 GB/card)  (~4.6 min)
#   speed-8b-4      (4) issue 5 fallback: full Llama 3 8B, TP1 CP2 DP2, ours vs Megatron-LM           (~8 min est.)
#   speed-8b-2      (2) issue 5 fallback: full Llama 3 8B, TP1 CP2 DP1 (96 GiB/GPU measured, H200 only)  (~5.6 min)
#   ref8-ours-cp2   (8) issue 5: the shipped 8B YAML (CP2 DP4, GBS 128), 30 steps, via the CLI         (~7 min est.)
#   ref8-lm-cp2     (8) issue 5: Megatron-LM, same flags and layout; then on any machine:
#                       python3 -m benchmarks.reference_run compare OUT/ref8_ours-cp2 OUT/ref8_lm-cp2
#   ref8-ours-cp1, ref8-lm-cp1 (8) the same with CP1 DP8, the layout Megatron-LM's shipped script uses
#   nan-safety      (1) issue 4: tests/gpu/test_nan_safety.py (injections, policies, recipes)        (~3.5 min)
#   gpu-tests       (1) tests/gpu except the checkpoint tests (stage `checkpoints`)                    (~6 min)
#   checkpoints     (2) distributed checkpoints: resume on 1 GPU; CP2 -> TP2, DP2 -> DP2/DP1 on 2 GPUs  (~7.5 min)
#   speed-1         (1) issue 15: ours vs Megatron-LM, FP8 and BF16, SPEED_LAYERS (4) layers of Llama 3 8B, GBS 8
#                       -> OUT/speed_summary.json (rows: layers, precision, s/step both sides, SPEED_SETTINGS)
#                       (3.9 min measured at 4 layers; 16 layers with SPEED_STEPS=12 SPEED_WARMUP=5: 5.6 min measured)
#   weight-refresh  (1) issue 15: FP8 weights refreshed from the main weights without TE's discarded transposes
#                       (fp8_weights.py): bitwise against Megatron's path, per-cast time, then lever-1 with B = TE's
#                       own path (--weight-refresh te) -> OUT/fp8_weight_refresh_*.json, OUT/lever/ (4.9 min measured)
#   lever-1         (1) issue 15: one speed lever against today's defaults, same call, alternating (A B A B): ours
#                       FP8, 4 layers, GBS 8, 20 steps; LEVER_ARGS are the bench_throughput flags of B,
#                       LEVER_ENV its environment (VAR=value ...), one of them needed
#                       -> OUT/lever/summary.json (s/step, loss difference) (~4 min est.)
#   fp8-casts       (1) issue 15: which FP8 cast-transpose kernel TE runs (NVRTC-tuned or the general one), where the
#                       CUDA headers NVRTC needs are, and the cast's GB/s per setting -> OUT/fp8_casts/*.json (~1 min est.)
#                       then e.g. LEVER_ENV="NVTE_CUDA_INCLUDE_DIR=<dir>" bash gpu_stage.sh lever-1 OUT (A/B, same call)
#   profile-fp8     (1) issue 15: where the FP8 step loses time: ours FP8 and BF16, 4 layers, 3 steps profiled after
#                       10 (torch.profiler; kernel time by kind, GPU idle) -> OUT/profile/{fp8,bf16}.json (~3 min est.);
#                       PROFILE_STACKS=1: one more FP8 step with Python stacks, which code launched each FP8 cast
#   recipes-1       (1) issue 4: tokens/s of BF16 and each FP8 recipe (+ NaNGuard) on Llama-3-8B layers x4 (~5 min est.)
#   recompute       (1) issue 14: no / selective / full recompute, ours vs Megatron-LM, FP8, 4 layers, GBS 8:
#                       s/step, peak memory, plan -> OUT/recompute.json (RECOMPUTE_ROWS adds selective-mlp) (~6.5 min measured)
#   full-8b-1gpu    (1, H200) issue 14: all 32 layers on one GPU, full recompute + half the optimizer on the CPU,
#                       6 steps; then the same without offload (expected not to fit) -> OUT/full_8b_one_gpu.json
#                       (3.6 min measured; needs ~70 GiB of host RAM)
#   offload-check   (1) issue 14: FP8, 8 layers, optimizer offload 0.5 against two runs without (losses, s/step, peak)
#                       -> OUT/offload/summary.json (~4 min est.)
#   hf-parity       (1) issue 13: tests/gpu/test_hf_parity.py: logits, KL, greedy vs transformers; FP8 export
#                       -> OUT/hf_parity.json; the FP32 cases again with TF32 allowed (~2 min)
#   hf-convert-8b   (1) issue 13: benchmarks/hf_convert.py, Llama 3 8B both ways -> OUT/hf_convert_8b.json
#                       (~48 GB of disk under $HF_BENCH_DIR, ~20 GB of host RAM; ~15 min est.)
#   real-text       (1) issue 12: text files installed on the GPU machine (its Python packages' .py/.md/.rst/.txt)
#                       -> `llama-fp8 preprocess` -> the 1B text example 300 steps with validation every 50; the
#                       same config on mock data 200 steps -> OUT/real_text/real_text_training.json (~8 min est.)
#   telemetry       (1) issue 15: ThroughputMonitor in bench_throughput (CSV log) + Megatron-LM, FP8, 4 layers,
#                       30 steps each; the 1B config through `llama-fp8 fit` for 30 steps (console: step bar, no
#                       dependency warnings; TensorBoard log) -> OUT/telemetry/ (4.5 min measured); then on a CPU:
#                       python3 -m benchmarks.plot_training --ours OUT/telemetry/ours_csv \
#                         --megatron-lm OUT/telemetry/megatron_lm_fp8.log --out OUT/telemetry/loss_speed.png
#   checkpoint-stall (1) issue 15: the 4-layer model (FP8, seq 8192, GBS 8) saving a checkpoint with its optimizer
#                       (~26 GB) twice synchronously, then twice with async_save (CKPT_ASYNC_EVERY=60 steps apart):
#                       blocked s per save, tokens/s during the background write -> OUT/checkpoint_stall.json
#                       (~6 min est.; 8.9 min measured with a third run; CKPT_STALL_RUNS picks runs; two checkpoints
#                       at most, under $CKPT_STALL_DIR, default /dev/shm)
set -uo pipefail
stage="${1:?usage: gpu_stage.sh STAGE OUT_DIR}"
out="${2:?usage: gpu_stage.sh STAGE OUT_DIR}"
case "$stage" in
  equivalence-2|equivalence-4|pipeline-2|pipeline-4|speed-2|speed-tp2-32|speed-8b-4|speed-8b-2|nan-safety|gpu-tests|recipes-1) ;;
  checkpoints|recompute|full-8b-1gpu) ;;
  hf-parity|hf-convert-8b) ;;
  telemetry|real-text) ;;
  checkpoint-stall|profile-fp8|speed-1|lever-1|fp8-casts|offload-check|weight-refresh) ;;
  ref8-ours-cp2|ref8-lm-cp2|ref8-ours-cp1|ref8-lm-cp1) ;;
  *) echo "unknown stage '$stage' (see the list at the top of $0)" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_RESULTS_DIR="$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt"
# The device tool copies the working tree, whose .git may lag behind it: pass STAGE_COMMIT=<hash> to record the
# commit that really ran (plus "dirty" when the tree had changes); else the copy's HEAD, marked as such.
if [ -n "${STAGE_COMMIT:-}" ]; then echo "$STAGE_COMMIT" > "$out/commit.txt"
else echo "$(git rev-parse HEAD 2>/dev/null) (HEAD of the copy; may lag the working tree)" > "$out/commit.txt"; fi

case "$stage" in
  equivalence-2)
    python3 -m benchmarks.parallel_equivalence --out-dir "$out/equivalence" --gpus 2 --fp8 ;;
  equivalence-4)
    python3 -m benchmarks.parallel_equivalence --out-dir "$out/equivalence" --gpus 4 --fp8 \
      --only dp2 tp2xcp2 cp2xdp2 ;;
  pipeline-2)
    python3 -m benchmarks.parallel_equivalence --out-dir "$out/pipeline" --gpus 2 --fp8 --only pp2 pp2-vpp2 ;;
  pipeline-4)
    python3 -m benchmarks.parallel_equivalence --out-dir "$out/pipeline" --gpus 4 --fp8 --only tp2xpp2 pp2xdp2 ;;
  speed-2)
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/speed_cp2" --precisions fp8 --cp 2 --nproc 2 &&
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/speed_tp2" --precisions fp8 --tp 2 --nproc 2 ;;
  speed-tp2-32)
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/speed_tp2_32l" --precisions fp8 --tp 2 --nproc 2 \
      --layers 32 --steps 20 --warmup 8 ;;
  speed-8b-4)
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/speed_8b_tp1cp2dp2" --precisions fp8 --cp 2 \
      --nproc 4 --layers 32 --gbs 16 --steps 20 --warmup 8 ;;
  speed-8b-2)
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/speed_8b_tp1cp2dp1" --precisions fp8 --cp 2 \
      --nproc 2 --layers 32 --gbs 16 --steps 16 --warmup 6 ;;
  ref8-*)
    side="${stage#ref8-}"; side="${side%-cp*}"; cp="${stage##*-cp}"
    [ "$side" = lm ] && side=megatron-lm
    python3 -m benchmarks.reference_run "$side" --out-dir "$out/ref8_${stage#ref8-}" --gpus 8 --cp "$cp" --steps 30 ;;
  nan-safety)
    python3 -m pytest -m gpu -q tests/gpu/test_nan_safety.py -p no:cacheprovider 2>&1 | tee "$out/nan_safety.log" ;;
  weight-refresh)
    # The FP8 weight refresh without TE's discarded transposes: same bytes as Megatron's path, kernels and time per
    # cast (tests/gpu/test_fp8_weight_refresh.py), then the training step with and without it (lever-1, A B A B).
    python3 -m pytest -m gpu -q tests/gpu/test_fp8_weight_refresh.py -p no:cacheprovider 2>&1 | tee "$out/weight_refresh.log" | tail -3
    LEVER_ARGS="--weight-refresh te" bash "$0" lever-1 "$out" ;;
  gpu-tests)
    # Without the checkpoint tests, which have their own stage: together they would not fit one 10-minute call.
    python3 -m pytest -m gpu -q tests/gpu -p no:cacheprovider --ignore tests/gpu/test_checkpoint_resume.py \
      --ignore tests/gpu/test_checkpoint_layouts.py 2>&1 | tee "$out/gpu_tests.log" ;;
  checkpoints)
    python3 -m pytest -m gpu -q tests/gpu/test_checkpoint_resume.py tests/gpu/test_checkpoint_layouts.py \
      -p no:cacheprovider 2>&1 | tee "$out/checkpoints.log" ;;
  recompute)
    # Same shapes and flags as the speed comparisons; fewer steps so three settings x two sides fit one call.
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/recompute" --precisions fp8 \
      --recompute ${RECOMPUTE_ROWS:-none selective full} --layers "${RECOMPUTE_LAYERS:-4}" --gbs 8 --steps 14 --warmup 6 &&
    cp "$out/recompute/recompute.json" "$out/recompute.json" ;;
  full-8b-1gpu)
    # One process per run (the 8B build dominates start-up: GPU init, no CPU init); expandable segments so a
    # fragmented cache does not decide whether it fits.
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    mkdir -p "$out/full_8b"
    run_8b() {  # name, time limit (s), bench_throughput.py flags...
      local name="$1" limit="$2"; shift 2
      timeout "$limit" python3 -m benchmarks.throughput --layers 32 --gbs 8 --recompute full \
        --recompute-method uniform --recompute-num-layers 1 --out "$out/full_8b/$name.json" "$@" \
        > "$out/full_8b/$name.log" 2>&1
      echo "$name: exit $?, $(tail -c 600 "$out/full_8b/$name.log" | tail -1)"
    }
    run_8b offload_0.5 330 --steps 6 --warmup 3 --optimizer-offload-fraction 0.5
    if [ ! -f "$out/full_8b/offload_0.5.json" ] && [ "$SECONDS" -lt 200 ]; then  # FP8 weights + offload failed
      run_8b offload_0.5_bf16_weights 300 --steps 6 --warmup 3 --optimizer-offload-fraction 0.5 --no-fp8-param-gather
    fi
    if [ "$SECONDS" -lt 330 ]; then
      run_8b no_offload $((500 - SECONDS)) --steps 4 --warmup 2 --allow-oom
    fi
    python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); runs = {p.stem: json.loads(p.read_text()) for p in (out / "full_8b").glob("*.json")}
main = runs.get("offload_0.5") or runs.get("offload_0.5_bf16_weights")
def row(r):
    return {k: r.get(k) for k in ("fits", "peak_memory_gib", "peak_reserved_gib", "plan_gib", "plan_host_gib",
            "tokens_per_sec_per_gpu", "median_step_time_s", "fp8_param_gather", "error", "steps_done")}
summary = {
    "card": (main or next(iter(runs.values()), {})).get("device"),
    "fits": bool(main and main.get("fits")),
    "recompute": (main or {}).get("recompute"),
    "cpu_offload": {"optimizer_offload_fraction": (main or {}).get("optimizer_offload_fraction")},
    "peak_gib": (main or {}).get("peak_memory_gib"),
    "plan_gib": (main or {}).get("plan_gib"),
    "tokens_per_s": (main or {}).get("tokens_per_sec_per_gpu"),
    "runs": {name: row(r) for name, r in runs.items()},
}
(out / "full_8b_one_gpu.json").write_text(json.dumps(summary, indent=2)); print(json.dumps(summary, indent=2))
PY
    ;;
  hf-parity)
    # The tests turn TF32 off for FP32 GEMMs (NVIDIA_TF32_OVERRIDE=0); the FP32 cases once more with it allowed
    # record what TF32 costs, in OUT/tf32_allowed/hf_parity.json.
    HF_PARITY_OUT="$out" python3 -m pytest -m gpu -q tests/gpu/test_hf_parity.py -p no:cacheprovider 2>&1 \
      | tee "$out/hf_parity.log"
    NVIDIA_TF32_OVERRIDE=1 HF_PARITY_OUT="$out/tf32_allowed" python3 -m pytest -m gpu -q tests/gpu/test_hf_parity.py \
      -k fp32 -p no:cacheprovider > "$out/hf_parity_tf32_allowed.log" 2>&1; tail -1 "$out/hf_parity_tf32_allowed.log" ;;
  hf-convert-8b)
    python3 -m benchmarks.hf_convert --work-dir "${HF_BENCH_DIR:-/tmp/hf_convert_bench}" \
      --out "$out/hf_convert_8b.json" 2>&1 | tee "$out/hf_convert_8b.log" ;;
  telemetry)
    t="$out/telemetry"; mkdir -p "$t"
    python3 -m benchmarks.throughput --precision fp8 --layers 4 --steps 30 --warmup 10 \
      --log-dir "$t/ours_csv" --out "$t/ours_fp8.json" > "$t/ours_fp8.log" 2>&1; tail -1 "$t/ours_fp8.log"
    PRECISION=fp8 NPROC=1 NUM_LAYERS=4 GBS=8 ITERS=30 bash benchmarks/scripts/megatron_lm_baseline.sh \
      > "$t/megatron_lm_fp8.log" 2>&1; grep -E "iteration +30/" "$t/megatron_lm_fp8.log"
    # The console a user sees (stdout and stderr apart), and the TensorBoard log with throughput/* and fp8/*.
    python3 -m lightning_llama_fp8.cli fit --config examples/configs/llama3_1b_1gpu_fp8.yaml \
      --trainer.max_steps 30 --trainer.logger.init_args.save_dir "$t/tb" \
      > "$t/fit_1b.stdout" 2> "$t/fit_1b.stderr"  # 30 steps: no validation, no checkpoint (every 100)
    echo "fit exit $?"; tail -c 600 "$t/fit_1b.stdout"; grep -c -i warn "$t/fit_1b.stderr"
    # A plain script without a main guard that saves distributed checkpoints (hung on an H200 before the fix).
    cat > "$t/train_unguarded.py" <<'PY'
import os, sys
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_llama_fp8 import LlamaLightningModule, MegatronCPStrategy, MegatronPrecision, MockDataModule, OptimizerSettings
from lightning_llama_fp8 import get_preset
print(f"top level runs in {__name__} pid {os.getpid()}", flush=True)
arch = get_preset("llama_tiny")
saver = ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=2, save_top_k=-1)
trainer = Trainer(accelerator="gpu", devices=1, strategy=MegatronCPStrategy(), plugins=[MegatronPrecision()],
                  max_steps=4, callbacks=[saver], logger=False, enable_progress_bar=False, limit_val_batches=0)
data = MockDataModule(seq_length=arch.seq_length, vocab_size=arch.vocab_size, global_batch_size=4, micro_batch_size=2)
trainer.fit(LlamaLightningModule(arch, OptimizerSettings(warmup_steps=1)), datamodule=data)
print("saved", sorted(os.listdir(sys.argv[1])), flush=True)
PY
    # Its checkpoints outside OUT: they would make the returned archive too large (as on 2026-12-03).
    rm -rf /tmp/unguarded_ckpts
    timeout 300 python3 "$t/train_unguarded.py" /tmp/unguarded_ckpts > "$t/unguarded.log" 2>&1
    echo "unguarded exit $?"; grep -E "^(top level|saved)" "$t/unguarded.log"; rm -rf /tmp/unguarded_ckpts ;;
  real-text)
    t="$out/real_text"; mkdir -p "$t"
    site="$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
    python3 -m benchmarks.real_text corpus --root "$site" --min-mb 100 --max-mb 200 --out /tmp/real_text.jsonl \
      --describe "$t/corpus.json"
    python3 -m lightning_llama_fp8.cli preprocess --input /tmp/real_text.jsonl --output-prefix /tmp/real_text \
      --workers 16 --overwrite > "$t/preprocess.log" 2>&1; echo "preprocess exit $?"; tail -2 "$t/preprocess.log"
    cp /tmp/real_text.corpus.json "$t/real_text.corpus.json"
    # The two example configs as a user runs them, minus checkpoints (time); CSV logs for the summary.
    python3 - "$t" <<'PY'
import sys, yaml
t = sys.argv[1]
for name, source, steps in (("real", "llama3_1b_text", 300), ("mock", "llama3_1b_1gpu_fp8", 200)):
    config = yaml.safe_load(open(f"examples/configs/{source}.yaml"))
    trainer = config["trainer"]
    trainer.update(max_steps=steps, val_check_interval=50, enable_checkpointing=False)
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": f"{t}/{name}_csv", "name": "run"}}
    if name == "real":
        config["data"]["init_args"].update(data_path=["/tmp/real_text"], path_to_cache="/tmp/real_text_cache")
    yaml.safe_dump(config, open(f"{t}/{name}.yaml", "w"), sort_keys=False)
PY
    for name in real mock; do
      python3 -m lightning_llama_fp8.cli fit --config "$t/$name.yaml" > "$t/fit_$name.stdout" 2> "$t/fit_$name.stderr"
      echo "fit $name exit $?"; tail -c 400 "$t/fit_$name.stderr"
    done
    python3 -m benchmarks.real_text training --real-csv "$t/real_csv/run/version_0/metrics.csv" \
      --mock-csv "$t/mock_csv/run/version_0/metrics.csv" --corpus-json "$t/corpus.json" --sidecar "$t/real_text.corpus.json" --max-steps 300 \
      --card "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" --out "$t/real_text_training.json" ;;
  checkpoint-stall)
    # The sync saves block 23-38 s each (on /dev/shm; 75 s on a disk), so they come 10 steps apart; the async ones far
    # enough apart for the first background write to be published before the second save (else that save waits for
    # it, which counts as blocked).
    # Default directory: /dev/shm (RAM), as measured on 2026-12-03; the H200 machine's disk had room for one 25 GiB
    # checkpoint only. Set CKPT_STALL_DIR to measure a disk.
    c="$out/checkpoint_stall"; mkdir -p "$c"; ckpts="${CKPT_STALL_DIR:-/dev/shm/checkpoint_stall}"; every="${CKPT_ASYNC_EVERY:-60}"
    # CKPT_STALL_RUNS: any of sync, async, async_host_register (torch's cudaHostRegister-based pinned allocator:
    # measured 2026-12-04 to pin faster but copy slower, 14.7 s and 10.1 s blocked; off by default).
    for run in ${CKPT_STALL_RUNS:-sync async}; do
      rm -rf "$ckpts"  # one run's checkpoints at a time: the disk holds two of them at most
      if [ "$run" = sync ]; then
        python3 -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps 22 --warmup 6 --save-every 10 \
          --save-mode sync --ckpt-dir "$ckpts/sync" --out "$c/sync.json" > "$c/sync.log" 2>&1
      else
        envs=""; [ "$run" = async_host_register ] && envs="PYTORCH_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
        env $envs python3 -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps $((2 * every)) \
          --warmup 6 --save-every "$every" --save-mode async --ckpt-dir "$ckpts/async" --out "$c/$run.json" > "$c/$run.log" 2>&1
      fi
      echo "$run exit $?"
    done
    rm -rf "$ckpts"
    python3 - "$c" "$out/checkpoint_stall.json" <<'PY'
import json, sys
from pathlib import Path
c, rows, card = Path(sys.argv[1]), [], None
settings = {"async_host_register": "PYTORCH_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8"}
for name in ("sync", "async", "async_host_register"):
    mode = name.split("_")[0]
    path = c / f"{name}.json"
    if not path.is_file():
        if (c / f"{name}.log").is_file():
            rows.append({"mode": mode, "settings": settings.get(name), "error": f"no record; see {name}.log"})
        continue
    record = json.loads(path.read_text()); card = record["device"]; ckpt = record["checkpoint"]
    rows.append({
        "mode": mode,
        "settings": settings.get(name),
        "checkpoint_gib": ckpt["checkpoint_gib"],
        "blocked_s": max(ckpt["blocked_s"]) if ckpt["blocked_s"] else None,  # the worse of the saves
        "blocked_s_per_save": ckpt["blocked_s"],
        "tokens_per_s_during_write_ratio": ckpt["tokens_per_s_during_write_ratio"],  # None for sync: no steps run
        "tokens_per_s_normal": ckpt["tokens_per_s_normal"],
        "tokens_per_s_during_write": ckpt["tokens_per_s_during_write"],
        "steps_during_write": ckpt["steps_during_write"],
        "exit_wait_s": ckpt["exit_wait_s"],
        "saves": ckpt["saves"],
        "host_reserve": ckpt.get("host_reserve"),  # the pinning ahead of the first async save
    })
summary = {"card": card, "rows": rows}
Path(sys.argv[2]).write_text(json.dumps(summary, indent=2)); print(json.dumps(summary, indent=2))
PY
    ;;
  speed-1)
    layers="${SPEED_LAYERS:-4}"
    python3 -m benchmarks.compare_megatron_lm --out-dir "$out/speed_${layers}l" --precisions fp8 bf16 \
      --layers "$layers" --gbs 8 --steps "${SPEED_STEPS:-20}" --warmup "${SPEED_WARMUP:-8}"
    python3 - "$out/speed_${layers}l/compare.json" "$out/speed_summary.json" "${SPEED_SETTINGS:-the defaults of this commit}" <<'PY'
import json, sys
from pathlib import Path
compare, settings = json.loads(Path(sys.argv[1]).read_text()), sys.argv[3]
rows = [{
    "layers": compare["config"]["layers"], "precision": r["precision"],
    "ours_s_per_step": r["ours"].get("median_step_time_s"),
    "megatron_lm_s_per_step": r["megatron_lm"].get("median_step_time_s"),
    "ours_over_megatron_lm": r.get("ratio"), "settings": settings,
} for r in compare["results"]]  # fmt: skip
summary = {"card": compare["device"], "rows": rows}
Path(sys.argv[2]).write_text(json.dumps(summary, indent=2)); print(json.dumps(summary, indent=2))
PY
    ;;
  lever-1)
    # LEVER_ENV: environment assignments (VAR=value ...) for the B runs only, for levers that are settings of a
    # dependency rather than flags of bench_throughput.py; then LEVER_ARGS defaults to none.
    # (The first lever, --grad-accum-fusion, is the default since its measurement: LEVER_ARGS="--grad-accum-fusion off"
    # measures it again.)
    if [ -z "${LEVER_ARGS:-}${LEVER_ENV:-}" ]; then echo "lever-1 needs LEVER_ARGS and/or LEVER_ENV" >&2; exit 2; fi
    l="$out/lever"; mkdir -p "$l"; lever="${LEVER_ARGS:-}"
    for run in a1 b1 a2 b2; do
      extra=""; envs=""; [ "${run:0:1}" = b ] && extra="$lever" && envs="${LEVER_ENV:-}"
      env $envs python3 -m benchmarks.throughput --precision fp8 --layers 4 --gbs 8 --steps 20 --warmup 8 \
        $extra --out "$l/$run.json" > "$l/$run.log" 2>&1
      echo "$run ($envs $extra) exit $?"
    done
    lever="${LEVER_ENV:+$LEVER_ENV }$lever"
    python3 - "$l" "$lever" <<'PY'
import json, statistics, sys
from pathlib import Path
l, lever = Path(sys.argv[1]), sys.argv[2]
runs = {p.stem: json.loads(p.read_text()) for p in l.glob("[ab][12].json")}
def side(tag):
    rs = [r for name, r in sorted(runs.items()) if name.startswith(tag)]
    return {"s_per_step": [r["median_step_time_s"] for r in rs], "losses": [r["losses"] for r in rs]}
a, b = side("a"), side("b")
noise = max(abs(x - y) for x, y in zip(*a["losses"])) if len(a["losses"]) == 2 else None
diff = max(abs(x - y) for x, y in zip(a["losses"][0], b["losses"][0])) if a["losses"] and b["losses"] else None
summary = {
    "card": next(iter(runs.values()), {}).get("device"), "lever": lever,
    "default_s_per_step": a["s_per_step"], "lever_s_per_step": b["s_per_step"],
    "speedup": (statistics.mean(a["s_per_step"]) / statistics.mean(b["s_per_step"])) if a["s_per_step"] and b["s_per_step"] else None,
    "max_loss_diff_default_vs_default": noise, "max_loss_diff_default_vs_lever": diff,
}  # fmt: skip
(l / "summary.json").write_text(json.dumps(summary, indent=2)); print(json.dumps(summary, indent=2))
PY
    ;;
  profile-fp8)
    # PROFILE_PRECISIONS (default "fp8 bf16"); PROFILE_STACKS=1 adds one FP8 step profiled with Python stacks
    # (fp8_stacks.json: kernel_profile.launch_sites, which code launched the FP8 casts; its step times are slower).
    mkdir -p "$out/profile"
    for precision in ${PROFILE_PRECISIONS:-fp8 bf16}; do
      python3 -m benchmarks.throughput --precision "$precision" --layers 4 --steps 13 --warmup 10 \
        --profile-steps 3 --out "$out/profile/$precision.json" > "$out/profile/$precision.log" 2>&1
      echo "$precision exit $?"
    done
    if [ -n "${PROFILE_STACKS:-}" ]; then
      python3 -m benchmarks.throughput --precision fp8 --layers 4 --steps 11 --warmup 10 --profile-steps 1 \
        --profile-stacks --out "$out/profile/fp8_stacks.json" > "$out/profile/fp8_stacks.log" 2>&1
      echo "fp8 with stacks exit $?"
    fi
    python3 - "$out/profile" <<'PY'
import json, sys
from pathlib import Path
rows = {p.stem: json.loads(p.read_text()).get("kernel_profile") for p in Path(sys.argv[1]).glob("*.json")}
for name, summary in sorted(rows.items()):
    if summary:
        print(name, f"wall {summary['wall_s_per_step']:.3f} s/step, idle {summary['gpu_idle_s_per_step']:.3f}",
              {k: round(v, 4) for k, v in summary["kernel_s_per_step_by_kind"].items()})
        for site in summary.get("launch_sites", [])[:6]:
            print(f"  {site['s']:.4f} s {site['calls']} calls {site['kernel'][:90]} grids {site['grids'][:2]}")
            print("     " + "\n     ".join(site["frames"][:6]))
PY
    ;;
  fp8-casts)
    # TE casts activations and gradients to FP8 (with the transpose the wgrad GEMM needs) in a tuned kernel it
    # compiles at run time with NVRTC, or else in a statically compiled general one: the 2026-12-03 profile showed
    # only the general kernel (cast_transpose_general_kernel, 69 ms of a 0.99 s step). Where are the CUDA headers
    # NVRTC needs, which kernel runs, and how fast, by setting: default, NVRTC off, each header directory found.
    c="$out/fp8_casts"; mkdir -p "$c"
    python3 -c 'import os, transformer_engine.pytorch; print("NVTE_CUDA_INCLUDE_DIR after import:", os.environ.get("NVTE_CUDA_INCLUDE_DIR"))' \
      > "$c/te_env.txt" 2>&1
    timeout 60 find / -xdev -name cuda_runtime.h -path "*include*" 2>/dev/null | head -20 > "$c/cuda_runtime_h.txt"
    timeout 60 find / -xdev -name "libnvrtc*.so*" 2>/dev/null | head -20 > "$c/libnvrtc.txt"
    cat "$c/te_env.txt" "$c/cuda_runtime_h.txt" "$c/libnvrtc.txt"
    cat > "$c/cast_probe.py" <<'PY'
import json, os, sys
import torch
import transformer_engine.pytorch  # noqa: F401  (loads TE's libraries; its torch extension imports after it)
import transformer_engine_torch as tex
from transformer_engine.pytorch.tensor.float8_tensor import Float8Quantizer
from torch.profiler import ProfilerActivity, profile

rows = []
for shape in ((8192, 4096), (8192, 14336)):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    quantizer = Float8Quantizer(torch.ones(1, device="cuda"), torch.zeros(1, device="cuda"), tex.DType.kFloat8E4M3,
                                rowwise=True, columnwise=True)
    for _ in range(5):
        quantizer(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        quantizer(x)
    end.record(); torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 50
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        quantizer(x); torch.cuda.synchronize()
    kernels = sorted({e.name[:120] for e in prof.events() if e.device_type.name == "CUDA"})
    moved = x.numel() * (2 + 1 + 1)  # read bf16, write the FP8 data and its transpose
    rows.append({"shape": shape, "s": seconds, "gb_per_s": moved / seconds / 1e9, "kernels": kernels})
out = {"setting": sys.argv[2], "env": {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}, "rows": rows}
print(json.dumps(out)); open(sys.argv[1], "w").write(json.dumps(out, indent=2))
PY
    python3 "$c/cast_probe.py" "$c/default.json" default 2>&1 | tail -2
    NVTE_DISABLE_NVRTC=1 python3 "$c/cast_probe.py" "$c/nvrtc_off.json" nvrtc_off 2>&1 | tail -2
    i=0
    for header in $(cat "$c/cuda_runtime_h.txt"); do
      i=$((i + 1)); dir="$(dirname "$header")"; dir="${dir%/include}"
      NVTE_CUDA_INCLUDE_DIR="$dir" python3 "$c/cast_probe.py" "$c/include_$i.json" "include $dir" 2>&1 | tail -2
      [ "$i" -ge 3 ] && break
    done ;;
  offload-check)
    # Does optimizer CPU offload (HybridDeviceOptimizer, with FP8 weights) train like the GPU optimizer? The full 8B
    # on one H200 (full-8b-1gpu) can only run offloaded; 8 layers fit both ways: same seed and data, the offloaded run
    # against two runs without (their difference is the run-to-run noise).
    o="$out/offload"; mkdir -p "$o"
    for run in gpu_a offload gpu_b; do
      fraction=0.0; [ "$run" = offload ] && fraction=0.5
      python3 -m benchmarks.throughput --precision fp8 --layers 8 --gbs 8 --steps 12 --warmup 4 \
        --optimizer-offload-fraction "$fraction" --out "$o/$run.json" > "$o/$run.log" 2>&1
      echo "$run (offload $fraction) exit $?"
    done
    python3 - "$o" <<'PY'
import json, sys
from pathlib import Path
o = Path(sys.argv[1]); runs = {p.stem: json.loads(p.read_text()) for p in o.glob("*.json")}
def gap(a, b):
    return max(abs(x - y) for x, y in zip(runs[a]["losses"], runs[b]["losses"])) if a in runs and b in runs else None
summary = {"card": next(iter(runs.values()), {}).get("device"),
           "losses": {k: r.get("losses") for k, r in runs.items()},
           "s_per_step": {k: r.get("median_step_time_s") for k, r in runs.items()},
           "peak_gib": {k: r.get("peak_memory_gib") for k, r in runs.items()},
           "max_loss_gap_gpu_vs_gpu": gap("gpu_a", "gpu_b"), "max_loss_gap_offload_vs_gpu": gap("gpu_a", "offload")}
(o / "summary.json").write_text(json.dumps(summary, indent=2)); print(json.dumps(summary, indent=2))
PY
    ;;
  recipes-1)
    # Same shapes and flags as the speed comparisons (seq 8192, GBS 8), one GPU, one process per run.
    mkdir -p "$out/recipes"
    for run in "bf16 delayed" "fp8 delayed" "fp8 delayed skip" "fp8 current" "fp8 blockwise"; do
      set -- $run
      name="$1${2:+_$2}${3:+_guard_$3}"; [ "$1" = bf16 ] && name=bf16
      python3 -m benchmarks.throughput --precision "$1" --recipe "$2" ${3:+--nan-guard "$3"} \
        --layers 4 --steps 20 --warmup 8 --out "$out/recipes/$name.json" > "$out/recipes/$name.log" 2>&1
      tail -1 "$out/recipes/$name.log"
    done ;;
esac
