"""What a 4-bit base costs a real model: the loss of the pretrained SmolLM2-135M-Instruct on 64 E2E
lines (`e2e/valid.txt`, "MR || text", up to 96 tokens, no fine-tuning) with its linear layers in
NF4 or FP4 (splitlora.quantize, as `model.quantize` does): the client's layers at cut 2, every
decoder layer, or the client's layers and its input embedding, against float32.

    python -m bench.quantize_quality --data ../shared/data        # about 3 minutes on one CPU thread

Prints a markdown table (loss, perplexity). Needs the SmolLM2 package (../shared/data/README.md).
"""
import argparse
import copy
import math
import sys
from pathlib import Path

import torch

from splitlora.models import load_causal_lm
from splitlora.quantize import quantizable_embedding_names, quantizable_names, quantize_modules

CUT = 2


def loss_of(model, encoded) -> float:
    """Mean next-token loss over every predicted position of every text."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in encoded:
            predicted = ids.numel() - 1
            total += model(input_ids=ids[None], labels=ids[None]).loss.item() * predicted
            count += predicted
    return total / count


def quantized_copy(model, quant_type: str, *, every_layer: bool, embedding: bool):
    """A copy of `model` with the chosen layers in 4 bits (the rest shared in float32)."""
    copied = copy.deepcopy(model)
    if embedding:
        # The client's segment holds its own copy of the embedding (the split unties it from the head).
        copied.lm_head.weight = torch.nn.Parameter(copied.lm_head.weight.detach().clone(), requires_grad=False)
    names = [n for n in quantizable_names(copied)
             if n.startswith("model.layers.") and (every_layer or int(n.split(".")[2]) < CUT)]
    if embedding:
        assert "model.embed_tokens" in quantizable_embedding_names(copied)
        names.append("model.embed_tokens")
    quantize_modules(copied, names, quant_type, "cpu")
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data", help="the folder holding e2e/valid.txt")
    parser.add_argument("--texts", type=int, default=64)
    args = parser.parse_args(argv)
    valid = Path(args.data) / "e2e" / "valid.txt"
    if not valid.is_file():
        print(f"bench.quantize_quality: {valid} not found; pass --data DIR (the folder holding e2e/)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lines = [line.strip() for line in valid.read_text().splitlines() if line.strip()][:args.texts]
    model, tok = load_causal_lm(name="smollm2-135m")
    model.eval()
    enc = [tok(line.replace("||", " ||"), return_tensors="pt").input_ids[0][:96] for line in lines]
    results = {"float32": loss_of(model, enc)}
    for qt in ("nf4", "fp4"):
        for label, every_layer, embedding in ((f"client layers 0-{CUT - 1} (cut {CUT})", False, False),
                                              (f"client layers 0-{CUT - 1} and the embedding", False, True),
                                              ("every decoder layer", True, False)):
            results[f"{qt}, {label}"] = loss_of(quantized_copy(model, qt, every_layer=every_layer,
                                                               embedding=embedding), enc)
    print("| base | loss | perplexity |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.4f} | {math.exp(v):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
