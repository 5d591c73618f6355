"""Small, fast run configs shared by the trainer tests."""
from splitlora.config import load_config

TINY_MODEL = ["model.config.n_layer=3", "model.config.n_embd=32", "model.config.n_head=2",
              "model.config.n_positions=96", "model.config.activation_function=gelu_pytorch_tanh"]


def tiny_config(tmp_path, *overrides, name="run"):
    base = TINY_MODEL + [
        f"output_dir={tmp_path / name}", "data.synthetic_examples=120", "data.num_eval=16", "data.max_length=96",
        "train.clients=2", "train.batch_size=4", "train.steps=6", "train.aggregate_every=3",
        "train.eval_every=0", "train.log_every=2", "eval.generate=false", "eval.max_sources=2",
        "eval.max_new_tokens=8", "model.cut_layer=1",
    ]
    return load_config(None, base + list(overrides))
