"""minibldm.clip.TextEncoder against transformers' CLIPTextModel, through minibldm.convert."""
import dataclasses

import pytest
import torch
from conftest import max_abs, randomize

from minibldm.clip import TextEncoder
from minibldm.config import TextConfig
from minibldm.convert import text_encoder_from_transformers, text_encoder_to_transformers
from minibldm.io import WeightsError, load_into

transformers = pytest.importorskip("transformers")

TINY = TextConfig(vocab_size=1000, max_position_embeddings=77, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def hf_config(cfg: TextConfig):
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2)  # in range for the tiny vocabulary; unused here


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return randomize(transformers.CLIPTextModel(hf_config(TINY)), seed=1, std=0.1).eval()


def test_same_last_hidden_state(reference):
    ours = load_into(TextEncoder(TINY), text_encoder_from_transformers(reference.state_dict()),
                     "CLIPTextModel", "text encoder").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY.vocab_size, (3, 77), generator=g)
    with torch.no_grad():
        want = reference(input_ids=ids).last_hidden_state
        got = ours(ids)
        assert got.shape == (3, 77, TINY.hidden_size)
        assert max_abs(got, want) <= 1e-5
        # Causal: a later token cannot change an earlier position; shorter inputs work too.
        changed = ids.clone()
        changed[:, 40:] = 7
        assert max_abs(ours(changed)[:, :40], got[:, :40]) == 0
        short = ids[:, :10]
        assert max_abs(ours(short), reference(input_ids=short).last_hidden_state) <= 1e-5


def test_state_dict_is_the_parameters():
    enc = TextEncoder(TINY)
    assert set(enc.state_dict()) == {n for n, _ in enc.named_parameters()}
    assert not list(enc.buffers())


def test_round_trip_to_transformers(reference, tmp_path):
    sd = reference.state_dict()
    ours = text_encoder_from_transformers(sd)
    assert all(k.startswith("text_model.") for k in ours)
    back = text_encoder_to_transformers(ours)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)
    # transformers 5's in-memory keys have no `text_model.`; the published files have it.
    unprefixed = {k.removeprefix("text_model."): v for k, v in back.items()}
    assert unprefixed.keys() == sd.keys() and all(torch.equal(unprefixed[k], sd[k]) for k in sd)
    # The exported dict is a CLIPTextModel file that transformers reads.
    from safetensors.torch import save_file
    reference.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in back.items()}, str(tmp_path / "model.safetensors"))
    again = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 77))
    with torch.no_grad():
        assert max_abs(again(input_ids=ids).last_hidden_state,
                       reference(input_ids=ids).last_hidden_state) == 0


def test_published_layout_with_position_ids_loads(reference):
    """A transformers 4.x / CompVis state dict: `text_model.` keys plus the position_ids buffer."""
    old = {"text_model." + k: v for k, v in reference.state_dict().items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ours = text_encoder_from_transformers(old)
    assert "text_model.embeddings.position_ids" not in ours and len(ours) == len(old) - 1
    load_into(TextEncoder(TINY), ours, "old.ckpt", "text encoder")


def test_wrong_weights_fail_loudly(reference):
    sd = text_encoder_from_transformers(reference.state_dict())
    with pytest.raises(WeightsError, match="text_model.final_layer_norm.weight"):
        load_into(TextEncoder(TINY), {k: v for k, v in sd.items() if "final_layer_norm.w" not in k},
                  "x.safetensors", "text encoder")
    with pytest.raises(WeightsError, match="shape"):
        load_into(TextEncoder(dataclasses.replace(TINY, vocab_size=999)), sd,
                  "x.safetensors", "text encoder")


def test_sd15_keys_and_shapes_on_meta():
    # CLIPTextConfig()'s defaults are ViT-B/32's text tower (width 512); SD 1.x uses ViT-L/14's.
    with torch.device("meta"):
        ours = TextEncoder(TextConfig()).state_dict()
        theirs = transformers.CLIPTextModel(hf_config(TextConfig())).state_dict()
    assert len(ours) == 12 * 16 + 4  # 16 tensors a layer, 2 embeddings, final norm weight and bias
    mapped = text_encoder_from_transformers(theirs)
    assert mapped.keys() == ours.keys()
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert ours["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    back = {k.removeprefix("text_model."): v for k, v in text_encoder_to_transformers(ours).items()}
    assert back.keys() == theirs.keys()
    assert all(back[k].shape == theirs[k].shape for k in theirs)


def test_export_without_python_branches():
    enc = TextEncoder(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 77))
    program = torch.export.export(enc, (ids,))
    with torch.no_grad():
        assert max_abs(program.module()(ids), enc(ids)) == 0
