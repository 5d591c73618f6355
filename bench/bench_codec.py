"""Throughput of the smashed-data codec against the plain-torch reference and a plain copy.

    python -m bench.bench_codec [--size-mib 64] [--device cpu|cuda] [--out DIR]

For each dtype (bf16, fp32) and bit width (8, 4, 2, 16) it times, in the same run and on the same
activation-like tensor (normal, per-row scale): compress and decompress through the public API
(`ext`: whichever compiled backend serves the device), the plain-torch kernels of
`splitlora.codec_reference` (`torch`), and the baselines `clone()` and a copy into a preallocated
tensor (`copy_`, the device-to-device copy on CUDA). On CUDA it also times the bare ops
(`ext-op`: the kernels without the host sync the public API needs to raise on NaN/Inf or bad
scales), and for 16-bit inputs the lean compress path of the CUDA kernels
(`ext-lean16`, `ext-op-lean16`: SPLITLORA_CODEC_LEAN16=1, not yet the default; its packets are
compared with the reference's too). Times are medians (CUDA events on GPU, perf_counter on CPU).

On CUDA every case is timed two ways: one call between two events (`median ms`: what one call
costs from the moment the host issues it, launch gaps and host work included), and `--stream`
back-to-back calls between two events (`stream ms`, per call: the GPU throughput, where the host
work of one call overlaps the kernels of the previous ones; for the public API, which
synchronises inside every call, the two agree). Each way has its own `% copy_`, against copy_
timed the same way.

On CUDA it then times the host side of one call on a 4 KiB tensor (`--no-host-latency` to skip):
the launch and synchronisation round trips that a call pays whatever the tensor size.

Columns: GB/s of input (the tensor's bytes over the time), effective GB/s (bytes read + written),
that as % of copy_'s effective GB/s, speed-up over the torch reference and over clone(), and the
packet size over the input size. Prints a markdown table and writes codec_<device>.csv to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from splitlora import codec, codec_reference

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for the machine line of a benchmark."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Timer:
    def __init__(self, device: torch.device, reps: int, warmup: int, stream_calls: int = 10):
        self.device, self.reps, self.warmup, self.stream_calls = device, reps, warmup, stream_calls

    def __call__(self, fn, reps=None, calls=1) -> float:
        """Median seconds per fn() call over reps samples of `calls` back-to-back calls (after warmup)."""
        reps = reps or self.reps
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / calls)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) / calls)
        return statistics.median(times)

    def both(self, fn):
        """(one call per sample, back-to-back calls per sample) on CUDA; (t, nan) elsewhere."""
        one = self(fn)
        if self.device.type != "cuda":
            return one, float("nan")
        return one, self(fn, reps=max(3, self.reps // 2), calls=self.stream_calls)


@contextlib.contextmanager
def lean16_path():
    """Compress 16-bit inputs on the CUDA kernels' lean path (SPLITLORA_CODEC_LEAN16=1) inside."""
    before = os.environ.get("SPLITLORA_CODEC_LEAN16")
    os.environ["SPLITLORA_CODEC_LEAN16"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["SPLITLORA_CODEC_LEAN16"]
        else:
            os.environ["SPLITLORA_CODEC_LEAN16"] = before


def run(size_mib: int, device: torch.device, bits_list, dtypes, group_size: int, reps: int, ref_reps: int,
        stream_calls: int = 10):
    timer = Timer(device, reps, warmup=3 if device.type == "cuda" else 1, stream_calls=stream_calls)
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
        t_clone = timer.both(lambda: x.clone())
        t_copy = timer.both(lambda: out.copy_(x))

        def add(op, backend, bits, seconds, moved, packet_bytes, t_ref=None, same=""):
            if not isinstance(seconds, tuple):
                seconds = (seconds, float("nan"))
            one, stream = seconds
            eff = moved / one
            rows.append({
                "device": device.type, "dtype": dname, "bits": bits, "op": op, "backend": backend,
                "median_ms": one * 1e3, "input_GBps": nbytes / one / 1e9, "effective_GBps": eff / 1e9,
                "pct_of_copy": 100 * eff / (2 * nbytes / t_copy[0]),
                "stream_ms": stream * 1e3,
                "stream_effective_GBps": moved / stream / 1e9,
                "stream_pct_of_copy": 100 * (moved / stream) / (2 * nbytes / t_copy[1]),
                "x_vs_torch": (t_ref / one) if t_ref else float("nan"),
                "x_vs_clone": t_clone[0] / one,
                "packet_ratio": packet_bytes / nbytes if packet_bytes else float("nan"),
                "same_packet": same,
            })
            r = rows[-1]
            print(f"#  {dname} {bits} {op} {backend}: {one * 1e3:.3f} ms ({r['pct_of_copy']:.0f}% of copy_), "
                  f"stream {stream * 1e3:.3f} ms ({r['stream_pct_of_copy']:.0f}%)", file=sys.stderr, flush=True)

        add("clone", "torch", "-", t_clone, 2 * nbytes, None)
        add("copy_", "torch", "-", t_copy, 2 * nbytes, None)
        for bits in bits_list:
            modes = [False] if bits == 16 else [False, True]
            for stochastic in modes:
                op = "compress-sr" if stochastic else "compress"
                ref_seconds = None

                gen = torch.Generator().manual_seed(1)  # one stream's generator, made once

                def ext_compress():
                    return codec.compress(x, bits, group_size, stochastic=stochastic, generator=gen)

                def ref_compress():
                    return codec._compress(x, bits, group_size, stochastic, torch.Generator().manual_seed(1),
                                           kernel=codec_reference.compress_kernel)

                packet = codec.compress(x, bits, group_size, stochastic=stochastic,
                                        generator=torch.Generator().manual_seed(1))
                ref_packet = ref_compress()
                same = "yes" if torch.equal(packet, ref_packet) else "NO"
                del ref_packet
                pbytes = packet.numel()
                ref_seconds = timer(ref_compress, reps=ref_reps)
                add(op, "torch", bits, ref_seconds, nbytes + pbytes, pbytes)
                add(op, ext_name, bits, timer.both(ext_compress), nbytes + pbytes, pbytes, ref_seconds, same)
                if device.type == "cuda":
                    header = list(codec._build_header(dtype, tuple(x.shape), bits, group_size, stochastic))
                    add(op, f"{ext_name}-op", bits,
                        timer.both(lambda: torch.ops.splitlora.compress(x, header, bits, group_size, stochastic, 12345)),
                        nbytes + pbytes, pbytes, ref_seconds, same)
                    if bits != 16 and elem == 2:
                        # The lean compress path for 16-bit inputs (csrc/codec_cuda.cu), same run.
                        with lean16_path():
                            lean_packet = codec.compress(x, bits, group_size, stochastic=stochastic,
                                                         generator=torch.Generator().manual_seed(1))
                            lean_same = "yes" if same == "yes" and torch.equal(lean_packet, packet) else "NO"
                            del lean_packet
                            add(op, f"{ext_name}-lean16", bits, timer.both(ext_compress), nbytes + pbytes, pbytes,
                                ref_seconds, lean_same)
                            add(op, f"{ext_name}-op-lean16", bits,
                                timer.both(lambda: torch.ops.splitlora.compress(x, header, bits, group_size,
                                                                                stochastic, 12345)),
                                nbytes + pbytes, pbytes, ref_seconds, lean_same)
                if stochastic:
                    continue
                info = codec.packet_info(packet)
                ref_dec = lambda: codec._decode(packet, info, kernel=codec_reference.decompress_kernel)  # noqa: E731
                same = "yes" if torch.equal(codec.decompress(packet), ref_dec()) else "NO"
                ref_seconds = timer(ref_dec, reps=ref_reps)
                add("decompress", "torch", bits, ref_seconds, nbytes + pbytes, pbytes)
                add("decompress", ext_name, bits, timer.both(lambda: codec.decompress(packet)), nbytes + pbytes,
                    pbytes, ref_seconds, same)
                if device.type == "cuda":
                    shape = list(x.shape)
                    add("decompress", f"{ext_name}-op", bits,
                        timer.both(lambda: torch.ops.splitlora.decompress(packet, dtype, shape, bits, group_size)),
                        nbytes + pbytes, pbytes, ref_seconds, same)
                del packet
        del x, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def host_latency(device: torch.device, calls: int = 300) -> list[dict]:
    """Wall time per call on a 4 KiB tensor (the kernels take ~nothing): what one call costs the
    host, round trips to the GPU included. Median of `calls` calls, perf_counter."""
    from splitlora import _ops

    x = torch.randn(1024, device=device)
    out = torch.empty_like(x)
    packet = codec.compress(x, 8, 64)
    info = codec.packet_info(packet)
    header = list(codec._build_header(x.dtype, tuple(x.shape), 8, 64, False))
    header_hex = codec._header_hex(x.dtype, tuple(x.shape), 8, 64, False)
    sync = torch.cuda.synchronize
    cases = [
        ("torch.cuda.synchronize() (idle)", sync),
        ("copy_ + synchronize (1 launch, 1 round trip)", lambda: (out.copy_(x), sync())),
        ("copy_ + .item() (1 launch + D2H copy)", lambda: out.copy_(x)[0].item()),
        ("compress op + flag.item() (before: public path)", lambda: _ops.compress(x, header, 8, 64, False, 0)[1].item()),
        ("_compress_sync op (kernel + sync)", lambda: _ops.compress_sync(x, header_hex, 8, 64, False, 0)),
        ("codec.compress (public)", lambda: codec.compress(x, 8, 64)),
        ("packet[:96].cpu() (before: header read)", lambda: packet[:96].cpu()),
        ("_packet_header op (pinned copy + sync)", lambda: _ops.packet_header(packet)),
        ("decompress op + flag.item()", lambda: _ops.decompress(packet, x.dtype, [1024], 8, 64)[1].item()),
        ("_decompress_sync op (kernel + sync)", lambda: _ops.decompress_sync(packet, x.dtype, [1024], 8, 64)),
        ("codec.decompress (public: header + kernel)", lambda: codec.decompress(packet)),
    ]
    rows = []
    for name, fn in cases:
        for _ in range(20):
            fn()
        sync()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append({"call": name, "median_us": statistics.median(times) * 1e6})
    del info
    return rows


def _fmt(v, spec):
    if isinstance(v, float):
        return "-" if math.isnan(v) else format(v, spec)
    return str(v)


def markdown(rows) -> str:
    head = ["dtype", "bits", "op", "backend", "median ms", "GB/s in", "eff GB/s", "% copy_", "x torch", "x clone",
            "packet/in", "same packet"]
    keys = [("dtype", ""), ("bits", ""), ("op", ""), ("backend", ""), ("median_ms", ".3f"), ("input_GBps", ".2f"),
            ("effective_GBps", ".1f"), ("pct_of_copy", ".0f"), ("x_vs_torch", ".1f"), ("x_vs_clone", ".2f"),
            ("packet_ratio", ".3f"), ("same_packet", "")]
    if rows and not math.isnan(rows[0]["stream_ms"]):
        head[8:8] = ["stream ms", "stream eff GB/s", "stream % copy_"]
        keys[8:8] = [("stream_ms", ".3f"), ("stream_effective_GBps", ".1f"), ("stream_pct_of_copy", ".0f")]
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
    parser.add_argument("--host-latency", action=argparse.BooleanOptionalAction, default=True,
                        help="on CUDA, also time the host side of one call on a tiny tensor (default on)")
    parser.add_argument("--stream", type=int, default=10,
                        help="back-to-back calls per sample of the second timing on CUDA (default 10)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    device = torch.device(args.device)
    reps = args.reps or (50 if device.type == "cuda" else 7)
    ref_reps = 10 if device.type == "cuda" else 3
    bits_list = [int(b) for b in args.bits.split(",")]
    dtypes = args.dtypes.split(",")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# codec benchmark: {machine}; torch {torch.__version__}; {stamp}")
    print(f"# {args.size_mib} MiB per tensor, group_size {args.group_size}, backend {codec.backend_for(device)}, "
          f"threads {torch.get_num_threads()}, reps {reps} (torch reference {ref_reps})")
    rows = run(args.size_mib, device, bits_list, dtypes, args.group_size, reps, ref_reps, args.stream)
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
    if device.type == "cuda" and args.host_latency:
        lat = host_latency(device)
        print("\n# host time per call, 4 KiB float32 tensor (median of 300, perf_counter)\n")
        print("| call | median us |\n|---|---|")
        for r in lat:
            print(f"| {r['call']} | {r['median_us']:.1f} |")
        with (out / "codec_cuda_latency.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(lat[0]))
            writer.writeheader()
            writer.writerows(lat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
