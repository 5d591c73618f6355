"""Memory a client needs under transport=dist, with and without a 4-bit base (`model.quantize`).

Each party of a run is built (`trainer.build(cfg, role=...)`: data, model, split, adapters) in a
process of its own from the same saved model: the client (its bottom layers read alone from the
saved weights, splitlora.models.load_bottom_layers), the client again with `model.quantize=nf4`
(its segment's linear layers in 4 bits, as QLoRA), once more with `model.quantize_embeddings=true`
(its input embeddings in 4 bits too), and the server (the whole model). Reported per
party: the parameters it holds, the bytes of its segment's weights (what its accelerator holds for
the weights during training: splitlora.memory.side_memory, 4-bit block scales included) and the
peak resident set size of the build.

    python -m bench.client_memory                       # GPT-2 medium shape, cut after block 3
    python -m bench.client_memory --shape llama-1b      # Llama-3.2-1B shape (bfloat16), cut after block 2
    python -m bench.client_memory --shape gpt2-medium --no-quantize   # without the 4-bit rows

The model (random weights) is saved once into --work. Prints a markdown table.
"""
import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# name: (transformers config, dtype, cut, LoRA targets). Llama-3.2-1B's shape: 16 layers, d 2048, MLP 8192,
# 32 heads with 8 KV heads, vocabulary 128256, tied embeddings, shipped in bfloat16.
SHAPES = {
    "gpt2-medium": ({"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16}, "float32", 3, "[c_attn]"),
    "llama-1b": ({"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": True, "max_position_embeddings": 2048}, "bfloat16", 2, "[q_proj,v_proj]"),
}


def _logical_numel(p) -> int:
    """A parameter's element count; for a 4-bit weight, that of the weight it quantized."""
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


def build_party(folder: str, tokenizer: str, role: str, cut: int, quantize, embeddings: bool, targets: str,
                dtype: str) -> dict:
    from splitlora.config import load_config
    from splitlora.memory import side_memory
    from splitlora.trainer import build

    overrides = ["model.config=null", f"model.path={folder}", f"data.tokenizer={tokenizer}",
                 f"model.cut_layer={cut}", f"model.dtype={dtype}", "data.synthetic_examples=64", "data.num_eval=8",
                 "train.clients=2", f"output_dir={Path(folder).parent / 'run'}",
                 f"lora.client.target_modules={targets}", f"lora.server.target_modules={targets}"]
    if quantize:
        overrides += [f"model.quantize={quantize}", "model.quantize_side=client",
                      f"model.quantize_embeddings={str(embeddings).lower()}"]
    setup = build(load_config(None, overrides), log=lambda *_: None, role=role).setup
    real = sum(_logical_numel(p) for seg in (setup.client, setup.server) for p in seg.parameters() if not p.is_meta)
    if setup.base_model is not None:
        real += sum(p.numel() for p in setup.base_model.parameters())
    segment = setup.server if role == "server" else setup.client
    return {"role": role, "quantize": quantize, "embeddings": embeddings, "peak_rss_bytes": _peak_rss_bytes(),
            "parameters_held": real,
            "segment_weights_bytes": side_memory([segment], None, None)["weights_bytes"]}


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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2-medium")
    parser.add_argument("--cut", type=int, default=None, help="cut layer (default: the shape's)")
    parser.add_argument("--quantize", choices=["nf4", "fp4"], default="nf4",
                        help="the 4-bit type of the quantized client's rows (default nf4)")
    parser.add_argument("--no-quantize", action="store_true", help="leave out the 4-bit client rows")
    parser.add_argument("--work", default="runs/client_memory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(build_party(spec["folder"], spec["tokenizer"], spec["role"], spec["cut"], spec["quantize"],
                                     spec["embeddings"], spec["targets"], spec["dtype"])))
        return 0

    import torch

    from splitlora.data import WordTokenizer, load_dataset
    from splitlora.models import load_causal_lm

    model_config, dtype, cut, targets = SHAPES[args.shape]
    cut = args.cut if args.cut is not None else cut
    work = (ROOT / args.work).resolve()
    folder, tokenizer = work / args.shape, work / "words.json"
    if not (folder / "config.json").is_file():
        train, evals = load_dataset("synthetic", num_train=64, num_eval=8, seed=0)
        words = WordTokenizer.from_examples(train + evals)
        work.mkdir(parents=True, exist_ok=True)
        words.save(tokenizer)
        config = dict(model_config)
        config.setdefault("vocab_size", words.vocab_size)
        config.update(bos_token_id=words.eos_id, eos_token_id=words.eos_id)
        print(f"building and saving the {args.shape} model into {folder} ...", flush=True)
        model, _ = load_causal_lm(config=config, dtype=getattr(torch, dtype), seed=0)
        model.save_pretrained(folder)
        del model
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    quantized = [] if args.no_quantize else [("client1", args.quantize, False), ("client1", args.quantize, True)]
    parties = [("client1", None, False)] + quantized + [("server", None, False)]
    rows = []
    for role, quantize, embeddings in parties:
        spec = json.dumps({"folder": str(folder), "tokenizer": str(tokenizer), "role": role, "cut": cut,
                           "quantize": quantize, "embeddings": embeddings, "targets": targets, "dtype": dtype})
        out = subprocess.run([sys.executable, "-m", "bench.client_memory", "--child", spec], cwd=ROOT,
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"building {role} (quantize={quantize}) failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.shape} shape ({json.dumps(model_config)}), {dtype}, cut after block {cut}; saved weights "
          f"{size / 2**20:.1f} MiB; torch {torch.__version__}\n")
    print("| party | base | parameters held | its segment's weights | peak RSS of the build |\n|---|---|---|---|---|")
    for r in rows:
        base = dtype if not r["quantize"] else (f"{r['quantize']} linear layers"
                                                 + (" and embeddings" if r["embeddings"] else ""))
        print(f"| {r['role']} | {base} | {r['parameters_held']:,} | {r['segment_weights_bytes'] / 2**20:,.1f} MiB "
              f"| {r['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    plain = next(r for r in rows if r["role"] == "client1" and not r["quantize"])
    for r in rows:
        if r["quantize"]:
            what = f"{r['quantize']}" + (" with the embeddings too" if r["embeddings"] else "")
            print(f"\nclient segment weights: {plain['segment_weights_bytes'] / r['segment_weights_bytes']:.2f}x "
                  f"smaller, {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
