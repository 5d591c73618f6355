"""What a curious server reconstructs of a client's text from what split fine-tuning sends it.

    python -m bench.privacy --model demo --report            # the demo model (a few minutes)
    python -m bench.privacy --model smollm2 --report         # SmolLM2-135M, cuts 1, 2, 4, 8 (~20 minutes)
    python -m bench.privacy --model demo --train-utility     # the demo fine-tuned under each defence (trainer)
    python -m bench.privacy --model smollm2 --merge --noise 0.003,0.1 --codec '' --opt-defences ''
                                                             # more settings added to the recorded run
    python -m bench.privacy --model demo --quick             # smoke size, into runs/privacy-quick
    python -m bench.privacy --report-only                    # rewrite the RESULTS.md section from the JSON
    python -m bench.privacy --run RUN_DIR --public FILE [--cuts 2,4] [--noise 0.01,1] [--quick]
                                                             # your own finished `splitlora train` run

The server sees the activations at the cut (after the client's defence), the padding mask, the
labels in the plain variant (the input tokens on the completion positions, in clear), and the
client adapters (so it can run the client's bottom layers itself: here the bottom of the model the
client actually holds). Per cut layer and defence setting it runs the two attacks of
`bench.privacy_attacks` on the client's private texts and scores token accuracy and ROUGE-L of the
reconstruction; beside them the utility of the same setting: held-out next-token loss (and, for the
demo model, BLEU of greedy generation) of the split model with the defence applied at the cut.

Data. demo: the demo's own model and data (`splitlora demo`'s config, fp32 at the cut, trained
here once with the trainer into `--out/demo-model`, then merged): private = its training records,
utility = its held-out records, public = other synthetic texts (seed 1000) whose meaning
representations are in neither. smollm2: the pretrained SmolLM2-135M-Instruct as loaded (no
fine-tune), private = lines of e2e/valid.txt (what the quality runs train on), public = lines of
e2e/test.txt, utility = other lines of e2e/test.txt; valid and test share no meaning
representation, and the public and utility lines share none either.

Your own run (`--run RUN_DIR --public FILE`): RUN_DIR is the output_dir of a finished `splitlora
train` run of a strategy with a cut (splitlora, sl, hsplitlora), read as `splitlora eval` reads it
(config.yaml and the last checkpoint: the model of model.name / path / config, the tokenizer, the
data files, model.cut_layer and train.u_shape). Attacked at the run's cut: its client segment with
its global client adapters; at any other `--cuts`: the base model's bottom layers, without adapters
(said so in the notes). Private: the run's first training records, rendered as the trainer renders
them (prompt/completion, chat template, text; data.max_length); public: the records of FILE (any
format the data readers accept, detected; refused if one of them has the text of a training
record); utility: the held-out loss of the run's model (both sides' adapters) with the defence at
the cut, on the run's evaluation records; no BLEU unless --bleu-sources. Results into --out
(default runs/privacy-run/<run name>): results_run.json and the table in privacy.md (printed too);
nothing goes to RESULTS.md. A folder that is not a run, a strategy with no cut, a missing or
unreadable --public: one line on stderr, exit status 2. In the U-shaped variant the server gets no
labels: the labels + inversion column is left empty.

Defences: `none`; `noiseX`: per-example L2 clip (to the median per-example norm of the public
activations at that cut) then Gaussian noise of std X * clip per element
(splitlora.privacy.clip_and_noise); `int8`, `int4`: the codec's quantization round trip.
The inversion attacker knows the setting and trains on public activations with it applied.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.privacy_attacks import (Defence, InversionAttack, clip_and_noise_impl, example_norms,
                                   optimisation_attack, rouge_l_ids, token_accuracy, token_embedding)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
PLOTS = ROOT / "bench" / "plots"
BEGIN, END = "<!-- privacy:begin -->", "<!-- privacy:end -->"

# Per model: the defaults of every size knob (--quick shrinks them).
SIZES = {
    "demo": dict(cuts="1,2,3", noise="0.001,0.01,0.03,0.1,0.3,1", codec="8,4", private=64, public=600,
                 utility=200, bleu_sources=20, max_length=64, epochs=20, hidden=256, opt_texts=16,
                 opt_steps=150, opt_lr=0.05, opt_defences="none,noise0.01,noise0.1,int4", negatives=4096,
                 threads=1),
    "smollm2": dict(cuts="1,2,4,8", noise="0.001,0.01,1", codec="8,4", private=32, public=160,
                    utility=16, bleu_sources=0, max_length=64, epochs=6, hidden=256, opt_texts=4,
                    opt_steps=100, opt_lr=1.0, opt_defences="none,noise0.001", negatives=1024, threads=1),
}
# --run (the user's own run): its cut only unless --cuts adds more; no BLEU unless asked; torch's
# own thread count (threads 0); max_length is the run's data.max_length.
SIZES["run"] = dict(cuts="", noise="0.001,0.01,0.1,1", codec="8,4", private=32, public=400, utility=32,
                    bleu_sources=0, max_length=None, epochs=6, hidden=256, opt_texts=4, opt_steps=100,
                    opt_lr=0.1, opt_defences="none,noise0.01", negatives=1024, threads=0)
QUICK = dict(private=8, public=40, utility=8, bleu_sources=2, epochs=2, opt_texts=2, opt_steps=5,
             noise="0.01,1", codec="8", opt_defences="none")


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


def _data_dir(args) -> Path:
    return Path(args.data or os.environ.get("SPLITLORA_DATA") or ROOT.parent / "shared" / "data")


def run_model(run_dir):
    """(built, model, step) of a trainer run: `splitlora.trainer.load_run` (config and last
    checkpoint, as `splitlora eval` and `export` read a run) and the whole model with the run's
    global adapters (client and server; what `export_adapter` writes to adapter/), eval mode."""
    from splitlora.adapters import whole_model_with_adapters
    from splitlora.trainer import load_run

    built, strategy, step = load_run(run_dir, log=lambda *_: None)
    # The adapters stay beside their base layers (not merged: the demo's LoRA on the LM head would,
    # merged, change the token embedding tied to it).
    plans, state = strategy.export_state()
    model = whole_model_with_adapters(built.setup.base_model, plans, state).eval()
    return built, model, step


def _demo_setting(args, log):
    """(model, tokenizer, private, public, utility datasets, utility generation items, notes)."""
    from splitlora import config as config_mod
    from splitlora.data import synthetic_examples
    from splitlora.data.records import encode_records, examples_to_records
    from splitlora.trainer import train

    run = Path(args.out) / "demo-model"
    if not (run / "adapter").is_dir():
        cfg = config_mod.load_config(None, [f"output_dir={run}", "codec.bits=32", "eval.generate=false",
                                            "overwrite=true"])
        log(f"training the demo model once (splitlora demo's config, fp32 at the cut) into {run}")
        train(cfg, progress=False, log=lambda *_: None)
    built, model, _ = run_model(run)
    cfg = built.cfg
    tok = built.tokenizer
    seen = {r.key for r in built.train_records + built.eval_records}
    public_ex = [e for e in synthetic_examples(args.public * 3, seed=1000) if e.source not in seen][:args.public]
    public, _ = encode_records(examples_to_records(public_ex), tok, args.max_length)
    private = built.train_data.subset(range(min(args.private, len(built.train_data))))
    utility = built.eval_data.subset(range(min(args.utility, len(built.eval_data))))
    notes = [f"demo model: `splitlora demo`'s config (GPT-2 shape, 4 layers, d 64, random base weights, word "
             f"tokenizer of {tok.vocab_size} tokens), LoRA fine-tuned {cfg.train.steps} steps with fp32 at the "
             f"cut (its held-out loss {json.loads((run / 'summary.json').read_text()).get('eval_loss', float('nan')):.3f}"
             f" in the trainer's evaluation); the attacks target its bottom layers with the client adapters",
             "private: the first training records of the demo data; public: synthetic texts of another seed "
             "(1000) with no meaning representation in the demo's training or held-out data; utility: the "
             "demo's held-out records"]
    return model, tok, private, public, utility, built.eval_items, built.stop_ids, notes


def _smollm2_setting(args, log):
    from splitlora.data import HFTokenizer, read_e2e
    from splitlora.data.records import encode_records, examples_to_records
    from splitlora.models import load_causal_lm

    data = _data_dir(args) / "e2e"
    if not data.is_dir():
        raise SystemExit(f"E2E data not found at {data}: pass --data or set SPLITLORA_DATA")
    model, hf_tok = load_causal_lm(name="smollm2-135m")
    tok = HFTokenizer(hf_tok)
    valid, test = read_e2e(data / "valid.txt"), read_e2e(data / "test.txt")
    rng = random.Random(args.seed)
    private_ex = rng.sample(valid, args.private)
    sources = sorted({e.source for e in test})
    rng.shuffle(sources)
    half = len(sources) // 2
    public_src, utility_src = set(sources[:half]), set(sources[half:])
    public_ex = [e for e in test if e.source in public_src]
    utility_ex = [e for e in test if e.source in utility_src]
    public_ex = rng.sample(public_ex, min(args.public, len(public_ex)))
    utility_ex = rng.sample(utility_ex, min(args.utility, len(utility_ex)))
    assert not {e.source for e in private_ex} & {e.source for e in public_ex}
    enc = lambda ex: encode_records(examples_to_records(ex), tok, args.max_length)[0]  # noqa: E731
    notes = ["model: SmolLM2-135M-Instruct as loaded (pretrained, not fine-tuned: the attack targets the base "
             "bottom layers a client starts from)",
             f"private: {args.private} random lines of e2e/valid.txt; public: {len(public_ex)} lines of "
             f"e2e/test.txt (half of its meaning representations); utility: {len(utility_ex)} lines of the other "
             "half; valid.txt and test.txt share no meaning representation",
             f"sequences: prompt `MR ||` then ` text` and eos, SmolLM2 tokens, cut to {args.max_length}"]
    return model, tok, enc(private_ex), enc(public_ex), enc(utility_ex), [], (), notes


# Strategies with a cut (activations cross to a server); centralized, fedlora and fedcybgd have none.
CUT_STRATEGIES = ("splitlora", "sl", "hsplitlora")
# --public FILE: its data.source from its name (else the run's own file format).
PUBLIC_SOURCES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "e2e"}


class RunError(Exception):
    """A --run problem for the user to fix: printed as one line, exit status 2."""


def _one_line(err) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def record_text(record) -> str:
    """A record's text, whitespace-normalised, whatever its format (what --public's disjointness
    check compares): prompt and completion, the chat messages' contents, or the text."""
    from splitlora.data.records import Chat, PromptCompletion

    if isinstance(record, PromptCompletion):
        text = f"{record.prompt} {record.completion}"
    elif isinstance(record, Chat):
        text = " ".join(content for _, content in record.messages)
    else:
        text = record.text
    return " ".join(text.split())


