"""The stream path's teacher cache at ImageNet size: memory-mapped files read by sample index, against the
memory path's safetensors file loaded whole (what a user gets without the mapped format).

    python scripts/bench_teacher_cache.py --dir /tmp/cache_bench --json bench_teacher_cache.json

Writes one synthetic cache of `--samples` x `--classes` logits (default 1,281,167 x 1,000: ImageNet's
training set) in `--dtype` (default float16, 2.56 GB) in both formats: `MappedWriter` (.npy + JSON
sidecar) and `TeacherCache.save` (one safetensors file). Then, each in a fresh process: open the cache
(`TeacherCache.load_mapped`, which checks every file's sha256 in chunks, or `TeacherCache.load`, which
reads the file whole and checks its digest) and look up `--batches` batches of `--batch-size` random
sample indices, as training does. Reported per format: the seconds to open, the process's resident
memory before and after opening and after the lookups (its own, RssAnon, and mapped file pages,
RssFile), its peak (VmHWM), and the median milliseconds of one batch's lookup. The first open after
writing reads the files from the page cache (this script just wrote them): a cold disk adds its read
time to both formats' open.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> dict[str, float]:
    """The process's resident memory in MB: its own (RssAnon: copies it holds) and file pages mapped in
    (RssFile: the page cache's pages of mapped files, shared with other processes and dropped under memory
    pressure), and the peak of both together (VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile", "VmHWM")}


def write(folder: Path, samples: int, classes: int, dtype: torch.dtype) -> dict[str, str]:
    from kdtrain.teacher_cache import MappedWriter, TeacherCache, cache_file, mapped_file

    key = "0" * 64
    identity = {"inputs": {"n": samples}, "topk": None}
    sidecar = mapped_file(folder, key)
    writer = MappedWriter(sidecar)
    logits = writer("logits", (samples, classes), dtype)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, samples, 65536):  # in chunks, so the whole cache is never in memory
        rows = min(65536, samples - start)
        logits[start : start + rows] = (4 * torch.randn(rows, classes, generator=gen)).to(dtype)
    cache = TeacherCache(num_classes=classes, key=key, identity=identity, logits=logits)
    writer.commit(cache)
    whole = cache_file(folder, key)
    cache.save(whole)  # the memory path's format (safetensors writes the file from the mapped tensor)
    return {"mapped": str(sidecar), "whole": str(whole), "key": key}


def measure(kind: str, path: str, key: str, batches: int, batch_size: int) -> dict[str, float]:
    from kdtrain.teacher_cache import TeacherCache

    before = rss_mb()
    start = time.perf_counter()
    cache = TeacherCache.load_mapped(Path(path), key) if kind == "mapped" else TeacherCache.load(Path(path), "cpu", key)
    opened = time.perf_counter() - start
    after_open = rss_mb()
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(batches):
        idx = torch.randint(0, cache.rows, (batch_size,), generator=gen)
        start = time.perf_counter()
        logits, _ = cache.lookup(idx)
        times.append(time.perf_counter() - start)
    assert logits.shape == (batch_size, cache.num_classes)
    mem = rss_mb()
    return {
        "open_s": round(opened, 2),
        **{
            f"{k}_mb_{when}": round(m[k])
            for when, m in (("before", before), ("opened", after_open), ("after", mem))
            for k in ("RssAnon", "RssFile")
        },
        "peak_rss_mb": round(mem["VmHWM"]),
        "lookup_ms_median": round(1000 * statistics.median(times), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="where the two caches are written (removed after)")
    p.add_argument("--samples", type=int, default=1_281_167)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--measure", nargs=3, metavar=("KIND", "PATH", "KEY"), help=argparse.SUPPRESS)  # the child
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batches, args.batch_size)))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        files = write(args.dir, args.samples, args.classes, getattr(torch, args.dtype))
        result = {
            "samples": args.samples,
            "classes": args.classes,
            "dtype": args.dtype,
            "cache_mb": round(Path(files["whole"]).stat().st_size / 2**20),
            "write_both_s": round(time.perf_counter() - start, 1),
        }
        for kind in ("mapped", "whole"):
            child = [sys.executable, __file__, "--dir", str(args.dir), "--batches", str(args.batches)]
            child += ["--batch-size", str(args.batch_size), "--measure", kind, files[kind], files["key"]]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            result[kind] = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
