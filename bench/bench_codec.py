"""Throughput of the smashed-data codec against the plain-torch reference and a plain copy.

    python -m bench.bench_codec [--size-mib 64] [--device cpu|cuda] [--out DIR]

For each dtype (bf16, fp32) and bit width (8, 4, 2, 16) it times, in the same run and on the same
activation-like tensor (normal, per-row scale): compress and decompress through the public API
(`ext`: whichever compiled backend serves the device), the plain-torch kernels of
`splitlora.codec_reference` (`torch`), and the baselines `clone()` and a copy into a preallocated
tensor (`copy_`, the device-to-device copy on CUDA). On CUDA it also times the bare ops
(`ext-op`: the kernels without the host sync the public API needs to raise on NaN/Inf or bad
scales). Times are medians (CUDA events on GPU, perf_counter on CPU).

Columns: GB/s of input (the tensor's bytes over the time), effective GB/s (bytes read + written),
that as % of copy_'s effective GB/s, speed-up over the torch reference and over clone(), and the
packet size over the input size. Prints a markdown table and writes codec_<device>.csv to --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from splitlora import codec, codec_reference

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn, reps=None) -> float:
        """Median seconds of fn() over reps calls (after warmup calls)."""
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def run(size_mib: int, device: torch.device, bits_list, dtypes, group_size: int, reps: int, ref_reps: int):
    timer = Timer(device, reps, warmup=3 if device.type == "cuda" else 1)
    rows = []
    ext_name = codec.backend_for(device)
    for dname in dtypes:
        dtype = DTYPES[dname]
        elem = torch.empty((), dtype=dtype).element_size()
        numel = size_mib * 2**20 // elem
        cols = 4096
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(numel // cols, cols, device=device, generator=gen)
        x = (x * torch.exp(torch.randn(numel // cols, 1, device=device, generator=gen))).to(dtype)
        nbytes = x.numel() * elem
        out = torch.empty_like(x)
        t_clone = timer(lambda: x.clone())
        t_copy = timer(lambda: out.copy_(x))
        copy_eff = 2 * nbytes / t_copy

        def add(op, backend, bits, seconds, moved, packet_bytes, t_ref=None, same=""):
            eff = moved / seconds
            rows.append({
                "device": device.type, "dtype": dname, "bits": bits, "op": op, "backend": backend,
                "median_ms": seconds * 1e3, "input_GBps": nbytes / seconds / 1e9, "effective_GBps": eff / 1e9,
                "pct_of_copy": 100 * eff / copy_eff,
                "x_vs_torch": (t_ref / seconds) if t_ref else float("nan"),
                "x_vs_clone": t_clone / seconds,
                "packet_ratio": packet_bytes / nbytes if packet_bytes else float("nan"),
                "same_packet": same,
            })

        add("clone", "torch", "-", t_clone, 2 * nbytes, None)
        add("copy_", "torch", "-", t_copy, 2 * nbytes, None)
        for bits in bits_list:
            modes = [False] if bits == 16 else [False, True]
            for stochastic in modes:
                op = "compress-sr" if stochastic else "compress"
                ref_seconds = None

                def ext_compress():
                    return codec.compress(x, bits, group_size, stochastic=stochastic, generator=torch.Generator().manual_seed(1))

                def ref_compress():
                    return codec._compress(x, bits, group_size, stochastic, torch.Generator().manual_seed(1),
                                           kernel=codec_reference.compress_kernel)

                packet = ext_compress()
                ref_packet = ref_compress()
                same = "yes" if torch.equal(packet, ref_packet) else "NO"
                del ref_packet
                pbytes = packet.numel()
                ref_seconds = timer(ref_compress, reps=ref_reps)
                add(op, "torch", bits, ref_seconds, nbytes + pbytes, pbytes)
                add(op, ext_name, bits, timer(ext_compress), nbytes + pbytes, pbytes, ref_seconds, same)
                if device.type == "cuda":
                    header = list(codec._build_header(dtype, tuple(x.shape), bits, group_size, stochastic))
                    add(op, f"{ext_name}-op", bits,
                        timer(lambda: torch.ops.splitlora.compress(x, header, bits, group_size, stochastic, 12345)),
                        nbytes + pbytes, pbytes, ref_seconds, same)
                if stochastic:
                    continue
                info = codec.packet_info(packet)
                ref_dec = lambda: codec._decode(packet, info, kernel=codec_reference.decompress_kernel)  # noqa: E731
                same = "yes" if torch.equal(codec.decompress(packet), ref_dec()) else "NO"
                ref_seconds = timer(ref_dec, reps=ref_reps)
                add("decompress", "torch", bits, ref_seconds, nbytes + pbytes, pbytes)
                add("decompress", ext_name, bits, timer(lambda: codec.decompress(packet)), nbytes + pbytes, pbytes,
                    ref_seconds, same)
                if device.type == "cuda":
                    shape = list(x.shape)
                    add("decompress", f"{ext_name}-op", bits,
                        timer(lambda: torch.ops.splitlora.decompress(packet, dtype, shape, bits, group_size)),
                        nbytes + pbytes, pbytes, ref_seconds, same)
                del packet
        del x, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _fmt(v, spec):
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, spec)
    return str(v)


def markdown(rows) -> str:
    head = ["dtype", "bits", "op", "backend", "median ms", "GB/s in", "eff GB/s", "% copy_", "x torch", "x clone",
            "packet/in", "same packet"]
    keys = [("dtype", ""), ("bits", ""), ("op", ""), ("backend", ""), ("median_ms", ".2f"), ("input_GBps", ".2f"),
            ("effective_GBps", ".1f"), ("pct_of_copy", ".0f"), ("x_vs_torch", ".1f"), ("x_vs_clone", ".2f"),
            ("packet_ratio", ".3f"), ("same_packet", "")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k], s) for k, s in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=64, help="input tensor size in MiB (default 64)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="runs/bench_codec", help="folder for the CSV (default runs/bench_codec)")
    parser.add_argument("--bits", default="8,4,2,16")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7 on CPU, 50 on CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    device = torch.device(args.device)
    reps = args.reps or (50 if device.type == "cuda" else 7)
    ref_reps = 10 if device.type == "cuda" else 3
    bits_list = [int(b) for b in args.bits.split(",")]
    dtypes = args.dtypes.split(",")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{_cpu_model()}, {os.cpu_count()} cores"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# codec benchmark: {machine}; torch {torch.__version__}; {stamp}")
    print(f"# {args.size_mib} MiB per tensor, group_size {args.group_size}, backend {codec.backend_for(device)}, "
          f"threads {torch.get_num_threads()}, reps {reps} (torch reference {ref_reps})")
    rows = run(args.size_mib, device, bits_list, dtypes, args.group_size, reps, ref_reps)
    print(markdown(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"codec_{device.type}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"codec_{device.type}.md").write_text(
        f"{machine}; torch {torch.__version__}; {stamp}\n\n{markdown(rows)}\n"
    )
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
