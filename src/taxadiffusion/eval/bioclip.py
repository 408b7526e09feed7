"""BioCLIP score: 100 x cosine(BioCLIP image embedding, BioCLIP text embedding of the taxonomic name).

BioCLIP is an open_clip ViT-B/16 checkpoint; open_clip needs torchvision, which cannot be installed here,
so the checkpoint is converted into transformers' `CLIPModel` (open_clip and OpenAI CLIP share a layout;
only the names differ and q/k/v are packed). No library offers this conversion for a state dict.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError, MissingInput

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TOKENIZER = "openai/clip-vit-base-patch16"  # BioCLIP's tokenizer is OpenAI CLIP's BPE
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _tower_layers(state: dict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def clip_config_from_open_clip(state: dict, quick_gelu: bool = False):
    """A transformers CLIPConfig with the sizes read off an open_clip state dict."""
    from transformers import CLIPConfig

    vision_width = state["visual.class_embedding"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
    text_width = state["token_embedding.weight"].shape[1]
    act = "quick_gelu" if quick_gelu else "gelu"
    vocab = state["token_embedding.weight"].shape[0]
    return CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": text_width,
            "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _tower_layers(state, ""),
            "num_attention_heads": max(1, text_width // 64),
            "max_position_embeddings": state["positional_embedding"].shape[0],
            "hidden_act": act,
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        },
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _tower_layers(state, "visual."),
            "num_attention_heads": max(1, vision_width // 64),
            "image_size": grid * patch,
            "patch_size": patch,
            "hidden_act": act,
        },
        projection_dim=state["visual.proj"].shape[1],
    )


def convert_open_clip_state_dict(state: dict) -> dict:
    """open_clip CLIP keys -> transformers CLIPModel keys (q/k/v unpacked, projections transposed)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {
        "logit_scale": state["logit_scale"],
        "text_projection.weight": state["text_projection"].t().contiguous(),
        "visual_projection.weight": state["visual.proj"].t().contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
    }
    for source, target in (("", "text_model"), ("visual.", "vision_model")):
        for i in range(_tower_layers(state, source)):
            block = f"{source}transformer.resblocks.{i}."
            layer = f"{target}.encoder.layers.{i}."
            for old, new in _BLOCK.items():
                for param in ("weight", "bias"):
                    out[f"{layer}{new}.{param}"] = state[f"{block}{old}.{param}"]
            for param in ("weight", "bias"):
                q, k, v = state[f"{block}attn.in_proj_{param}"].chunk(3)
                out[f"{layer}self_attn.q_proj.{param}"] = q
                out[f"{layer}self_attn.k_proj.{param}"] = k
                out[f"{layer}self_attn.v_proj.{param}"] = v
    return out


def load_open_clip_checkpoint(path: str | Path) -> tuple[dict, bool]:
    """(state dict, quick_gelu) from a folder or file; a hub id is downloaded (online users only)."""
    path = Path(path)
    if not path.exists():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    folder = path if path.is_dir() else path.parent
    file = path if path.is_file() else next((folder / n for n in CHECKPOINT_NAMES if (folder / n).is_file()), None)
    if file is None:
        raise MissingInput(f"no open_clip checkpoint ({', '.join(CHECKPOINT_NAMES)}) in {folder}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    quick_gelu = False
    config_file = folder / "open_clip_config.json"
    if config_file.is_file():
        quick_gelu = bool(json.loads(config_file.read_text()).get("model_cfg", {}).get("quick_gelu", False))
    return state, quick_gelu


class BioCLIPScorer:
    """100 x cosine(image, text) with a BioCLIP (open_clip) checkpoint loaded into `CLIPModel`."""

    def __init__(self, checkpoint: str | Path, tokenizer: str | Path | None = None, device: str = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        state, quick_gelu = load_open_clip_checkpoint(checkpoint)
        config = clip_config_from_open_clip(state, quick_gelu)
        self.model = CLIPModel(config).eval().to(device)
        missing, unexpected = self.model.load_state_dict(convert_open_clip_state_dict(state), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise InputError(
                f"BioCLIP checkpoint does not convert cleanly: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        source = tokenizer or (checkpoint if (Path(checkpoint) / "vocab.json").is_file() else DEFAULT_TOKENIZER)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(source))
        self.image_size = config.vision_config.image_size
        self.device = device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> CLIP input: bicubic resize of the short side, centre crop, OpenAI normalisation."""
        x = images.float() / 255.0
        size = self.image_size
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        x = F.interpolate(
            x,
            size=(max(size, round(h * scale)), max(size, round(w * scale))),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size].clamp(0, 1)
        mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        features = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device))
        features = getattr(features, "pooler_output", features)
        return F.normalize(features.float(), dim=-1).cpu()

    def score(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B,) 100 x cosine of each image with its text."""
        return 100.0 * (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)


def taxon_text(names: tuple[str, ...], template: str = "{names}") -> str:
    """The text of a taxon for BioCLIP: the plain taxonomic names down to its rank by default."""
    return template.format(names=" ".join(names))
