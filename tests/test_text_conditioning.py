"""Report encoders (offline backends), the AVA-TLS token squeeze and its InfoNCE loss, and the config registry."""

from __future__ import annotations

import json

import pytest
import torch

from diffcxr_aug.config import RecipeError, load_recipe
from diffcxr_aug.generator.ava_tls import ImageTower, info_nce, same_text_mask
from diffcxr_aug.generator.configs import (
    GENERATOR_CONFIGS,
    PAPER_GFLOPS,
    GeneratorConfig,
    config_flops,
    get_config,
    resolve_config,
)
from diffcxr_aug.generator.settings import GeneratorSettings
from diffcxr_aug.generator.text_encoder import (
    build_wordpiece_tokenizer,
    encode_tokens,
    load_text_encoder,
    minilm_path,
    tokenize,
)
from diffcxr_aug.generator.token_squeeze import TokenSqueeze
from tests.conftest import write_tiny_open_clip

REPORTS = ["The heart is enlarged.", "Normal heart size. No pneumothorax.", ""]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert(folder, reports=REPORTS, hidden=16):
    from transformers import BertConfig, BertModel

    tokenizer = build_wordpiece_tokenizer(reports, 100, 32)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------ text encoders
def test_minilm_from_the_wheel_gives_per_token_states():
    assert (minilm_path() / "model.safetensors").is_file()
    bundle = load_text_encoder("minilm", max_length=256)
    assert bundle.backend == "minilm" and bundle.hidden_size == 384 and bundle.max_length == 256
    with torch.no_grad():
        states, mask = encode_tokens(bundle.model, tokenize(bundle.tokenizer, REPORTS, bundle.max_length))
    assert states.shape[:2] == mask.shape and states.shape[0] == 3 and states.shape[2] == 384
    assert mask.sum(dim=1).tolist()[2] == 2  # the empty report is [CLS] [SEP]
    assert mask[0].sum() > mask[2].sum()


def test_transformers_model_saved_locally_loads_by_path(tmp_path):
    model, _ = _tiny_bert(tmp_path / "bert")
    bundle = load_text_encoder(str(tmp_path / "bert"), max_length=256)
    assert bundle.backend == "transformers" and bundle.max_length == 32  # capped by the model's context
    torch.testing.assert_close(
        bundle.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight, rtol=0, atol=0
    )
    with pytest.raises(FileNotFoundError, match="Cannot load text encoder"):
        load_text_encoder(str(tmp_path / "missing"), max_length=16)


def test_open_clip_local_dir_hands_over_its_hf_text_tower(tmp_path):
    """A tiny open_clip model with an HF BERT text tower (BiomedCLIP's layout), saved as a local folder."""
    import open_clip
    from safetensors.torch import save_file

    _, tokenizer = _tiny_bert(tmp_path / "bert")
    clip_dir = tmp_path / "clip"
    write_tiny_open_clip(clip_dir, tmp_path / "bert", tokenizer, context_length=24)
    clip = open_clip.create_model(f"local-dir:{clip_dir}")
    # The CLIP checkpoint's text weights (here shifted by 1) must win over the HF model it was built from.
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    key = "text.transformer.embeddings.word_embeddings.weight"
    state[key] = state[key] + 1.0
    save_file(state, clip_dir / "open_clip_model.safetensors")

    bundle = load_text_encoder(f"local-dir:{clip_dir}", max_length=256)
    assert bundle.backend == "open_clip" and bundle.max_length == 24 and bundle.hidden_size == 16
    torch.testing.assert_close(bundle.model.embeddings.word_embeddings.weight, state[key], rtol=0, atol=0)
    with torch.no_grad():
        states, mask = encode_tokens(bundle.model, tokenize(bundle.tokenizer, REPORTS[:2], bundle.max_length))
    assert states.shape == (2, mask.shape[1], 16)


def test_scratch_encoder_tokenizer_is_built_from_reports_deterministically():
    reports = ["Mild pulmonary edema.", "Small left pleural effusion.", "No pneumothorax."] * 3
    a = build_wordpiece_tokenizer(reports, 60, 32)
    b = build_wordpiece_tokenizer(list(reversed(reports)), 60, 32)
    assert a.get_vocab() == b.get_vocab()
    assert "effusion" in a.get_vocab() and "[PAD]" in a.get_vocab()
    ids = a("Pleural edemas. Mildly")["input_ids"]
    assert ids[0] == a.cls_token_id and ids[-1] == a.sep_token_id
    assert a.unk_token_id not in ids  # unseen words of seen characters fall back to characters, not [UNK]
    bundle = load_text_encoder(
        "scratch",
        32,
        reports=reports,
        scratch_config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
    )
    assert bundle.backend == "scratch" and bundle.model.config.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match="pass reports"):
        load_text_encoder("scratch", 32)


