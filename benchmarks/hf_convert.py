"""Wall time and peak host memory of Hugging Face conversion, both ways, for a Llama-3-8B-shaped model (CPU or GPU).

    python -m benchmarks.hf_convert --work-dir /big/disk/hf_bench --out benchmarks/results/.../hf_convert_8b.json

1. Writes a random Llama 3 8B-shaped Hugging Face directory (BF16 safetensors, 5 GB shards; 16 GB) tensor by tensor.
2. ``hf_to_ours``: in a child process, builds the GPTModel (TP1, local layer spec, on the CPU, without random
   initialisation since every weight is overwritten) and loads the Hugging Face weights into it with
   ``load_hf_weights`` (what ``LlamaLightningModule(init_weights=...)`` does on each rank).
   ``ours_to_dist_checkpoint``: the same child then saves it as this package's distributed checkpoint (the input
   of the export). On a machine without CUDA, megatron-core's ``dist_checkpointing.save`` needs the two CUDA calls
   that ``tests.helpers.allow_dist_checkpointing_on_cpu`` stubs (run from the repository root, where ``tests`` is
   importable); the script does that and says so.
3. ``ours_to_hf``: in a second child, ``export_to_hf`` (what ``llama-fp8 convert`` runs).
4. The floors each direction is compared with, in the same run and page-cache state: reading the Hugging Face
   files once (import, ``io_floor_s``); for the export, copying them with ``shutil.copyfile`` (``io_floor_s``: on
   Linux an in-kernel copy that never brings the bytes into user memory) and reading each file's bytes into a user
   buffer and writing them to a new file (``io_floor_user_space_s``: what any exporter, which must have the bytes
   in its own memory, pays at least).

``--keep`` leaves the scratch directories; ``--reuse`` then measures only the export (and its floors) against the
HF directory and checkpoint a ``--keep`` run of the same ``--layers`` left, for repeated before/after runs.

Each child reports its own peak RSS (``VmHWM`` of ``/proc/self/status``). Needs about 2 x 16 GB of disk and,
for step 2, host memory for the BF16 model (~16 GB) plus the save's buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _peak_rss_gib() -> float:
    """This process's RSS high-water mark. VmHWM starts afresh at exec; getrusage's ru_maxrss would carry the
    parent's peak over into a child (measured: all children reported the parent's 5.7 GiB)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB; macOS: bytes (not handled)


def _arch(layers: int) -> Any:
    from lightning_llama_fp8 import get_preset

    return get_preset("llama3_8b", num_layers=layers, transformer_impl="local", apply_rope_fusion=False)


