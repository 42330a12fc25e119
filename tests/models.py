"""Tiny randomly initialised models for fast tests (seconds on 2 CPU cores)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
)

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
#: the reference implementation's name for the layout the installed transformers builds
HF_KIND = "hf5" if TRANSFORMERS_MAJOR >= 5 else "hf4"
#: ``LegacyViT`` rebuilds the 4.x layout from a 5.x model; under transformers 4.x the models
#: have that layout natively (CI runs the GradMask tests under both)
needs_transformers_5 = pytest.mark.skipif(
    TRANSFORMERS_MAJOR < 5, reason="LegacyViT wraps a transformers 5.x model"
)


def hf_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a Hugging Face ViT/DeiT in either layout."""
    base = model.vit if hasattr(model, "vit") else model.deit
    return base.layers if hasattr(base, "layers") else base.encoder.layer


TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=24,
    num_hidden_layers=3,
    num_attention_heads=3,
    intermediate_size=48,
    num_labels=7,
)


def tiny_hf_vit(**overrides) -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(**{**TINY, **overrides})).eval()


def tiny_hf_deit(teacher: bool = False, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = DeiTConfig(**{**TINY, **overrides})
    cls = DeiTForImageClassificationWithTeacher if teacher else DeiTForImageClassification
    model = cls(config).eval()
    # DeiT initialises CLS/distillation tokens and positions to zero; random values exercise them.
    with torch.no_grad():
        emb = model.deit.embeddings
        for p in (emb.cls_token, emb.distillation_token, emb.position_embeddings):
            p.normal_(0, 0.5)
    return model


def tiny_timm_vit(**overrides) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kwargs = dict(
        img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=7
    )
    return VisionTransformer(**{**kwargs, **overrides}).eval()


def tiny_timm_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0, num_classes=7
    ).eval()
    with torch.no_grad():
        model.dist_token.normal_(0, 0.5)
    return model


class _LegacySelfAttention(nn.Module):
    def __init__(self, query: nn.Linear, key: nn.Linear, value: nn.Linear, heads: int) -> None:
        super().__init__()
        self.query, self.key, self.value, self.heads = query, key, value, heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return ((probs @ v).transpose(1, 2).reshape(b, t, d),)


class _LegacySelfOutput(nn.Module):
    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.dense = dense


class _LegacyAttention(nn.Module):
    def __init__(self, attention: nn.Module, heads: int) -> None:
        super().__init__()
        self.attention = _LegacySelfAttention(
            attention.q_proj, attention.k_proj, attention.v_proj, heads
        )
        self.output = _LegacySelfOutput(attention.o_proj)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.output.dense(self.attention(x)[0]),)


class _LegacyLayer(nn.Module):
    def __init__(self, layer: nn.Module, heads: int) -> None:
        super().__init__()
        self.attention = _LegacyAttention(layer.attention, heads)
        self.layernorm_before, self.layernorm_after = layer.layernorm_before, layer.layernorm_after
        self.mlp = layer.mlp

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = x + self.attention(self.layernorm_before(x))[0]
        return (x + self.mlp(self.layernorm_after(x)),)


class _LegacyEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class _LegacyBase(nn.Module):
    def __init__(self, base: nn.Module, heads: int) -> None:
        super().__init__()
        self.embeddings = base.embeddings
        self.encoder = _LegacyEncoder([_LegacyLayer(layer, heads) for layer in base.layers])
        self.layernorm = base.layernorm


class LegacyViT(nn.Module):
    """A ViT with the transformers 4.x module layout (``vit.encoder.layer[i].attention.attention
    .query``, ``attention.output.dense``), sharing the weights of a 5.x model, with 4.x-style
    tuple outputs from its layers."""

    base_model_prefix = "vit"

    def __init__(self, model: ViTForImageClassification) -> None:
        super().__init__()
        self.config = model.config
        self.vit = _LegacyBase(model.vit, model.config.num_attention_heads)
        self.classifier = model.classifier

    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        x = self.vit.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        for layer in self.vit.encoder.layer:
            x = layer(x)[0]
        return self.classifier(self.vit.layernorm(x)[:, 0])


# --- today's ViT families, tiny and random, patch 14 where the family uses it -------------------

#: a 2 x 2 patch grid at patch 14; wide enough for 3 heads and 4 channel groups
FAMILY_VISION = dict(
    image_size=28,
    patch_size=14,
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=3,
)
FAMILY_TEXT = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=3)


def _spread(model: nn.Module, *modules: nn.Module) -> nn.Module:
    """Random-normal weights on the output layers (their default initialisation is near zero
    or zero, which makes every softmax uniform and every map a tie)."""
    with torch.no_grad():
        for module in modules:
            module.weight.normal_(0, 1)
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0, 1)
    return model.eval()