# ------------------------------------------------------------------------------------------------ token squeeze
@pytest.mark.parametrize("num_tokens", [32, 77, 128])
def test_squeeze_shapes_for_the_papers_sweep(num_tokens):
    torch.manual_seed(0)
    squeeze = TokenSqueeze(
        text_dim=24, cross_attention_dim=16, num_tokens=num_tokens, width=16, num_heads=2, embed_dim=8
    )
    states, mask = torch.randn(3, 200, 24), torch.ones(3, 200, dtype=torch.long)
    out = squeeze(states, mask)
    assert out.tokens.shape == (3, num_tokens, 16) and out.attention_mask is None and out.pooled.shape == (3, 8)
    truncate = TokenSqueeze(text_dim=24, cross_attention_dim=16, num_tokens=num_tokens, mode="truncate")
    short = truncate(states[:, :40], mask[:, :40])
    assert short.tokens.shape == (3, num_tokens, 16) and short.pooled is None
    assert short.attention_mask.sum(dim=1).tolist() == [min(40, num_tokens)] * 3


def test_squeeze_ignores_padding():
    torch.manual_seed(0)
    squeeze = TokenSqueeze(text_dim=8, cross_attention_dim=8, num_tokens=4, width=8, num_heads=2, embed_dim=4).eval()
    states = torch.randn(1, 10, 8)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    garbage = states.clone()
    garbage[:, 6:] = 100.0 * torch.randn(1, 4, 8)
    with torch.no_grad():
        a, b = squeeze(states, mask), squeeze(garbage, mask)
        c = squeeze(states[:, :6])
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.tokens, c.tokens, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        unmasked = squeeze(garbage)
    assert not torch.allclose(a.tokens, unmasked.tokens)