def public_records(d, path, seed) -> list:
    """The records of --public FILE, read by the project's data readers (splitlora.data.loading)
    with the run's data keys (prompt_key, ...), its format detected."""
    import dataclasses

    from splitlora.data.formats import FILE_FORMATS
    from splitlora.data.loading import load_records

    path = Path(path)
    if not path.exists():
        raise RunError(f"--public: no such file {str(path)!r}")
    if path.is_dir():
        source = "hf_disk"
    elif path.suffix.lower() in PUBLIC_SOURCES:
        source = PUBLIC_SOURCES[path.suffix.lower()]
    elif d.source in FILE_FORMATS:
        source = d.source
    else:
        raise RunError(f"--public: cannot tell the format of {str(path)!r} from its name; use .jsonl, .json, "
                       ".csv, .parquet, .txt (E2E) or a Dataset.save_to_disk folder")
    # The whole file as training records (eval_path set: nothing held out, nothing sampled).
    pd = dataclasses.replace(d, source=source, train_path=str(path), eval_path=str(path), format=None,
                             num_train=None, num_eval=None, client_key=None, client_paths=None)
    try:
        return load_records(pd, clients=1, seed=seed).train
    except (ValueError, OSError) as err:
        raise RunError(_one_line(err).replace("data.train_path", "--public").replace("data.eval_path", "--public")
                       ) from None


