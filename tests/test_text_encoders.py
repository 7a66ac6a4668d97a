"""Text encoders: the offline MiniLM, transformers folders, the empty-tokenizer guard, and open_clip
text towers converted to a transformers CLIPTextModel (checked against open_clip's own forward)."""
import json

import open_clip
import pytest
import torch
from transformers import BertTokenizer, CLIPTextConfig, CLIPTextModel

from dpldm.errors import DpldmError
from dpldm.models.text_encoders import check_tokenizer, clip_tokenizer_from_open_clip, load_text_encoder


def test_minilm_loads_frozen_with_sane_vocab():
    tok, enc = load_text_encoder("minilm", 12)
    assert len(tok) > 30000 and tok.model_max_length == 12
    assert enc.config.hidden_size == 384 and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    ids = tok(["a seven"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, 12)
    out = enc(ids)[0]
    assert out.shape == (1, 12, 384) and torch.isfinite(out).all()


def test_empty_tokenizer_guard(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    tiny = BertTokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(DpldmError, match="only 5 tokens"):
        check_tokenizer(tiny, "broken-tokenizer")
    # a big vocabulary in which no ordinary word exists still maps everything to [UNK]
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"zz{i}" for i in range(1200)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    with pytest.raises(DpldmError, match="special/unknown tokens only"):
        check_tokenizer(BertTokenizer(str(tmp_path / "vocab.txt")), "unk-tokenizer")


def test_folder_spec_clip_and_errors(tmp_path):
    tok = clip_tokenizer_from_open_clip(8)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16))
    enc.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    t2, e2 = load_text_encoder(str(tmp_path / "clip"), 8)
    assert isinstance(e2, CLIPTextModel) and t2.model_max_length == 8 and len(t2) == 49408
    with pytest.raises(DpldmError, match="max_position_embeddings"):
        load_text_encoder(str(tmp_path / "clip"), 32)
    with pytest.raises(DpldmError, match="neither"):
        load_text_encoder(str(tmp_path / "missing"), 8)
    with pytest.raises(DpldmError, match="open_clip:ARCH:CHECKPOINT_FILE"):
        load_text_encoder("open_clip:ViT-B-32", 8)


TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def open_clip_hidden(model, ids):
    """open_clip's per-token text features (what encode_text computes before pooling)."""
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.transformer(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


def test_open_clip_converted_matches_open_clip(tmp_path):
    cfg_file = tmp_path / "tiny-clip-test.json"
    cfg_file.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg_file)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test", pretrained=None).eval()
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)

    tok, enc = load_text_encoder(f"open_clip:{cfg_file}:{ckpt}", 77)
    assert isinstance(enc, CLIPTextModel) and tok.model_max_length == 77
    prompts = ["a photo of a dog", "Two   CATS, 7 of them.", ""]   # "!" differs: see docs/models.md
    ref_ids = open_clip.get_tokenizer("tiny-clip-test")(prompts)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids)
    with torch.no_grad():
        torch.testing.assert_close(enc(ids).last_hidden_state, open_clip_hidden(model, ref_ids),
                                   atol=1e-5, rtol=1e-5)

    torch.save({"wrong": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(DpldmError, match="text weights missing"):
        load_text_encoder(f"open_clip:{cfg_file}:{tmp_path / 'bad.pt'}", 77)
    with pytest.raises(DpldmError, match="does not exist"):
        load_text_encoder(f"open_clip:{cfg_file}:{tmp_path / 'none.pt'}", 77)