def test_squeeze_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    squeeze = TokenSqueeze(
        text_dim=8, cross_attention_dim=12, num_tokens=5, width=8, num_layers=1, num_heads=2, embed_dim=4
    ).eval()
    squeeze.save_pretrained(tmp_path / "squeeze")
    loaded = TokenSqueeze.from_pretrained(tmp_path / "squeeze").eval()
    assert loaded.config.num_tokens == 5 and loaded.config.mode == "squeeze"
    states = torch.randn(2, 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(squeeze(states).tokens, loaded(states).tokens, rtol=0, atol=0)


def test_squeeze_validates_arguments():
    with pytest.raises(ValueError, match="Unsupported squeeze mode 'pool'.*squeeze, truncate"):
        TokenSqueeze(text_dim=8, cross_attention_dim=8, mode="pool")
    with pytest.raises(ValueError, match=r"width \(10\) must be divisible by num_heads \(4\)"):
        TokenSqueeze(text_dim=8, cross_attention_dim=8, width=10, num_heads=4)
    with pytest.raises(ValueError, match="num_tokens"):
        TokenSqueeze(text_dim=8, cross_attention_dim=8, num_tokens=0)
    with pytest.raises(ValueError, match="norm_num_groups"):
        ImageTower(block_out_channels=(12, 16), norm_num_groups=8)


# ------------------------------------------------------------------------------------------------------ InfoNCE
def test_info_nce_is_symmetric_and_lower_for_aligned_pairs():
    torch.manual_seed(0)
    text = torch.randn(6, 16)
    image = text + 0.1 * torch.randn(6, 16)
    scale = torch.tensor(2.0)
    aligned = info_nce(text, image, scale)
    shuffled = info_nce(text, image[torch.tensor([1, 2, 3, 4, 5, 0])], scale)
    assert float(aligned) < float(shuffled)
    torch.testing.assert_close(info_nce(text, image, scale), info_nce(image, text, scale))
    # The temperature is capped at CLIP's 100.
    torch.testing.assert_close(
        info_nce(text, image, torch.tensor(50.0)), info_nce(text, image, torch.tensor(4.61)), rtol=1e-2, atol=1e-2
    )
    with pytest.raises(ValueError, match="differ"):
        info_nce(text, image[:, :8], scale)


def test_info_nce_does_not_push_apart_identical_reports():
    reports = ["No acute process.", "No  acute process.", "Large effusion."]
    mask = same_text_mask(reports)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    image = torch.tensor([[1.0, 0.2], [1.0, -0.3], [0.0, 1.0]])

    def text_grad(positive_mask):
        text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
        info_nce(text, image, torch.tensor(2.0), positive_mask).backward()
        return text.grad

    # Without the mask the two copies of one report are asked to match different images (opposite pulls);
    # with it both copies are treated alike.
    plain, masked = text_grad(None), text_grad(mask)
    assert not torch.allclose(plain[0], plain[1])
    torch.testing.assert_close(masked[0], masked[1])


def test_image_tower_embeds_latents_and_round_trips(tmp_path):
    torch.manual_seed(0)
    tower = ImageTower(in_channels=4, block_out_channels=(8, 16), embed_dim=6, norm_num_groups=4).eval()
    latents = torch.randn(3, 4, 16, 16)
    tower.save_pretrained(tmp_path / "tower")
    loaded = ImageTower.from_pretrained(tmp_path / "tower").eval()
    with torch.no_grad():
        assert tower(latents).shape == (3, 6)
        torch.testing.assert_close(tower(latents), loaded(latents), rtol=0, atol=0)
    assert float(loaded.logit_scale.detach()) == pytest.approx(float(tower.logit_scale.detach()))


# ------------------------------------------------------------------------------------------------------ configs
def test_registry_entries_build_and_count_flops():
    assert set(GENERATOR_CONFIGS) == {"tiny", "tiny-512", "phantom-64", "phantom-128", "paper-256", "paper-512"}
    paper = get_config("paper-256")
    assert (
        paper.image_size == 256
        and paper.num_tokens == 77
        and paper.text_encoder.endswith("BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    )
    figures = {name: config_flops(cfg) for name, cfg in GENERATOR_CONFIGS.items()}
    assert figures["paper-256"]["latent_size"] == 32  # SD VAE: 256 px -> 4 x 32 x 32
    assert (
        figures["tiny"]["gflops_per_step"]
        < figures["phantom-64"]["gflops_per_step"]
        < figures["paper-256"]["gflops_per_step"]
    )
    # FlopCounterMode counts multiply and add (2 x MACs); the paper's 29.641 reads as MACs (bench/generator_flops.py).
    assert abs(figures["paper-256"]["gflops_per_step"] / 2 - PAPER_GFLOPS) / PAPER_GFLOPS < 0.05


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="scratch.*must be 'train'"):
        GeneratorConfig(**{**get_config("tiny").to_dict(), "text_encoder_policy": "frozen"})
    with pytest.raises(ValueError, match="needs text_encoder 'scratch'"):
        GeneratorConfig(**{**get_config("phantom-64").to_dict(), "text_encoder_policy": "train"})
    with pytest.raises(ValueError, match="Unsupported prediction_type 'x0'"):
        GeneratorConfig(**{**get_config("tiny").to_dict(), "prediction_type": "x0"})
    with pytest.raises(ValueError, match="Unknown generator config keys"):
        GeneratorConfig.from_dict({**get_config("tiny").to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="Unknown generator config 'big'.*tiny"):
        get_config("big")
    cfg = resolve_config(GeneratorSettings(config="phantom-64", num_tokens=32, text_encoder="scratch"))
    assert cfg.num_tokens == 32 and cfg.text_encoder_policy == "train" and cfg.unet == get_config("phantom-64").unet
    assert resolve_config(GeneratorSettings(config="phantom-64")) == get_config("phantom-64")
    round_trip = GeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert round_trip.to_dict() == json.loads(json.dumps(cfg.to_dict()))
    # A config stored before vae_crop_size existed (in an older checkpoint) still loads: whole-image VAE training.
    older = {key: value for key, value in get_config("phantom-128").to_dict().items() if key != "vae_crop_size"}
    assert GeneratorConfig.from_dict(older).vae_crop_size is None and get_config("phantom-128").vae_crop_size == 64


def test_recipe_rejects_bad_generator_values(tmp_path):
    for body, match in [
        ("generator:\n  config: huge\n", "unknown generator config 'huge'"),
        ("generator:\n  text_encoder_policy: thaw\n", "text_encoder_policy"),
        ("generator:\n  prediction_type: sample\n", "prediction_type"),
        ("generator:\n  cfg_dropout: 1.5\n", "cfg_dropout"),
    ]:
        path = tmp_path / "r.yaml"
        path.write_text(body)
        with pytest.raises(RecipeError, match=match):
            load_recipe(path)
    path.write_text("generator:\n  mixed_precision: no\n")  # YAML reads a bare `no` as False
    assert load_recipe(path).generator.mixed_precision == "no"
