"""The DKIM adapter in the pipeline at tiny size: identity at step 0, dkim_scale, knowledge sources, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffcxr_aug.generator.configs import build_unet, get_config
from diffcxr_aug.generator.disease_adapter import DiseaseKnowledgeAdapter
from diffcxr_aug.generator.knowledge import KnowledgeTemplates
from diffcxr_aug.generator.pipeline import DiffCXRPipeline, default_scheduler
from diffcxr_aug.generator.text_encoder import build_scratch_encoder
from diffcxr_aug.generator.token_squeeze import TokenSqueeze
from diffcxr_aug.generator.vae import build_vae

pytestmark = pytest.mark.usefixtures("one_thread")

REPORTS = ["The heart is enlarged. Small left pleural effusion.", "No acute cardiopulmonary abnormality."]
LABELS = [{"Cardiomegaly": 1, "Pleural Effusion": 1}, {"No Finding": 1, "Pneumothorax": 0}]


def tiny_stage1(mode: str = "squeeze") -> DiffCXRPipeline:
    """A stage-1 pipeline from the registry's tiny config, randomly initialised (seeded), 32 px."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    vae = build_vae("tiny", sample_size=cfg.image_size)
    text_encoder, tokenizer = build_scratch_encoder(REPORTS, cfg.scratch_text, cfg.max_text_tokens)
    torch.manual_seed(0)
    squeeze = TokenSqueeze(
        text_dim=text_encoder.config.hidden_size,
        cross_attention_dim=cfg.cross_attention_dim,
        num_tokens=cfg.num_tokens,
        mode=mode,
        **cfg.squeeze,
    )
    torch.manual_seed(0)
    unet = build_unet(cfg, latent_channels=4, latent_size=cfg.image_size // 2)
    pipe = DiffCXRPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        token_squeeze=squeeze,
        unet=unet,
        scheduler=default_scheduler(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")),
        max_text_tokens=cfg.max_text_tokens,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_adapter(pipe: DiffCXRPipeline, adapter: DiseaseKnowledgeAdapter | None = None) -> DiffCXRPipeline:
    components = {**pipe.components, "adapter": adapter or DiseaseKnowledgeAdapter.from_unet(pipe.unet)}
    out = DiffCXRPipeline(**components, max_text_tokens=pipe.config.max_text_tokens)
    out.set_progress_bar_config(disable=True)
    return out


def simulate_training(adapter: DiseaseKnowledgeAdapter, seed: int = 0) -> None:
    """Give the zero convolutions random weights, as training would move them away from zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for conv in [*adapter.zero_convs, adapter.zero_conv_mid]:
            conv.weight.normal_(std=0.5)
            conv.bias.normal_(std=0.5)


def sample(pipe: DiffCXRPipeline, **kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    out = pipe(REPORTS, num_inference_steps=2, guidance_scale=2.0, generator=generators, output_type="pt", **kwargs)
    return out.images


@pytest.fixture(scope="module")
def stage1() -> tuple[DiffCXRPipeline, torch.Tensor]:
    torch.set_num_threads(1)
    pipe = tiny_stage1()
    return pipe, sample(pipe)


def test_untrained_adapter_gives_stage1_images_exactly(stage1):
    pipe, reference = stage1
    dkim = with_adapter(pipe)
    calls = []
    dkim.adapter.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    out = dkim(
        REPORTS, num_inference_steps=2, guidance_scale=2.0, generator=generators, output_type="pt", labels=LABELS
    )
    # The adapter ran at every step on both CFG branches, and its zero convolutions added exact zeros.
    assert calls == [4, 4]
    assert torch.equal(out.images, reference)
    assert out.knowledge == [
        "There is cardiomegaly. There is a pleural effusion.",
        "No acute cardiopulmonary abnormality.",
    ]
    # The same from the labeler's reading of the reports, and from knowledge text given directly.
    assert torch.equal(sample(dkim), reference)
    assert torch.equal(sample(dkim, knowledge=["There is a fracture.", ""]), reference)


def test_dkim_scale_zero_is_stage1_after_training(stage1):
    pipe, reference = stage1
    dkim = with_adapter(pipe)
    simulate_training(dkim.adapter)
    full = sample(dkim, labels=LABELS)
    assert not torch.equal(full, reference)
    assert not torch.equal(sample(dkim, labels=LABELS, dkim_scale=0.5), full)
    assert torch.equal(sample(dkim, labels=LABELS, dkim_scale=0.0), reference)
    # The knowledge matters once trained: another finding, another image.
    assert not torch.equal(sample(dkim, labels=[{"Fracture": 1}, {"Edema": 1}]), full)
    assert dkim(REPORTS[0], num_inference_steps=1, dkim_scale=0.0, output_type="pt").knowledge is None


def test_save_with_adapter_loads_with_and_without_it(stage1, tmp_path):
    pipe, reference = stage1
    templates = KnowledgeTemplates(present="Findings: {finding}.")
    adapter = DiseaseKnowledgeAdapter.from_unet(pipe.unet, knowledge_templates=templates, knowledge_states="all")
    simulate_training(adapter)
    dkim = with_adapter(pipe, adapter)
    trained = sample(dkim, labels=LABELS)
    dkim.save_pretrained(tmp_path, safe_serialization=True)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["adapter"] == ["diffcxr_aug.generator.disease_adapter", "DiseaseKnowledgeAdapter"]

    loaded = DiffCXRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.adapter, DiseaseKnowledgeAdapter)
    assert loaded.adapter.knowledge_templates == templates and loaded.adapter.config.knowledge_states == "all"
    assert (
        loaded.knowledge_text(REPORTS, LABELS)[1] == "No acute cardiopulmonary abnormality. There is no pneumothorax."
    )
    assert torch.equal(sample(loaded, labels=LABELS), trained)

    without = DiffCXRPipeline.from_pretrained(tmp_path, adapter=None)
    without.set_progress_bar_config(disable=True)
    assert without.adapter is None
    assert torch.equal(sample(without), reference)


def test_folder_saved_without_adapter_still_loads(stage1, tmp_path):
    pipe, reference = stage1
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not (tmp_path / "adapter").exists()
    # Folders written before the adapter existed may lack the key altogether.
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.pop("adapter", None)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = DiffCXRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.adapter is None
    assert torch.equal(sample(loaded), reference)
    out = loaded(REPORTS, num_inference_steps=1, output_type="np", return_dict=False)
    assert len(out) == 1 and out[0].shape == (2, 32, 32, 1)


def test_knowledge_inputs_are_checked(stage1):
    pipe, _ = stage1
    with pytest.raises(ValueError, match="has none"):
        pipe(REPORTS, num_inference_steps=1, labels=LABELS)
    dkim = with_adapter(pipe)
    with pytest.raises(ValueError, match="not both"):
        dkim(REPORTS, num_inference_steps=1, labels=LABELS, knowledge=["a", "b"])
    with pytest.raises(ValueError, match="Got 1 knowledge for 2 reports"):
        dkim(REPORTS, num_inference_steps=1, knowledge="There is edema.")
    with pytest.raises(ValueError, match="dkim_scale"):
        dkim(REPORTS, num_inference_steps=1, dkim_scale=-1.0)
    with pytest.raises(ValueError, match="unknown label 'Effusion'"):
        dkim(REPORTS, num_inference_steps=1, labels=[{"Effusion": 1}, {}])


def test_adapter_masks_padded_knowledge_tokens():
    """With the truncate squeeze (AVA-TLS off) knowledge tokens carry padding; what lies there is ignored."""
    cfg = get_config("tiny")
    torch.manual_seed(0)
    adapter = DiseaseKnowledgeAdapter.from_unet(build_unet(cfg, latent_channels=4, latent_size=8))
    simulate_training(adapter)
    sample_, tokens = torch.randn(2, 4, 8, 8), torch.randn(2, cfg.num_tokens, cfg.cross_attention_dim)
    mask = torch.ones(2, cfg.num_tokens, dtype=torch.long)
    mask[:, 5:] = 0
    noisy = tokens.clone()
    noisy[:, 5:] = 100.0
    with torch.no_grad():
        a = adapter(sample_, 10, tokens, encoder_attention_mask=mask)
        b = adapter(sample_, 10, noisy, encoder_attention_mask=mask)
        c = adapter(sample_, 10, noisy)
    assert len(a.down_block_res_samples) == 4  # conv_in + 1 resnet + 1 downsampler + 1 resnet
    assert torch.allclose(a.mid_block_res_sample, b.mid_block_res_sample, atol=1e-5)
    assert not torch.allclose(a.mid_block_res_sample, c.mid_block_res_sample, atol=1e-3)


def test_from_unet_copies_weights_and_refuses_what_it_cannot_copy():
    cfg = get_config("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg, latent_channels=4, latent_size=8)
    adapter = DiseaseKnowledgeAdapter.from_unet(unet)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        theirs = getattr(unet, name).state_dict()
        assert all(torch.equal(t, theirs[k]) for k, t in getattr(adapter, name).state_dict().items())
    assert all(not p.any() for p in [*adapter.zero_conv_mid.parameters(), *adapter.zero_convs.parameters()])
    with_classes = {k: v for k, v in unet.config.items() if not k.startswith("_")} | {"num_class_embeds": 3}
    with pytest.raises(ValueError, match="num_class_embeds=3"):
        DiseaseKnowledgeAdapter.from_unet(UNet2DConditionModel(**with_classes))
    with pytest.raises(ValueError, match="knowledge_states 'some'"):
        DiseaseKnowledgeAdapter.from_unet(unet, knowledge_states="some")