def _run_setting(args, log) -> dict:
    """--run: the user's own finished run, its private texts, --public's texts, its held-out data."""
    from splitlora import config as config_mod
    from splitlora.data.records import encode_records

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise RunError(f"--run: {str(run)!r} is not a run folder (no config.yaml); pass the output_dir of a "
                       "finished `splitlora train` run")
    try:
        cfg = config_mod.load_config(run / "config.yaml")
    except (ValueError, OSError) as err:
        raise RunError(f"--run: {run / 'config.yaml'}: {_one_line(err)}") from None
    if cfg.strategy not in CUT_STRATEGIES:
        raise RunError(f"--run: {str(run)!r} trained with strategy {cfg.strategy!r}, which has no cut (no "
                       f"activations go to a server); the attacks need a split run ({', '.join(CUT_STRATEGIES)})")
    if not Path(args.public_file).exists():  # before the slow part
        raise RunError(f"--public: no such file {str(args.public_file)!r}")
    log(f"loading the run {run} (config, last checkpoint, data)")
    try:
        built, model, step = run_model(run)
    except (ValueError, OSError) as err:
        raise RunError(f"--run: {run}: {_one_line(err)}") from None
    cfg, d, tok = built.cfg, built.cfg.data, built.tokenizer
    cut, num_layers = cfg.model.cut_layer, int(model.config.num_hidden_layers)
    extra = sorted({int(c) for c in args.cuts.split(",") if c.strip()} - {cut}) if args.cuts else []
    bad = [c for c in extra if not 1 <= c < num_layers]
    if bad:
        raise RunError(f"--cuts: {bad} outside 1..{num_layers - 1} (the model has {num_layers} decoder layers)")
    cuts = sorted([cut] + extra)

    records = public_records(d, args.public_file, cfg.seed)
    private_texts = {record_text(r) for r in built.train_records}
    shared = [r for r in records if record_text(r) in private_texts]
    if shared:
        raise RunError(f"--public: {len(shared)} of the {len(records)} records of {str(args.public_file)!r} are "
                       f"training records of the run (the first: {record_text(shared[0])[:60]!r}); the attacker's "
                       "public text must be disjoint from the client's private data")
    public, _ = encode_records(records[:args.public], tok, d.max_length, d.on_long, chat_template=d.chat_template)
    if len(public) == 0:
        raise RunError(f"--public: no usable record in {str(args.public_file)!r} (each was skipped at encoding)")
    private = built.train_data.subset(range(min(args.private, len(built.train_data))))
    held = built.eval_data.subset(range(min(args.utility, len(built.eval_data))))
    args.max_length = d.max_length
    base = built.setup.base_model.eval()
    attacked = {c: model if c == cut else base for c in cuts}

    m = cfg.model
    source = (f"`{m.name}`" if m.name else f"`{m.path}`" if m.path else
              "built from model.config (base weights from the seed)")
    u_shape = bool(cfg.train.u_shape)
    notes = [f"run: `{run}` (strategy {cfg.strategy}, step {step}, {'U-shaped' if u_shape else 'plain'} "
             f"variant); model {source}, {num_layers} decoder layers, cut {cut}, data.max_length {d.max_length}",
             f"attacked at cut {cut} (the run's): the run's client segment (layers 0..{cut - 1}) with its global "
             "client adapters; utility: the run's model (client and server adapters) with the defence at the cut, "
             "on its evaluation records"]
    if extra:
        notes.append(f"at cuts {', '.join(map(str, extra))} (not the run's): the base model's bottom layers, without "
                     "adapters (the run trained none for a client cut there); utility: the run's model with the "
                     "defence at that cut")
    notes.append(f"private: the first {len(private)} training records of the run, rendered as the trainer renders "
                 f"them; public: {len(public)} records of `{args.public_file}` (none of them a training record); "
                 f"utility: the first {len(held)} evaluation records of the run")
    if u_shape:
        notes.append("U-shaped run: the server gets no labels, so the labels + inversion column does not apply (-)")
    return dict(name=run.resolve().name, cfg=cfg, step=step, cuts=cuts, attacked=attacked, model=model, tok=tok,
                private=private, public=public, held=held, items=built.eval_items, stop_ids=built.stop_ids,
                notes=notes, u_shape=u_shape)


def run_own(args) -> dict:
    """--run: the attack benchmark on the user's own finished run; results_run.json and privacy.md
    (the table) into --out, the table printed."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = (lambda *a: print(*a, flush=True))
    t0 = time.time()
    s = _run_setting(args, log)
    label = f"run: {s['name']}"
    rows, leak, impl = attack_rows(args, s["cuts"], s["attacked"], s["model"], s["tok"], s["private"], s["public"],
                                   s["held"], s["items"], s["stop_ids"], log, t0, labels_seen=not s["u_shape"],
                                   label=label)
    result = _result(args, rows, leak, s["notes"], impl, s["private"], s["public"], s["held"], s["model"], t0)
    result["sizes"]["threads"] = torch.get_num_threads()
    result |= {"model": label, "run": {"dir": str(Path(args.run).resolve()), "step": s["step"],
                                       "strategy": s["cfg"].strategy, "cut": s["cfg"].model.cut_layer,
                                       "u_shape": s["u_shape"], "public_file": str(args.public_file)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_run.json").write_text(json.dumps(result, indent=1))
    table = section([result], plots=False)
    (out / "privacy.md").write_text(table + "\n")
    print(table)
    log(f"done in {result['seconds']:.0f} s: {out / 'results_run.json'}, {out / 'privacy.md'}")
    return result


# ---------------------------------------------------------------------------------------------
# One pass to every cut
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def activations_at_cuts(model, cuts, dataset, batch_size=8) -> dict:
    """{cut: [N, T, d] float32}: the outputs of decoder layer cut-1 of ClientSegment(model, max(cuts)),
    collected by hooks in one pass (checked against ClientSegment(model, cut) on the first rows)."""
    from splitlora.split import ClientSegment

    top = ClientSegment(model, max(cuts), share_weights=True).eval()
    got = {c: [] for c in cuts}
    hooks = []
    for c in cuts:
        def hook(_module, _inputs, output, c=c):
            got[c].append((output[0] if isinstance(output, tuple) else output).float())
        hooks.append(top.decoder_layers[str(c - 1)].register_forward_hook(hook))
    try:
        for i in range(0, len(dataset), batch_size):
            b = dataset.batch(range(i, min(i + batch_size, len(dataset))))
            top(b["input_ids"], b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    out = {c: torch.cat(v) for c, v in got.items()}
    b = dataset.batch(range(min(2, len(dataset))))
    for c in cuts:
        ref = ClientSegment(model, c, share_weights=True).eval()(b["input_ids"], b["attention_mask"]).float()
        real = b["attention_mask"].bool()
        torch.testing.assert_close(out[c][:ref.shape[0]][real], ref[real], rtol=1e-4, atol=1e-4)
    return out


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def _texts(tok, ids, mask):
    return [tok.decode(row[m.bool()].tolist()) for row, m in zip(ids, mask)]


def reconstruction_scores(tok, predicted, dataset) -> dict:
    from splitlora.evaluate import rouge_l

    ids, mask = dataset.input_ids, dataset.attention_mask
    true_txt, pred_txt = _texts(tok, ids, mask), _texts(tok, predicted, mask)
    return {
        "token_accuracy": token_accuracy(predicted, ids, mask),
        "rouge_l": 100 * sum(rouge_l(p, t) for p, t in zip(pred_txt, true_txt)) / len(true_txt),
        "rouge_l_ids": 100 * sum(rouge_l_ids(p[m.bool()].tolist(), t[m.bool()].tolist())
                                 for p, t, m in zip(predicted, ids, mask)) / len(ids),
        "sample": {"true": true_txt[0], "reconstructed": pred_txt[0]},
    }


def label_leak(tok, dataset, predicted=None) -> dict:
    """What the plain variant's labels give away: the completion tokens, in clear."""
    from splitlora.data import IGNORE_INDEX
    from splitlora.evaluate import rouge_l

    ids, mask, labels = dataset.input_ids, dataset.attention_mask, dataset.labels
    labelled = labels != IGNORE_INDEX
    real = mask.bool()
    true_txt = _texts(tok, ids, mask)
    label_txt = [tok.decode(row[lab].tolist()) for row, lab in zip(ids, labelled)]
    out = {"label_positions_share": float((labelled & real).sum()) / float(real.sum()),
           "label_token_accuracy": float((labels[labelled] == ids[labelled]).float().mean()),
           "labels_only_rouge_l": 100 * sum(rouge_l(a, b) for a, b in zip(label_txt, true_txt)) / len(ids)}
    if predicted is not None:
        combined = torch.where(labelled, ids, predicted)
        out["labels_plus_inversion_token_accuracy"] = token_accuracy(combined, ids, mask)
    return out


