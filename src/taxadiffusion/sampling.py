"""How images are sampled: one `SamplingSettings` for the config, the pipeline's saved defaults, evaluation,
the CLI and the app.

Published (TaxaDiffusion, as Stable Diffusion samples): PNDM, 25 steps, taxonomic guidance at s = 9.0 over the
whole schedule. A trained pipeline saves the settings of its run (`sampling.json`), so `sample`, `evaluate`
and the app start from what the model was trained and evaluated with.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .checks import check_choice, check_integer, check_range, check_window
from .choices import Choice
from .guidance import Guidance
from .options import option

SETTINGS_FILE = "sampling.json"


class Negative(Choice):
    """What the negative branch of guidance reads.

    ENCODED (the project's): the rank encoders' output, for vanilla CFG every rank "None", for taxonomic CFG
    c_0 at every depth (at depth 1 that is the condition itself, so guidance changes nothing there). It is the
    input condition dropout trains, so a model without a pretrained prior (whose UNet never saw raw text
    features) has a trained negative.
    TEXT (published): the raw text-encoder features, never passed through the rank encoders: the empty prompt
    for vanilla CFG, and at depth 1 `"<first rank>: None"` for taxonomic CFG (c_0 at depth > 1). On a
    pretrained prior these are what its UNet knows as unconditional.
    """

    ENCODED = "encoded"
    TEXT = "text"


class Scheduler(Choice):
    PNDM = "pndm"  # published (Stable Diffusion's default)
    DDIM = "ddim"
    DPM = "dpm"  # DPM-Solver++ (multistep)


class Spacing(Choice):
    """Where the sampling timesteps fall among the training's (diffusers' `timestep_spacing`; Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2).

    LEADING (published: Stable Diffusion's scheduler config): multiples of about T / n counted up from 0, so the
    first step lies below T - 1 by up to T / n (DPM-Solver++ at 8 steps: t = 888 of 999; PNDM at 25: 960). The
    sampler then starts from pure noise at a time where the model was trained to see a trace of the image, and
    the fewer the steps, the larger that trace. TRAILING: counted down from T - 1, so the first step is at
    t = T - 1 whatever n. LINSPACE: n points evenly from 0 to T - 1.
    """

    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


# The `fast` preset (`--fast`): the fastest setting that kept species accuracy within 1 point and KID within its
# standard deviation of the published PNDM 25 on both measured models, the demo's and Table 1's Fish4Knowledge
# model (benchmarks/results/sampling.md, sampling_f4k.md). Trailing spacing is what holds it on the second: with
# the published leading spacing the same 8 steps lost 5 points there.
FAST = {"scheduler": "dpm", "steps": 8, "spacing": "trailing"}


@dataclass
class SamplingSettings:
    scheduler: str = option(Scheduler.PNDM.value, "sampler; published: pndm", choices=Scheduler)
    steps: int = option(25, "sampling steps; published: 25")
    guidance: str = option(Guidance.TAXONOMIC.value, "guidance rule; published: taxonomic", choices=Guidance)
    scale: float = option(9.0, "guidance scale s = 1 + w; published: 9.0")
    window: tuple[float, float] = option((0.0, 1.0), "fractions of the schedule guided", metavar=("R0", "R1"))
    negative: str = option(
        Negative.ENCODED.value,
        "guidance's negative branch: rank-encoded, or raw text features as published",
        choices=Negative,
    )
    spacing: str = option(
        Spacing.LEADING.value,
        "where the steps fall: leading (published) starts below the last training step, trailing at it",
        choices=Spacing,
    )

    # The prefix of the keys in messages ("sample." in a run's config).
    key_prefix = ""

    def __post_init__(self) -> None:
        key = self.key_prefix
        for name, choice in (("scheduler", Scheduler), ("guidance", Guidance), ("negative", Negative)):
            check_choice(f"{key}{name}", getattr(self, name), choice)
        check_choice(f"{key}spacing", self.spacing, Spacing)
        check_integer(f"{key}steps", self.steps, 1)
        check_range(f"{key}scale", self.scale, 0)
        self.window = check_window(f"{key}window", self.window)

    def sampling(self) -> SamplingSettings:
        """The settings alone (a run's config section holds more)."""
        return SamplingSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)})

    def replace(self, **changes) -> SamplingSettings:
        """A copy with the given settings changed; a change of None keeps the value (an option not given)."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "window" in given:
            given["window"] = tuple(given["window"])
        return dataclasses.replace(self.sampling(), **given)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)} | {
            "window": list(self.window)
        }

    def save(self, folder: str | Path) -> None:
        (Path(folder) / SETTINGS_FILE).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> SamplingSettings:
        """A saved pipeline's settings; the published ones for a pipeline saved without them."""
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in dataclasses.fields(SamplingSettings)}
        return cls(**{k: v for k, v in data.items() if k in known})