def make_hf_dir(directory: Path, layers: int) -> float:
    """A random BF16 Hugging Face Llama directory of the 8B shapes; returns its size in GiB."""
    import torch

    from benchmarks.lib.internals import ShardedSafetensorsWriter, expected_hf_shapes
    from lightning_llama_fp8.hf import hf_config_from_llama

    arch = _arch(layers)
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(directory)
    generator = torch.Generator().manual_seed(0)
    for name, shape in expected_hf_shapes(arch).items():
        if name.endswith("norm.weight"):
            writer.add(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.finish()
    (directory / "config.json").write_text(json.dumps(hf_config_from_llama(arch), indent=2))
    return writer.total_bytes / 2**30


def phase_import(hf_dir: Path, ckpt: Path, layers: int, result: Path) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29655"))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    from benchmarks.lib.internals import INFO_FILENAME, LIGHTNING_FILENAME, save_megatron_state
    from lightning_llama_fp8 import CheckpointInfo
    from lightning_llama_fp8.hf import load_hf_weights

    parallel_state.initialize_model_parallel(1)
    arch = _arch(layers)
    started = time.perf_counter()
    config = arch.transformer_config(use_cpu_initialization=True, perform_initialization=False)
    model = arch.build_model(config)
    built = time.perf_counter()
    load_hf_weights(model, hf_dir, arch, 0, 1)
    loaded = time.perf_counter()
    rss_after_load = _peak_rss_gib()
    stubbed = not torch.cuda.is_available()
    if stubbed:
        from tests.helpers import allow_dist_checkpointing_on_cpu

        allow_dist_checkpointing_on_cpu()
    ckpt.mkdir(parents=True)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    save_megatron_state(ckpt, {"model": model}, None, "dp_reshardable", group)
    torch.save({"global_step": 0, "state_dict": {}}, ckpt / LIGHTNING_FILENAME)
    from dataclasses import asdict

    info = CheckpointInfo(ckpt, 0, 1, 1, 1, arch=asdict(arch), optimizer_sharding=None)
    (ckpt / INFO_FILENAME).write_text(info.to_json())
    saved = time.perf_counter()
    result.write_text(json.dumps({
        "build_s": built - started, "load_s": loaded - built, "save_s": saved - loaded,
        "peak_rss_gib_after_load": rss_after_load, "peak_rss_gib": _peak_rss_gib(), "save_cuda_stubbed": stubbed,
    }))  # fmt: skip


def phase_export(ckpt: Path, out: Path, result: Path) -> None:
    from lightning_llama_fp8.hf import export_to_hf

    report = export_to_hf(ckpt, out)
    result.write_text(json.dumps({"export_s": report.seconds, "peak_rss_gib": _peak_rss_gib(),
                                  "weights_source": report.weights_source, "shards": len(report.shards)}))  # fmt: skip


def io_floor(hf_dir: Path, scratch: Path, block: int = 64 << 20) -> dict[str, float]:
    """Seconds to read the Hugging Face shards once, to copy them in the kernel (``shutil.copyfile``), and to copy
    them through user memory (read into a buffer, write from it), measured in the same run and the same page-cache
    state as the conversions: the floors the goal "within 2x of reading plus writing the bytes" is measured
    against."""
    shards = sorted(hf_dir.glob("*.safetensors"))
    buffer = bytearray(block)
    started = time.perf_counter()
    for shard in shards:
        with shard.open("rb", buffering=0) as file:
            while file.readinto(buffer):
                pass
    read_s = time.perf_counter() - started
    scratch.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for shard in shards:
        shutil.copyfile(shard, scratch / shard.name)
    copy_s = time.perf_counter() - started
    shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    copy_user_s = _copy_through_user_space(shards, scratch)
    shutil.rmtree(scratch)
    return {"read_s": read_s, "copy_s": copy_s, "copy_user_space_s": copy_user_s,
            "bytes": sum(shard.stat().st_size for shard in shards)}  # fmt: skip


#: Chunk of the user-space copy. One buffer, reused: the floor charges reading the bytes into user memory and
#: writing them out again, not this VM's slow first touch of fresh pages (an implementation choice an exporter can
#: avoid by reusing memory), and its peak memory stays at one chunk whatever the shard size. A few hundred MiB keeps
#: the number of system calls negligible.
USER_COPY_CHUNK = 256 << 20


def _copy_through_user_space(shards: list[Path], target: Path) -> float:
    """Seconds to copy ``shards`` into ``target`` through a user-space buffer: ``readinto`` then ``write`` of each
    chunk (unbuffered files, so no hidden extra copy through Python's I/O buffers)."""
    buffer = memoryview(bytearray(USER_COPY_CHUNK))
    started = time.perf_counter()
    for shard in shards:
        with shard.open("rb", buffering=0) as source, (target / shard.name).open("wb", buffering=0) as sink:
            while count := source.readinto(buffer):
                written = 0
                while written < count:  # a raw write may be partial
                    written += sink.write(buffer[written:count])
    return time.perf_counter() - started


def _child(*args: str) -> dict[str, Any]:
    result = Path(args[-1])
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.hf_convert", *args], check=True)
    return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - started}


