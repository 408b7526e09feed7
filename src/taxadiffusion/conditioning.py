"""The taxonomy encoder: one transformer per rank over that rank's text features, summed coarse to fine.

Paper (TaxaDiffusion, sec. 3): the condition at stage k is c_k = sum_{i=0..k} E_i(tau(text_i)), where
tau is the frozen text encoder and E_i a small transformer encoder for rank i (2 layers, 8 heads,
width = text width). c_k is the UNet's `encoder_hidden_states`.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .errors import InputError
from .taxonomy import NONE_ID
from .text import none_rows


def drop_ranks(
    taxon_ids: torch.Tensor, p: float, cascade: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Condition dropout: per sample, each rank is dropped with probability `p`, at most one rank.

    Published (FishNet/BIOSCAN): p = 1/21, the dropped rank's text becomes `"<rank>: None"`. With
    `cascade`, every rank finer than the dropped one is dropped too. Needs p * ranks <= 1.
    """
    batch, ranks = taxon_ids.shape
    if not 0.0 <= p * ranks <= 1.0:
        raise InputError(f"dropout p={p} over {ranks} ranks: need 0 <= p * ranks <= 1 (at most one rank dropped)")
    if p == 0.0:
        return taxon_ids
    u = torch.rand(batch, generator=generator, device=generator.device if generator else "cpu")
    which = torch.floor(u / p).long().to(taxon_ids.device)  # rank r with probability p each; >= ranks: none
    levels = torch.arange(ranks, device=taxon_ids.device)
    hit = levels[None, :] >= which[:, None] if cascade else levels[None, :] == which[:, None]
    return taxon_ids.masked_fill(hit, NONE_ID)