def utility(server, acts, dataset, defence, seed, batch_size=8) -> float:
    """Held-out next-token loss (label tokens) of the split model with `defence` at the cut, from the
    clean activations `acts` of `dataset`."""
    import torch.nn.functional as F

    from splitlora.data import IGNORE_INDEX

    gen = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            sl = slice(i, i + batch_size)
            mask, labels = dataset.attention_mask[sl], dataset.labels[sl]
            logits = server(defence.apply(acts[sl], mask, gen), mask)
            total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"))
            n += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total / n


def bleu_with_defence(client, server, defence, items, tok, stop_ids, sources, seed) -> float:
    from splitlora.evaluate import evaluate_generation

    gen = torch.Generator().manual_seed(seed)

    def logits_fn(input_ids, attention_mask=None):
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return server(defence.apply(client(input_ids, mask), mask, gen), mask)

    result = evaluate_generation(logits_fn, items, tok, max_new_tokens=40, max_sources=sources,
                                 stop_ids=stop_ids, progress=False)
    return result["bleu"]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def defences(args) -> list:
    out = [Defence("none")]
    out += [Defence(f"noise{x}", "noise", noise_multiplier=float(x)) for x in args.noise.split(",") if x]
    out += [Defence(f"int{b}", "codec", bits=int(b)) for b in args.codec.split(",") if b]
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = (lambda *a: print(*a, flush=True))
    t0 = time.time()
    setting = _demo_setting if args.model == "demo" else _smollm2_setting
    model, tok, private, public, held, items, stop_ids, notes = setting(args, log)
    model.eval()
    cuts = [int(c) for c in args.cuts.split(",")]
    rows, leak, impl = attack_rows(args, cuts, {c: model for c in cuts}, model, tok, private, public, held,
                                   items, stop_ids, log, t0)
    result = _result(args, rows, leak, notes, impl, private, public, held, model, t0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results_{args.model}.json"
    if args.merge and path.is_file():
        # More settings for a recorded run (same model, data and sizes): its rows, those of this run
        # replacing any of the same cut and defence, in cut then defence order.
        old = json.loads(path.read_text())
        new_keys = {(r["cut"], r["defence"]) for r in rows}
        merged = [r for r in old["rows"] if (r["cut"], r["defence"]) not in new_keys] + rows
        merged.sort(key=lambda r: (r["cut"], _defence_order(r)))
        result = old | {"rows": merged, "command": f"{old['command']}` then `{result['command']}",
                        "seconds": old["seconds"] + result["seconds"]}
    path.write_text(json.dumps(result, indent=1))
    log(f"done in {result['seconds']:.0f} s: {out / f'results_{args.model}.json'}")
    return result


def attack_rows(args, cuts, attacked, model, tok, private, public, held, items, stop_ids, log, t0,
                labels_seen=True, label=None) -> tuple:
    """(rows, label leak, clip_and_noise implementation): both attacks under every defence at every
    cut. `attacked[cut]`: the model whose bottom layers the server runs at that cut (the client's);
    `model`: the one whose utility is measured (the split model with the defence at the cut).
    `labels_seen`: whether the server gets the labels (not in the U-shaped variant)."""
    from splitlora.split import ClientSegment, ServerSegment

    impl = clip_and_noise_impl()[1]
    log(f"{label or args.model}: private {len(private)} x {private.seq_len}, public {len(public)} x "
        f"{public.seq_len}, utility {len(held)}; cuts {cuts}; clip_and_noise from {impl}; setup "
        f"{time.time() - t0:.0f} s")
    # One pass per distinct attacked model, to all of its cuts.
    groups: dict = {}
    for c in cuts:
        groups.setdefault(id(attacked[c]), (attacked[c], []))[1].append(c)
    acts = {"private": {}, "public": {}}
    for m, group_cuts in groups.values():
        for name, ds in (("private", private), ("public", public)):
            acts[name].update(activations_at_cuts(m, group_cuts, ds))
    acts["utility"] = activations_at_cuts(model, cuts, held)
    log(f"activations at every cut: {time.time() - t0:.0f} s")
    opt_names = set(args.opt_defences.split(",")) if args.opt_defences else set()
    rows = []
    leak = label_leak(tok, private)
    for cut in cuts:
        client = ClientSegment(attacked[cut], cut, share_weights=True).eval()
        server = ServerSegment(model, cut, share_weights=True).eval()
        _, emb = token_embedding(client)
        clip = float(example_norms(acts["public"][cut], public.attention_mask).median())
        # --merge adds settings to a recorded run, whose `none` rows are already there.
        for k, d in enumerate(x for x in defences(args) if not (args.merge and x.name == "none")):
            d = d.with_clip(clip) if d.kind == "noise" else d
            t1 = time.time()
            seed = args.seed * 1000 + cut * 100 + k
            observed = d.apply(acts["private"][cut], private.attention_mask, torch.Generator().manual_seed(seed))
            attack = InversionAttack(emb.weight, observed.shape[-1], hidden=args.hidden, epochs=args.epochs,
                                     negatives=args.negatives, seed=seed)
            losses = attack.fit(acts["public"][cut], public.input_ids, public.attention_mask, d)
            predicted = attack.predict(observed)
            row = {"cut": cut, "defence": d.name, "kind": d.kind, "noise_multiplier": d.noise_multiplier,
                   "clip": d.clip, "bits": d.bits if d.kind == "codec" else None,
                   "inversion": reconstruction_scores(tok, predicted, private),
                   "inversion_train_loss": losses[-1] if losses else None,
                   "labels_plus_inversion_token_accuracy": label_leak(tok, private, predicted)[
                       "labels_plus_inversion_token_accuracy"] if labels_seen else None}
            t2 = time.time()
            if d.name in opt_names:
                n = min(args.opt_texts, len(private))
                sub = private.subset(range(n))
                found = optimisation_attack(client, observed[:n], sub.attention_mask, steps=args.opt_steps,
                                            lr=args.opt_lr, seed=seed)
                row["optimisation"] = reconstruction_scores(tok, found, sub)
                row["optimisation"]["texts"] = n
            t3 = time.time()
            row["utility_loss"] = utility(server, acts["utility"][cut], held, d, seed)
            if args.bleu_sources and items:
                own = client if attacked[cut] is model else ClientSegment(model, cut, share_weights=True).eval()
                row["utility_bleu"] = bleu_with_defence(own, server, d, items, tok, stop_ids,
                                                        args.bleu_sources, seed)
            row["seconds"] = {"inversion": t2 - t1, "optimisation": t3 - t2, "utility": time.time() - t3}
            rows.append(row)
            opt = row.get("optimisation", {}).get("token_accuracy")
            log(f"cut {cut} {d.name:>10}: inversion acc {row['inversion']['token_accuracy']:.3f} "
                f"rougeL {row['inversion']['rouge_l']:.1f}"
                + (f", optimisation acc {opt:.3f}" if opt is not None else "")
                + f"; utility loss {row['utility_loss']:.3f}"
                + (f" bleu {row['utility_bleu']:.1f}" if "utility_bleu" in row else "")
                + f" ({time.time() - t1:.0f} s)")
    return rows, leak, impl


def _result(args, rows, leak, notes, impl, private, public, held, model, t0) -> dict:
    return {"model": args.model, "argv": _argv(args), "command": _command(args), "rows": rows,
            "labels": leak, "notes": notes, "clip_and_noise": impl,
            "sizes": {k: getattr(args, k) for k in SIZES[args.model]},
            "counts": {"private": len(private), "public": len(public), "utility": len(held),
                       "seq_len": private.seq_len, "vocab": int(model.config.vocab_size)},
            "seconds": time.time() - t0, "machine": _machine(), "date": args.date}


def _defence_order(row) -> tuple:
    return ({"none": 0, "noise": 1, "codec": 2}[row["kind"]], row["noise_multiplier"], -(row["bits"] or 0))


def _argv(args) -> list:
    argv = getattr(args, "argv", None)
    return list(sys.argv[1:] if argv is None else argv)


def _command(args) -> str:
    return "python -m bench.privacy " + shlex.join(_argv(args))


def _machine() -> str:
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        name = platform.processor()
    return f"{os.cpu_count()}-core CPU VM ({name}), torch {torch.__version__}"


def train_utility(args) -> dict:
    """demo: utility after a SplitLoRA fine-tune under each defence (the trainer's privacy.clip,
    privacy.noise_multiplier or codec.bits), at the demo's own cut, the same 300 steps as the
    attacked model; held-out loss and BLEU of the trained model, evaluated as the trainer does."""
    from splitlora import config as config_mod
    from splitlora.trainer import train

    out = Path(args.out)
    attacked = json.loads((out / "results_demo.json").read_text())
    base = config_mod.load_config(None)
    cut = base.model.cut_layer
    clips = {r["clip"] for r in attacked["rows"] if r["cut"] == cut and r["kind"] == "noise"}
    if len(clips) != 1:
        raise SystemExit(f"results_demo.json has no noise rows at the demo's cut {cut}: run the attacks first")
    clip = clips.pop()
    rows = []
    settings = [("none", [])]
    settings += [(f"noise{x}", [f"privacy.clip={clip}", f"privacy.noise_multiplier={x}", "privacy.seed=0"])
                 for x in args.train_noise.split(",") if x]
    settings += [(f"int{b}", [f"codec.bits={b}"]) for b in args.codec.split(",") if b]
    for name, extra in settings:
        t0 = time.time()
        run_dir = out / "demo-train" / name
        over = [f"output_dir={run_dir}", "overwrite=true", "eval.generate=true", "codec.bits=32"] + extra
        if args.train_steps:
            over.append(f"train.steps={args.train_steps}")
        summary = train(config_mod.load_config(None, over), progress=False, log=lambda *_: None)
        rows.append({"defence": name, "overrides": over, "eval_loss": summary["eval_loss"],
                     "bleu": summary.get("bleu"), "rouge_l": summary.get("rouge_l"),
                     "privacy": summary.get("privacy"), "seconds": time.time() - t0})
        print(f"trained under {name}: held-out loss {summary['eval_loss']:.3f} bleu {summary.get('bleu', float('nan')):.1f}"
              f" ({time.time() - t0:.0f} s)", flush=True)
    result = {"cut": cut, "clip": clip, "rows": rows, "command": _command(args), "machine": _machine(),
              "date": args.date}
    (out / "results_demo_train.json").write_text(json.dumps(result, indent=1))
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _plots(results: list, trained: dict | None = None) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    written = []
    # 1. reconstruction quality against cut layer, one line per defence, one panel per model
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        names = list(dict.fromkeys(r["defence"] for r in res["rows"]))
        for name in names:
            rs = [r for r in res["rows"] if r["defence"] == name]
            ax.plot([r["cut"] for r in rs], [r["inversion"]["token_accuracy"] for r in rs], marker="o", label=name)
            opt = [r for r in rs if "optimisation" in r]
            if opt:
                ax.plot([r["cut"] for r in opt], [r["optimisation"]["token_accuracy"] for r in opt], marker="x",
                        linestyle="--", color=ax.lines[-1].get_color(), label=f"{name} (optimisation)")
        ax.set_xlabel("cut layer (client holds layers 0..cut-1)")
        ax.set_ylabel("token accuracy of the reconstruction")
        ax.set_title(f"{res['model']}: inversion (solid), optimisation (dashed)")
        ax.set_xticks(sorted({r["cut"] for r in res["rows"]}))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = PLOTS / "privacy_vs_cut.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    # 2. utility against reconstruction quality, per defence setting, a panel per model (and BLEU)
    panels = [(res, "utility_loss", "held-out loss (lower is better)") for res in results]
    panels += [(res, "utility_bleu", "BLEU (higher is better)") for res in results
               if any("utility_bleu" in r for r in res["rows"])]
    n = len(panels) + (1 if trained else 0)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.2), squeeze=False)
    if trained:
        demo = next(r for r in results if r["model"] == "demo")
        acc = {r["defence"]: r["inversion"]["token_accuracy"] for r in demo["rows"] if r["cut"] == trained["cut"]}
        ax = axes[0][-1]
        rs = [r for r in trained["rows"] if r["defence"] in acc]
        xs = [acc[r["defence"]] for r in rs]
        ax.plot(xs, [r["bleu"] for r in rs], "o", color="tab:blue", label="BLEU")
        for x, r in zip(xs, rs):
            ax.annotate(r["defence"], (x, r["bleu"]), fontsize=6)
        ax.set_ylabel("BLEU after fine-tuning under the defence", color="tab:blue")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["eval_loss"] for r in rs], "s", color="tab:red", label="held-out loss")
        ax2.set_ylabel("held-out loss after fine-tuning", color="tab:red")
        ax.set_xlabel(f"inversion token accuracy at cut {trained['cut']}")
        ax.set_title("demo: fine-tuned under each defence")
        ax.grid(alpha=0.3)
    for ax, (res, key, label) in zip(axes[0], panels):
        for cut in sorted({r["cut"] for r in res["rows"]}):
            rs = sorted((r for r in res["rows"] if r["cut"] == cut and key in r),
                        key=lambda r: r["inversion"]["token_accuracy"])
            ax.plot([r["inversion"]["token_accuracy"] for r in rs], [r[key] for r in rs], marker="o", alpha=0.8,
                    label=f"cut {cut}")
            for r in rs:
                ax.annotate(r["defence"], (r["inversion"]["token_accuracy"], r[key]), fontsize=6)
        ax.set_xlabel("inversion token accuracy (lower = more private)")
        ax.set_ylabel(label)
        ax.set_title(f"{res['model']}: utility against reconstruction")
        if key == "utility_loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = PLOTS / "privacy_utility.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def _findings(res) -> list:
    """A few sentences computed from the rows (so a rerun keeps them true)."""
    rows = res["rows"]
    by = {(r["cut"], r["defence"]): r for r in rows}
    cuts = sorted({r["cut"] for r in rows})
    none = [by[(c, "none")] for c in cuts if (c, "none") in by]
    out = []
    if none:
        accs = [r["inversion"]["token_accuracy"] for r in none]
        out.append(f"- No defence: the inversion recovers {100 * min(accs):.1f}% to {100 * max(accs):.1f}% of the "
                   f"client's tokens at cuts {', '.join(map(str, cuts))} (ROUGE-L "
                   f"{min(r['inversion']['rouge_l'] for r in none):.1f} to "
                   f"{max(r['inversion']['rouge_l'] for r in none):.1f})"
                   + ("; a deeper cut barely changes it." if max(accs) - min(accs) < 0.05 else "."))
        opt = [r for r in none if "optimisation" in r]
        if opt:
            out.append("- The optimisation attack, with no public data, recovers "
                       + ", ".join(f"{100 * r['optimisation']['token_accuracy']:.1f}% at cut {r['cut']}" for r in opt)
                       + f" (its first {opt[0]['optimisation']['texts']} texts).")
    codec = [r for r in rows if r["kind"] == "codec"]
    if codec and none:
        base = {r["cut"]: r["inversion"]["token_accuracy"] for r in none}
        diff = max(abs(r["inversion"]["token_accuracy"] - base[r["cut"]]) for r in codec)
        out.append(f"- Codec quantization ({', '.join(sorted({r['defence'] for r in codec}))}): inversion accuracy "
                   f"within {100 * diff:.1f} points of no defence at every cut"
                   + (", so no defence." if diff < 0.05 else "."))
    noise = sorted({r["noise_multiplier"] for r in rows if r["kind"] == "noise"})
    if noise and none:
        loss0 = min(r["utility_loss"] for r in none)
        for x in noise:
            rs = [r for r in rows if r["kind"] == "noise" and r["noise_multiplier"] == x]
            if not rs:
                continue
            out.append(f"- noise {x:g}: inversion {100 * min(r['inversion']['token_accuracy'] for r in rs):.1f}% to "
                       f"{100 * max(r['inversion']['token_accuracy'] for r in rs):.1f}%, held-out loss with the defence "
                       f"{min(r['utility_loss'] for r in rs):.2f} to {max(r['utility_loss'] for r in rs):.2f} "
                       f"(none: {loss0:.2f}).")
    return out


