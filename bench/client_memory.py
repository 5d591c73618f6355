"""Host memory a client process needs to start under transport=dist: the peak resident set size of
building one party of a run, for a client (its bottom layers read alone from the saved weights,
splitlora.models.load_bottom_layers) against the server (the whole model), on the same saved model.

    python -m bench.client_memory                       # GPT-2 medium shape, cut after block 3
    python -m bench.client_memory --layers 12 --d 768   # another GPT-2 shape

The model (random weights, float32) is saved once into --work; each party is built in a process of
its own, so that each peak is that party's alone. Prints a markdown table.
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_party(folder: str, tokenizer: str, role: str, cut: int) -> dict:
    from splitlora.config import load_config
    from splitlora.trainer import build

    cfg = load_config(None, ["model.config=null", f"model.path={folder}", f"data.tokenizer={tokenizer}",
                             f"model.cut_layer={cut}", "data.synthetic_examples=64", "data.num_eval=8",
                             "train.clients=2", f"output_dir={Path(folder).parent / 'run'}"])
    setup = build(cfg, log=lambda *_: None, role=role).setup
    real = sum(p.numel() for seg in (setup.client, setup.server) for p in seg.parameters() if not p.is_meta)
    if setup.base_model is not None:
        real += sum(p.numel() for p in setup.base_model.parameters())
    return {"role": role, "peak_rss_bytes": _peak_rss_bytes(), "parameters_held": real}


def _peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss over fork and exec, so a child would report at least its parent's peak (the parent
    here has just built and saved the whole model)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--cut", type=int, default=3)
    parser.add_argument("--work", default="runs/client_memory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(build_party(spec["folder"], spec["tokenizer"], spec["role"], spec["cut"])))
        return 0

    import torch

    from splitlora.data import WordTokenizer, load_dataset
    from splitlora.models import load_causal_lm

    work = (ROOT / args.work).resolve()
    folder, tokenizer = work / f"gpt2-{args.layers}x{args.d}", work / "words.json"
    if not (folder / "config.json").is_file():
        train, evals = load_dataset("synthetic", num_train=64, num_eval=8, seed=0)
        words = WordTokenizer.from_examples(train + evals)
        work.mkdir(parents=True, exist_ok=True)
        words.save(tokenizer)
        model, _ = load_causal_lm(config={"model_type": "gpt2", "n_layer": args.layers, "n_embd": args.d,
                                          "n_head": max(1, args.d // 64), "vocab_size": words.vocab_size,
                                          "bos_token_id": words.eos_id, "eos_token_id": words.eos_id}, seed=0)
        model.save_pretrained(folder)
        del model
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    rows = []
    for role in ("client1", "server"):
        spec = json.dumps({"folder": str(folder), "tokenizer": str(tokenizer), "role": role, "cut": args.cut})
        out = subprocess.run([sys.executable, "-m", "bench.client_memory", "--child", spec], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"GPT-2 shape, {args.layers} layers, d {args.d}, cut after block {args.cut}; saved weights "
          f"{size / 2**20:.1f} MiB (float32); torch {torch.__version__}\n")
    print("| party | parameters held | peak RSS of the build |\n|---|---|---|")
    for r in rows:
        print(f"| {r['role']} | {r['parameters_held']:,} | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
