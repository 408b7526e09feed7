"""How images are sampled: one `SamplingSettings` for the config, the pipeline's saved defaults, evaluation,
the CLI and the app.

Published (TaxaDiffusion, as Stable Diffusion samples): PNDM, 25 steps, taxonomic guidance at s = 9.0 over the
whole schedule. A trained pipeline saves the settings of its run (`sampling.json`), so `sample`, `evaluate`
and the app start from what the model was trained and evaluated with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .choices import Choice
from .errors import ConfigError
from .guidance import Guidance

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
    scheduler: str = Scheduler.PNDM.value
    steps: int = 25
    guidance: str = Guidance.TAXONOMIC.value  # taxonomic | vanilla | none
    scale: float = 9.0  # s = 1 + w (published 9.0)
    window: tuple[float, float] = (0.0, 1.0)  # fractions of the schedule where guidance applies
    negative: str = Negative.ENCODED.value  # encoded | text (published): see `Negative`
    spacing: str = Spacing.LEADING.value  # leading (published) | trailing | linspace: see `Spacing`

    # The prefix of the keys in messages ("sample." in a run's config).
    key_prefix = ""

    def __post_init__(self) -> None:
        key = self.key_prefix
        self.window = tuple(self.window)
        choices = (("scheduler", Scheduler), ("guidance", Guidance), ("negative", Negative), ("spacing", Spacing))
        for name, choice in choices:
            value = getattr(self, name)
            if value not in {c.value for c in choice}:
                valid = ", ".join(c.value for c in choice)
                raise ConfigError(f"{key}{name} must be one of {valid}, got {value!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"{key}steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale >= 0):
            raise ConfigError(f"{key}scale must be a finite number >= 0, got {self.scale!r}")
        if len(self.window) != 2 or not all(isinstance(end, int | float) for end in self.window):
            raise ConfigError(f"{key}window must be two fractions [r0, r1], got {list(self.window)}")
        if not 0.0 <= self.window[0] <= self.window[1] <= 1.0:
            raise ConfigError(
                f"{key}window: the guidance window must satisfy 0 <= r0 <= r1 <= 1, got {list(self.window)}"
            )

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