def _threads(res) -> str:
    n = res["sizes"].get("threads", 1)
    return "one torch thread" if n == 1 else f"{n} torch threads"


def section(results: list, trained: dict | None = None, plots: bool = True) -> str:
    """The RESULTS.md section (`plots`: with its plots and markers; without: a --run's own table)."""
    lines = ([BEGIN, ""] if plots else [])
    lines += ["## Privacy: what a curious server reconstructs at the cut (`bench/privacy.py`)", ""]
    lines += ["The server of the plain variant sees the activations at the cut (after the client's defence), the "
              "labels (the completion tokens, in clear) and the client adapters, so it can run the client's bottom "
              "layers on any text. Two attacks reconstruct the client's tokens from the activations "
              "(`bench/privacy_attacks.py`): **inversion**, a per-position 2-layer MLP into the embedding space "
              "scored against the model's token embeddings, trained with cross-entropy on *public* text passed "
              "through the same bottom layers with the same defence applied (an attacker who knows the setting); "
              "**optimisation**, Adam on input embeddings so that the bottom layers' output matches the observed "
              "activations (1 - cosine per position), then the nearest token embedding. Scores over the real "
              "(non-padding) positions of the client's private texts: token accuracy, and ROUGE-L (0-100, "
              "words) of the decoded reconstruction against the true text.", "",
              "Defences: `none`; `noiseX`: per-example L2 clipping of the [T, d] activations to the median "
              "per-example norm of the public activations at that cut, then Gaussian noise of std X x clip per "
              "element (`splitlora.privacy.clip_and_noise`); `int8`, `int4`: the codec's quantization round trip "
              "(`splitlora.codec`, group 64). Noise multipliers here are far below DP's usual ~1: one example's "
              "T x d activations share one clip, so a per-element noise of X x clip swamps a per-element signal "
              "of about clip / sqrt(T d) already at X ~ 0.01-0.1; these settings carry no meaningful (epsilon, "
              "delta) guarantee and show the empirical trade-off only.", "",
              "**Utility** is measured without retraining: the held-out next-token loss (label tokens) of the "
              "split model with the defence applied to its activations at the cut (and, for the demo model, BLEU "
              "of greedy generation with the defence at every decoding step): what the defence costs a model "
              "that was not trained under it. For the demo model also after fine-tuning *under* each defence "
              "(the trainer's `privacy.*` keys, `--train-utility`), at the demo's cut; not for SmolLM2 (a "
              "fine-tune of 135M parameters per setting is beyond this CPU budget).", ""]
    for res in results:
        c = res["counts"]
        lines += [f"### {res['model']}", "",
                  f"Command: `{res['command']}`; {res['machine']}, {_threads(res)}; {res['date']}; "
                  f"{res['seconds'] / 60:.1f} minutes. clip_and_noise: `{res['clip_and_noise']}`.", ""]
        lines += [f"- {n}" for n in res["notes"]]
        s = res["sizes"]
        lines += [f"- sizes: {c['private']} private texts, {c['public']} public, {c['utility']} for utility; "
                  f"sequences up to {c['seq_len']} tokens; vocabulary {c['vocab']}; inversion: hidden {s['hidden']}, "
                  f"{s['epochs']} epochs; optimisation: the first {s['opt_texts']} private texts, "
                  f"{s['opt_steps']} Adam steps (lr {s['opt_lr']} x the embeddings' std), for the defences "
                  f"{s['opt_defences']}", ""]
        lines += _findings(res) + [""]
        lab = res["labels"]
        lines += [f"**Labels** (plain variant): the server reads the completion tokens outright, "
                  f"{100 * lab['label_positions_share']:.1f}% of the client's real tokens, at token accuracy "
                  f"{lab['label_token_accuracy']:.2f} (the label of a position is its token); the label text alone "
                  f"scores ROUGE-L {lab['labels_only_rouge_l']:.1f} against the whole text (prompt + completion). "
                  "In the U-shaped variant (`train.u_shape`) labels and the head stay on the client: the server "
                  "gets no labels (0%); the activations at the cut, and so every attack below, are the same in "
                  "both variants (not measured here: what the gradients the client tail sends down reveal of "
                  "the labels). The column *labels + inversion* is the plain variant's server combining both: "
                  "labels on the completion, the inversion elsewhere.", ""]
        lines += ["| cut | defence | inversion token acc | inversion ROUGE-L | labels + inversion acc | "
                  "optimisation token acc | optimisation ROUGE-L | utility: held-out loss |"
                  + (" utility: BLEU |" if any("utility_bleu" in r for r in res["rows"]) else ""),
                  "|---|---|---|---|---|---|---|---|"
                  + ("---|" if any("utility_bleu" in r for r in res["rows"]) else "")]
        for r in res["rows"]:
            o = r.get("optimisation", {})
            lines.append(f"| {r['cut']} | {r['defence']} | {_fmt(r['inversion']['token_accuracy'])} | "
                         f"{_fmt(r['inversion']['rouge_l'], 1)} | {_fmt(r['labels_plus_inversion_token_accuracy'])} | "
                         f"{_fmt(o.get('token_accuracy'))} | {_fmt(o.get('rouge_l'), 1)} | "
                         f"{_fmt(r['utility_loss'])} |" + (f" {_fmt(r.get('utility_bleu'), 1)} |"
                                                           if any("utility_bleu" in x for x in res["rows"]) else ""))
        lines.append("")
        if trained and res["model"] == "demo":
            acc = {r["defence"]: r for r in res["rows"] if r["cut"] == trained["cut"]}
            lines += [f"**Utility after fine-tuning under the defence** (demo, cut {trained['cut']}, the demo's "
                      f"300 SplitLoRA steps with the trainer's `privacy.clip={trained['clip']:.4g}` and "
                      "`privacy.noise_multiplier` or `codec.bits`, held-out loss and BLEU of the trained model as "
                      "the trainer evaluates it; epsilon from the trainer's Opacus accounting of the cut, delta "
                      f"1e-5). Command: `{trained['command']}`; {trained['date']}. The inversion column is the "
                      "attack at that cut on the model trained without defence (table above).", "",
                      "| defence | held-out loss | BLEU | ROUGE-L | epsilon (cut) | inversion token acc | seconds |",
                      "|---|---|---|---|---|---|---|"]
            for r in trained["rows"]:
                eps = (r.get("privacy") or {}).get("epsilon")
                inv = acc.get(r["defence"], {}).get("inversion", {}).get("token_accuracy")
                lines.append(f"| {r['defence']} | {_fmt(r['eval_loss'])} | {_fmt(r['bleu'], 1)} | "
                             f"{_fmt(r['rouge_l'], 1)} | {'-' if eps is None else f'{eps:.3g}'} | {_fmt(inv)} | "
                             f"{r['seconds']:.0f} |")
            lines.append("")
        none = [r for r in res["rows"] if r["defence"] == "none"]
        if none:
            ex = none[-1]["inversion"]["sample"]
            lines += [f"One private text and its inversion at cut {none[-1]['cut']}, no defence:", "",
                      f"- true: `{ex['true'][:300]}`", f"- reconstructed: `{ex['reconstructed'][:300]}`", ""]
    if plots:
        lines += ["![reconstruction against cut layer](plots/privacy_vs_cut.png)", "",
                  "![utility against reconstruction](plots/privacy_utility.png)", "", END]
    return "\n".join(lines)