def cut_to_coarsest(depth: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample, with probability `p`, condition on the coarsest rank alone (depth 1: c_0).

    Taxonomic CFG (paper, eq. 5) uses eps(x_t, c_0) as its negative branch. In the published schedule the
    UNet is frozen after stage 0, so c_0 keeps the meaning stage 0 gave it. When the UNet trains in later
    stages too (a model without a pretrained prior), nothing trains c_0 after stage 0 and the negative
    branch drifts; replaying c_0 on a fraction of samples keeps it trained, as condition dropout keeps the
    unconditional branch of vanilla CFG trained. p = 0 (the default) is the published schedule.
    """
    if not 0.0 <= p < 1.0:
        raise InputError(f"coarse dropout p={p}: need 0 <= p < 1")
    if p == 0.0:
        return depth
    u = torch.rand(depth.shape, generator=generator, device=generator.device if generator else "cpu")
    return torch.where(u.to(depth.device) < p, torch.ones_like(depth), depth)


class TaxonomyEncoder(ModelMixin, ConfigMixin):
    """Per-rank transformer encoders; output for depth d is the token-wise sum over ranks 0..d-1.

    An optional linear projection maps the text width to the UNet's cross-attention width when they
    differ (tiny models; SD 1.5 uses CLIP's 768 for both, so no projection, as published).
    """

    @register_to_config
    def __init__(
        self,
        num_ranks: int,
        text_width: int,
        cross_attention_dim: int | None = None,
        num_layers: int = 2,
        num_heads: int = 8,
        ff_mult: int = 4,
        dropout: float = 0.1,
        dim_feedforward: int | None = None,
    ):
        super().__init__()
        if text_width % num_heads:
            raise InputError(f"text width {text_width} is not divisible by {num_heads} heads")
        self.encoders = nn.ModuleList(
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    text_width,
                    num_heads,
                    # `dim_feedforward` (published: PyTorch's default 2048); encoders saved before it existed
                    # have `ff_mult` x width.
                    dim_feedforward=dim_feedforward or ff_mult * text_width,
                    dropout=dropout,
                    batch_first=True,
                ),
                num_layers,
                enable_nested_tensor=False,
            )
            if num_layers
            else nn.Identity()  # the text features themselves: a prior's own text path
            for _ in range(num_ranks)
        )
        out = cross_attention_dim or text_width
        self.proj = nn.Linear(text_width, out) if out != text_width else nn.Identity()
        self._frozen_below = 0
        if not num_layers:  # no parameters: a scalar gives the module a device and dtype, and diffusers a file
            self.register_buffer("anchor", torch.zeros(()))

    @property
    def num_ranks(self) -> int:
        return len(self.encoders)

    def freeze_below(self, level: int) -> None:
        """Freeze encoders of ranks < `level` (and the projection when level > 0); they stay in eval mode."""
        self._frozen_below = level
        for i, encoder in enumerate(self.encoders):
            encoder.requires_grad_(i >= level)
        self.proj.requires_grad_(level == 0)
        self.train(self.training)

    def train(self, mode: bool = True) -> TaxonomyEncoder:
        super().train(mode)
        # Frozen encoders never run dropout (the published code left it on).
        for encoder in self.encoders[: self._frozen_below]:
            encoder.eval()
        if self._frozen_below > 0:
            self.proj.eval()
        return self

    def forward(
        self,
        features: torch.Tensor,
        depth: int | torch.Tensor,
        frozen_sum: torch.Tensor | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """(B, R, L, D) text features and depth (int or (B,) long, 1..R) -> (B, L, cross_attention_dim).

        Training shortcut: `frozen_sum` is the already-computed sum of the encoders of ranks < `start`
        (frozen ones give fixed outputs per taxon; see `FrozenRankTables`), so only ranks >= `start` run.
        """
        batch, ranks = features.shape[:2]
        if ranks != self.num_ranks:
            raise ValueError(f"features have {ranks} ranks, the encoder {self.num_ranks}")
        depth_t = torch.as_tensor(depth, device=features.device).expand(batch) if not torch.is_tensor(depth) else depth
        deepest = int(depth_t.max())
        if not (int(depth_t.min()) >= 1 and deepest <= ranks):
            raise ValueError(f"depth must be in 1..{ranks}, got {depth_t.tolist()}")
        total = frozen_sum
        for level in range(start, deepest):
            encoded = self.encoders[level](features[:, level])
            keep = (depth_t > level).to(encoded.dtype)[:, None, None]
            term = encoded if bool(keep.all()) else encoded * keep
            total = term if total is None else total + term
        return self.proj(total)


class FrozenRankTables:
    """The outputs of frozen rank encoders for every taxon of their rank, computed once per stage.

    A frozen encoder (eval mode, no gradient) maps each taxon's text to a fixed output, so a training
    step can look the sum of ranks < `levels` up instead of running those encoders: stage k of the
    progressive schedule then runs one rank encoder instead of k + 1.
    """

    def __init__(
        self,
        encoder: TaxonomyEncoder,
        text_tables: list[torch.Tensor],
        levels: int,
        chunk: int = 256,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """`device`, `dtype`: where and how the tables are stored (default: the text tables'); each chunk is
        computed in fp32 on the encoder's device."""
        self.levels = levels
        self.tables = []
        with torch.no_grad():
            for level in range(levels):
                block = encoder.encoders[level]
                if block.training or any(p.requires_grad for p in block.parameters()):
                    raise ValueError(f"rank encoder {level} is not frozen; only frozen encoders can be tabulated")
                rows = text_tables[level]
                where = next(block.parameters(), rows).device
                store = {"device": device or rows.device, "dtype": dtype or rows.dtype}
                outputs = [
                    block(rows[i : i + chunk].to(where, torch.float32)).to(**store) for i in range(0, len(rows), chunk)
                ]
                self.tables.append(torch.cat(outputs))

    def sum(self, taxon_ids: torch.Tensor, depth: torch.Tensor) -> torch.Tensor | None:
        """(B, R) ids (negative: the "None" row) and (B,) depths -> sum over ranks < min(depth, levels)."""
        total = None
        for level, table in enumerate(self.tables):
            ids = none_rows(taxon_ids[:, level].to(table.device), table.shape[0])
            term = table[ids] * (depth.to(table.device) > level).to(table.dtype)[:, None, None]
            total = term if total is None else total + term
        return total
