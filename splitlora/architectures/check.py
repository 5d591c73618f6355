"""check_split: does a split of this model compute what the whole model computes?

An Architecture reproduces by hand what a family's forward does between its modules; a wrong entry
(a missed embedding scale, a layer given the wrong mask, a skipped logit cap) still runs and trains,
just on a different model. check_split runs a few tokens through the whole model and through the
split and says where they part: the first decoder layer whose output differs.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

__all__ = ["check_split", "DEFAULT_TOLERANCES"]

# (atol, rtol) per dtype. atol is relative to the scale of the compared tensor (its largest
# |value|): |split - whole| <= atol * scale + rtol * |whole|, elementwise. float32 is tight (the
# split runs the very same ops); half precisions leave room for a different summation order.
DEFAULT_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (1e-2, 1e-2),
}


def _inputs(model: nn.Module, tokens: int, device) -> Dict[str, torch.Tensor]:
    """Two rows of fixed token ids inside the vocabulary; the second right-padded."""
    vocab = model.config.vocab_size
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, nn.Embedding):
        vocab = min(vocab, embedding.num_embeddings)
    positions = torch.arange(tokens, device=device)
    input_ids = torch.stack([(positions * 7919 + 3) % vocab, (positions * 104729 + 11) % vocab])
    attention_mask = torch.ones(2, tokens, dtype=torch.long, device=device)
    attention_mask[1, max(1, tokens - max(1, tokens // 3)):] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _capture(layers, outputs: Dict[int, torch.Tensor], first_input: Optional[List[torch.Tensor]], first: int):
    """Forward hooks recording each decoder layer's output (keyed by its global index) and, with
    `first_input`, the input of layer `first`. Returns the handles."""
    handles = []
    for index, layer in layers:
        def record(module, args, output, _index=index):
            outputs[_index] = (output[0] if isinstance(output, tuple) else output).detach()
        handles.append(layer.register_forward_hook(record))
        if first_input is not None and index == first:
            def record_input(module, args, kwargs):
                hidden = args[0] if args else kwargs.get("hidden_states")
                first_input.append(hidden.detach())
            handles.append(layer.register_forward_pre_hook(record_input, with_kwargs=True))
    return handles


def _difference(actual: torch.Tensor, expected: torch.Tensor, valid: torch.Tensor, atol: float, rtol: float):
    """(within tolerance?, largest |difference| relative to the scale) at the valid positions."""
    a, e = actual.float()[valid], expected.float()[valid]
    if a.shape != e.shape:
        return False, math.inf
    scale = float(e.abs().max()) if e.numel() else 0.0
    scale = scale if math.isfinite(scale) and scale > 0 else 1.0
    err = (a - e).abs()
    both_nan = torch.isnan(a) & torch.isnan(e)
    ok = (err <= atol * scale + rtol * e.abs()) | both_nan
    worst = float(torch.where(both_nan, torch.zeros_like(err), err).nan_to_num(math.inf).max()) if err.numel() else 0.0
    return bool(ok.all()), worst / scale


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def check_split(
    model: nn.Module,
    cut_layer: int,
    server_end: Optional[int] = None,
    *,
    tokens: int = 8,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
) -> float:
    """Runs `tokens` fixed tokens (two rows, the second right-padded) through the whole `model` and
    through its split at `cut_layer` (client -> server), or with `server_end` its U-shaped split
    (client -> server -> client tail), in the model's dtype and on its device, and compares the
    logits at the non-padded positions:

        |split - whole| <= atol * max|whole| + rtol * |whole|

    with (atol, rtol) from DEFAULT_TOLERANCES for the model's dtype unless given. On a mismatch it
    raises ValueError naming the model type and the first decoder layer whose output differs (each
    layer's output is compared, in the same way, with the whole model's). Returns the largest
    difference of the logits relative to their scale.

    The model is left as it was: no weight is copied or changed (the segments share its tensors),
    it runs under no_grad in eval mode (each module's train/eval mode is restored afterwards), and
    the global RNG state is restored.
    """
    from ..split import ClientSegment, ClientTail, ServerSegment, _architecture_of, _check_cuts

    arch = _architecture_of(model)
    _check_cuts(model, cut_layer, server_end)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens must be an integer >= 2; got {tokens!r}.")
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise ValueError("check_split needs a model whose weights are loaded; this one has tensors on the meta "
                         "device (e.g. a client's model from load_bottom_layers).")
    dtype = _float_dtype(model)
    default_atol, default_rtol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    atol = default_atol if atol is None else float(atol)
    rtol = default_rtol if rtol is None else float(rtol)
    model_type = model.config.model_type

    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    handles = []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            model.eval()
            batch = _inputs(model, tokens, device)
            valid = batch["attention_mask"].bool()

            whole_layers = getattr(getattr(model, arch.backbone), arch.layers)
            whole_out: Dict[int, torch.Tensor] = {}
            whole_in: List[torch.Tensor] = []
            handles += _capture(enumerate(whole_layers), whole_out, whole_in, 0)
            expected = model(**batch, use_cache=False).logits
            for h in handles:
                h.remove()
            handles = []

            if server_end is None:
                segments = [ClientSegment(model, cut_layer, share_weights=True),
                            ServerSegment(model, cut_layer, share_weights=True)]
            else:
                segments = [ClientSegment(model, cut_layer, share_weights=True),
                            ServerSegment(model, cut_layer, server_end, share_weights=True),
                            ClientTail(model, server_end, share_weights=True)]
            split_out: Dict[int, torch.Tensor] = {}
            split_in: List[torch.Tensor] = []
            for segment in segments:
                layers = [(int(i), layer) for i, layer in segment.decoder_layers.items()]
                handles += _capture(layers, split_out, split_in if segment is segments[0] else None, 0)
            try:
                hidden = segments[0](batch["input_ids"], batch["attention_mask"])
                for segment in segments[1:]:
                    hidden = segment(hidden, batch["attention_mask"])
            except Exception as err:
                raise ValueError(
                    f"check_split: the split of this {model_type!r} model ({type(model).__name__}) fails to run with "
                    f"the architecture registered for it, {arch!r}: {type(err).__name__}: {err}"
                ) from err
            actual = hidden
    finally:
        for h in handles:
            h.remove()
        for module, mode in modes.items():
            module.training = mode

    ok, worst = _difference(actual, expected, valid, atol, rtol)
    if ok:
        return worst
    where = f"cut_layer={cut_layer}" + (f", server_end={server_end}" if server_end is not None else "")
    head = (f"check_split: the split of this {model_type!r} model ({type(model).__name__}, {where}) does not "
            f"compute what the whole model computes ({dtype}, tolerance atol={atol:g} x scale, rtol={rtol:g}): ")
    layer = None
    for index in range(len(whole_layers)):
        if index not in whole_out or index not in split_out:
            continue
        if not _difference(split_out[index], whole_out[index], valid, atol, rtol)[0]:
            layer = index
            break
    if layer is not None:
        detail = (f"decoder layer {layer} is the first whose output differs (largest difference "
                  f"{_difference(split_out[layer], whole_out[layer], valid, atol, rtol)[1]:.3g} x its scale)")
        if layer == 0 and whole_in and split_in and not _difference(split_in[0], whole_in[0], valid, atol, rtol)[0]:
            detail += "; its input, the embeddings, already differs (Architecture.embed)"
        elif layer > 0:
            detail += (f", with layers 0..{layer - 1} equal: check the mask, rotary table or call of layer "
                       f"{layer} (Architecture.layer_kind, position_embeddings, run_layer)")
    else:
        detail = ("every decoder layer's output matches but the logits differ (largest difference "
                  f"{worst:.3g} x their scale): check the final norm and head (Architecture.head_logits)")
    raise ValueError(head + detail + f". The architecture registered for {model_type!r} is "
                     f"{arch!r}; fix it and register it again with "
                     "splitlora.architectures.register_architecture(model_type, architecture, overwrite=True).")