def report(out_dirs: list) -> None:
    results = []
    for model in ("demo", "smollm2"):
        for d in out_dirs:
            f = Path(d) / f"results_{model}.json"
            if f.is_file():
                results.append(json.loads(f.read_text()))
                break
    if not results:
        raise SystemExit(f"no results_*.json in {out_dirs}: run the benchmark first")
    trained = None
    for d in out_dirs:
        f = Path(d) / "results_demo_train.json"
        if f.is_file():
            trained = json.loads(f.read_text())
            break
    _plots(results, trained)
    text = section(results, trained)
    doc = RESULTS.read_text() if RESULTS.is_file() else ""
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + text + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(doc)
    print(f"wrote the privacy section of {RESULTS} and {PLOTS}/privacy_*.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["demo", "smollm2"], default="demo")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="attack your own finished `splitlora train` run (its output_dir) instead of --model; "
                        "needs --public FILE")
    p.add_argument("--cuts", help="cut layers, comma-separated (demo: 1,2,3; smollm2: 1,2,4,8; --run: the run's "
                                  "cut, always, and these besides, attacked on the base bottom layers)")
    p.add_argument("--noise", help="noise multipliers of the clip-and-noise defence, comma-separated")
    p.add_argument("--codec", help="codec bit widths as defences, comma-separated ('' for none)")
    p.add_argument("--private", type=int, help="private texts attacked")
    p.add_argument("--public", metavar="N|FILE",
                   help="public texts the inversion attacker trains on: how many (--model); with --run, the file "
                        "of public texts (any format the data readers accept; no record shared with the run's "
                        "training data)")
    p.add_argument("--public-texts", type=int,
                   help="--run: how many records of --public FILE (default 400; --quick 40)")
    p.add_argument("--utility", type=int, help="held-out texts for the utility loss")
    p.add_argument("--bleu-sources", type=int, help="demo: held-out prompts for BLEU (0: none)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--epochs", type=int, help="inversion training epochs")
    p.add_argument("--hidden", type=int, help="inversion MLP width")
    p.add_argument("--opt-texts", type=int, help="private texts the optimisation attack reconstructs")
    p.add_argument("--opt-steps", type=int)
    p.add_argument("--opt-lr", type=float, help="Adam step, in units of the embeddings' std")
    p.add_argument("--negatives", type=int, help="inversion: random negatives of the sampled softmax (large vocabularies)")
    p.add_argument("--opt-defences", help="defence names the optimisation attack runs under")
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="folder holding e2e/ (default $SPLITLORA_DATA or ../shared/data)")
    p.add_argument("--out", help="results folder (default runs/privacy; --quick: runs/privacy-quick; --run: "
                                 "runs/privacy-run/<run name>)")
    p.add_argument("--quick", action="store_true", help="smoke size (seconds to a minute)")
    p.add_argument("--merge", action="store_true",
                   help="add this run's settings to the recorded results of the same model (same sizes)")
    p.add_argument("--report", action="store_true", help="then write the RESULTS.md section and plots")
    p.add_argument("--report-only", action="store_true", help="only the report, from the recorded JSON")
    p.add_argument("--train-utility", action="store_true",
                   help="demo, after the attacks: fine-tune the demo under each defence at its cut (trainer privacy keys)")
    p.add_argument("--train-steps", type=int, help="--train-utility's steps (default the demo's 300; --quick 10)")
    p.add_argument("--train-noise", default="0.001,0.01,0.03,0.1", help="--train-utility's noise multipliers")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = p.parse_args(argv)
    args.argv = argv
    if args.run is not None:
        return _main_run(p, args)
    if args.public is not None:
        try:
            args.public = int(args.public)
        except ValueError:
            p.error(f"--public: {args.public!r} is not a number of texts (a FILE of public texts goes with --run)")
    if args.out is None:
        args.out = "runs/privacy-quick" if args.quick else "runs/privacy"
    if args.report_only:
        report([args.out])
        return 0
    defaults = dict(SIZES[args.model])
    if args.quick:
        defaults.update(QUICK)
        args.train_steps = args.train_steps or 10
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not math.isfinite(args.opt_lr) or args.opt_lr <= 0:
        p.error(f"--opt-lr must be a positive number; got {args.opt_lr}")
    if args.train_utility:
        if args.model != "demo":
            p.error("--train-utility is for --model demo")
        train_utility(args)
    else:
        run(args)
    if args.report:
        if args.quick:
            print(section([json.loads((Path(args.out) / f"results_{args.model}.json").read_text())]))
        else:
            report([args.out])
    return 0


def _main_run(p, args) -> int:
    """--run RUN_DIR --public FILE: a problem is one line on stderr and exit status 2."""
    def fail(message):
        print(f"bench.privacy: error: {message}", file=sys.stderr)
        return 2

    if args.public is None:
        return fail("--run needs --public FILE: the attacker's public texts (disjoint from the run's training data)")
    given = [f for f, on in (("--report", args.report), ("--report-only", args.report_only), ("--merge", args.merge),
                             ("--train-utility", args.train_utility)) if on]
    if given:
        return fail(f"{', '.join(given)} cannot go with --run (its results stay in --out; no RESULTS.md section)")
    args.model, args.public_file, args.public = "run", args.public, args.public_texts
    defaults = dict(SIZES["run"])
    if args.quick:
        defaults.update({k: v for k, v in QUICK.items() if k != "bleu_sources"})
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not math.isfinite(args.opt_lr) or args.opt_lr <= 0:
        return fail(f"--opt-lr must be a positive number; got {args.opt_lr}")
    if args.out is None:
        args.out = str(Path("runs") / "privacy-run" / (Path(args.run).resolve().name or "run"))
    try:
        run_own(args)
    except RunError as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