def tiny_hf_clip_vision(kind: str = "classifier", siglip: bool = False) -> nn.Module:
    """A Hugging Face CLIP / SigLIP vision model: ``kind`` is ``"tower"``
    (``*VisionModel``), ``"projection"`` (``CLIPVisionModelWithProjection``) or
    ``"classifier"`` (``*ForImageClassification``)."""
    from transformers import (
        CLIPConfig,
        CLIPForImageClassification,
        CLIPVisionConfig,
        CLIPVisionModel,
        CLIPVisionModelWithProjection,
        SiglipConfig,
        SiglipForImageClassification,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    if kind == "classifier":
        config_class, model_class = (
            (SiglipConfig, SiglipForImageClassification)
            if siglip
            else (CLIPConfig, CLIPForImageClassification)
        )
        config = config_class(vision_config=FAMILY_VISION, text_config=FAMILY_TEXT, num_labels=7)
        model = model_class(config)
        return _spread(model, model.classifier)
    if siglip:
        return SiglipVisionModel(SiglipVisionConfig(**FAMILY_VISION)).eval()
    if kind == "projection":
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**FAMILY_VISION, projection_dim=8))
        return _spread(model, model.visual_projection)
    return CLIPVisionModel(CLIPVisionConfig(**FAMILY_VISION)).eval()


def tiny_hf_dinov2(registers: int = 4) -> nn.Module:
    from transformers import (
        Dinov2Config,
        Dinov2ForImageClassification,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersForImageClassification,
    )

    torch.manual_seed(0)
    if registers:
        config = Dinov2WithRegistersConfig(
            **FAMILY_VISION, num_register_tokens=registers, num_labels=7
        )
        model = Dinov2WithRegistersForImageClassification(config)
        with torch.no_grad():  # initialised to zero: random ones tell them apart
            model.dinov2_with_registers.embeddings.register_tokens.normal_(0, 0.5)
    else:
        model = Dinov2ForImageClassification(Dinov2Config(**FAMILY_VISION, num_labels=7))
    return _spread(model, model.classifier)


def tiny_timm_eva(fused: bool = True, rope: bool = True, **overrides) -> nn.Module:
    """timm EVA-02 as ``eva02_*`` builds it (rotary embeddings, SwiGLU), tiny: fused qkv as
    ``eva02_tiny``/``small``, separate projections as ``eva02_base``/``large``."""
    import timm

    torch.manual_seed(0)
    kwargs = dict(
        img_size=28,
        embed_dim=24,
        depth=3,
        num_heads=3,
        num_classes=7,
        ref_feat_shape=(2, 2),
        qkv_fused=fused,
        use_rot_pos_emb=rope,
    )
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, **{**kwargs, **overrides})
    with torch.no_grad():  # q/v biases start at zero
        for block in model.blocks:
            for name in ("q_bias", "v_bias"):
                if getattr(block.attn, name, None) is not None:
                    getattr(block.attn, name).normal_(0, 0.5)
    return _spread(model, model.head)


def tiny_timm_beit(**overrides) -> nn.Module:
    """timm BEiT as ``beit_base_patch16_224`` builds it (relative position bias per layer, no
    absolute positions, mean pooling), tiny."""
    import timm

    torch.manual_seed(0)
    kwargs = dict(img_size=32, embed_dim=24, depth=3, num_heads=3, num_classes=7)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, **{**kwargs, **overrides})
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q_bias.normal_(0, 0.5)
            block.attn.v_bias.normal_(0, 0.5)
            if block.attn.relative_position_bias_table is not None:
                block.attn.relative_position_bias_table.normal_(0, 1)
    return _spread(model, model.head)


def tiny_torchvision_vit(image_size: int = 28) -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=image_size,
        patch_size=14,
        num_layers=3,
        num_heads=3,
        hidden_dim=24,
        mlp_dim=48,
        num_classes=7,
    )
    with torch.no_grad():
        model.class_token.normal_(0, 0.5)
    return _spread(model, model.heads.head)


def tiny_open_clip(pool: str = "tok") -> nn.Module:
    """An OpenCLIP CLIP model (needs ``open_clip_torch``): ViT image tower, patch 14."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(
        layers=3, width=24, head_width=8, patch_size=14, image_size=28, pool_type=pool
    )
    # the packaged tokenizer's vocabulary and context, so real prompts can be tokenized
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=24, heads=3, layers=1)
    return CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text).eval()


def tiny_clip_model(siglip: bool = False) -> nn.Module:
    """A Hugging Face ``CLIPModel`` / ``SiglipModel`` (image tower as FAMILY_VISION, 64-token
    vocabulary)."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    torch.manual_seed(0)
    text = {**FAMILY_TEXT, "vocab_size": 64, "max_position_embeddings": 16}
    text.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    if siglip:
        return SiglipModel(SiglipConfig(vision_config=FAMILY_VISION, text_config=text)).eval()
    config = CLIPConfig(vision_config=FAMILY_VISION, text_config=text, projection_dim=8)
    return CLIPModel(config).eval()


def save_zero_shot_checkpoint(folder, siglip: bool = False):
    """Save a tiny CLIP / SigLIP model with a processor whose tokenizer is a hand-made
    character-level CLIP BPE vocabulary (no tokenizer files can be fetched here); returns
    ``folder``."""
    import json
    import string
    from pathlib import Path

    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_clip_model(siglip=siglip)
    model.save_pretrained(folder)
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    vocab += [".", ".</w>", ",</w>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def tiny_hf_beit(relative: bool = False) -> nn.Module:
    """HF BEiT with its default mean-pooling head (optionally relative position bias)."""
    from transformers import BeitConfig, BeitForImageClassification

    torch.manual_seed(0)
    config = BeitConfig(**FAMILY_VISION, num_labels=7, use_relative_position_bias=relative)
    model = BeitForImageClassification(config)
    return _spread(model, model.classifier)