def _machine() -> dict[str, Any]:
    import torch

    memory = None
    if Path("/proc/meminfo").is_file():
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        memory = round(int(first.split()[1]) / 2**20, 1)
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "host_memory_gib": memory,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True, help="scratch space (~2 x model size)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write (hf_convert_8b.json)")
    parser.add_argument("--layers", type=int, default=32, help="32: Llama 3 8B; fewer for a quick try")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    parser.add_argument("--reuse", action="store_true", help="measure only the export, of a --keep run's checkpoint")
    parser.add_argument("--phase", choices=("import", "export"), help=argparse.SUPPRESS)
    parser.add_argument("phase_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "import":
        hf_dir, ckpt, result = map(Path, args.phase_args)
        phase_import(hf_dir, ckpt, args.layers, result)
        return
    if args.phase == "export":
        ckpt, out, result = map(Path, args.phase_args)
        phase_export(ckpt, out, result)
        return

    work = args.work_dir
    hf_dir, ckpt, exported, made = work / "hf", work / "dist.ckpt", work / "exported", work / "made.json"
    base = ["--work-dir", str(work), "--out", str(args.out), "--layers", str(args.layers)]
    if args.reuse:
        previous = json.loads(made.read_text()) if made.is_file() else {}
        if previous.get("layers") != args.layers or not ckpt.is_dir():
            raise SystemExit(f"--reuse: {work} has no --keep run of {args.layers} layers ({previous or 'none'}).")
        model_gib, imported = previous["model_gib"], None
        if exported.exists():
            shutil.rmtree(exported)
    else:
        for path in (hf_dir, ckpt, exported):
            if path.exists():
                shutil.rmtree(path)
        started = time.perf_counter()
        model_gib = make_hf_dir(hf_dir, args.layers)
        made.write_text(json.dumps({"layers": args.layers, "model_gib": model_gib}))
        print(f"wrote the {args.layers}-layer HF model ({model_gib:.2f} GiB) in {time.perf_counter() - started:.0f} s")
        imported = _child(*base, "--phase", "import", str(hf_dir), str(ckpt), str(work / "import.json"))
        print("import:", imported)
    export = _child(*base, "--phase", "export", str(ckpt), str(exported), str(work / "export.json"))
    print("export:", export)
    floor = io_floor(hf_dir, work / "copy")
    print("bytes alone:", floor)
    rows = [] if imported is None else [
        {"direction": "hf_to_ours", "seconds": imported["load_s"], "peak_host_gib": imported["peak_rss_gib_after_load"],
         "model_gib": model_gib, "io_floor_s": floor["read_s"],
         "io_floor": "reading the Hugging Face files",
         "note": "load_hf_weights into a built TP1 GPTModel (CPU); the model itself is "
         f"{model_gib:.1f} GiB of that memory; building it took {imported['build_s']:.1f} s"},
        {"direction": "ours_to_dist_checkpoint", "seconds": imported["save_s"],
         "peak_host_gib": imported["peak_rss_gib"], "model_gib": model_gib, "io_floor_s": None,
         "note": "dist_checkpointing.save of that model (the export's input)"
         + (" with tests/helpers' CPU stubs" if imported["save_cuda_stubbed"] else "")},
    ]  # fmt: skip
    rows.append(
        {"direction": "ours_to_hf", "seconds": export["export_s"], "peak_host_gib": export["peak_rss_gib"],
         "model_gib": model_gib, "io_floor_s": floor["copy_s"],
         "io_floor": "copying the Hugging Face files with shutil.copyfile (reading and writing the same bytes; on "
         "Linux an in-kernel copy: the bytes never enter user memory)",
         "io_floor_user_space_s": floor["copy_user_space_s"],
         "io_floor_user_space": "reading the same files into a user-space buffer and writing them from it to new files "
         f"({USER_COPY_CHUNK >> 20} MiB chunks, one reused buffer)",
         "note": f"export_to_hf, {export['shards']} shards; weights: {export['weights_source']}"},
    )  # fmt: skip
    for row in rows:
        floor_s = row["io_floor_s"]
        row["seconds_over_io_floor"] = row["seconds"] / floor_s if floor_s else None
        if "io_floor_user_space_s" in row:
            row["seconds_over_user_space_floor"] = row["seconds"] / row["io_floor_user_space_s"]
        row["peak_over_model"] = row["peak_host_gib"] / model_gib
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"layers": args.layers, "machine": _machine(), "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
