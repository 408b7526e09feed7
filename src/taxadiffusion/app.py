"""A Gradio app to explore a trained pipeline: find a taxon, generate with taxonomic guidance, and see the
same seed conditioned at each rank from coarse to fine (the paper's figure).

`Explorer` holds what the app does as plain methods (tested without a browser); `build_app` lays it out.
Every event has an `api_name`, so `gradio_client` can drive the app as an API.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image

from .errors import InputError, TaxaDiffusionError
from .guidance import Guidance
from .pipeline import TaxaDiffusionPipeline, scheduler_for
from .sampling import SamplingSettings, Scheduler, Spacing
from .taxonomy import Lineage, Rank, Taxon, Taxonomy

MAX_IMAGES = 16
MAX_STEPS = 1000  # the training schedule's length
MAX_SEED = 2**63 - 1  # torch's generators take 64-bit seeds; seed + i of a gallery must stay in range


def whole_number(name: str, value, low: int, high: int) -> int:
    """An integer from a form field (a float like 3.0 too), in [low, high], or a message that says why not."""
    try:
        number = value if isinstance(value, int) else float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
        raise InputError(f"{name} must be a whole number, got {value!r}")
    if not low <= int(number) <= high:
        raise InputError(f"{name} must be between {low} and {high}, got {value!r}")
    return int(number)


def real_number(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return number


SEPARATOR = " › "


def taxon_label(taxon: Taxon) -> str:
    """What the app shows and receives for a taxon: its name (the binomial for a species), its rank and its
    parents, so that homonyms stay apart."""
    species = taxon.rank is Rank.SPECIFIC_EPITHET and len(taxon.path) > 1
    name = f"{taxon.path[-2]} {taxon.name}" if species else taxon.name
    parents = SEPARATOR.join(taxon.path[:-1])
    return f"{name} ({'species' if species else taxon.rank}{', ' + parents if parents else ''})"


class Explorer:
    """Searching, browsing and sampling one pipeline. Sampling calls are serialised by the app."""

    def __init__(self, pipeline: TaxaDiffusionPipeline):
        self.pipeline = pipeline
        self.taxonomy: Taxonomy = pipeline.taxonomy
        self.by_label: dict[str, Taxon] = {}
        self._search_keys: dict[str, tuple[set[str], int]] = {}  # label -> (names in lower case, rank level)
        for level, rank in enumerate(self.taxonomy.ranks):
            for taxon in self.taxonomy.taxa(rank):
                label = taxon_label(taxon)
                self.by_label[label] = taxon
                names = {taxon.name.lower(), self.taxonomy.lineage(taxon).scientific_name.lower()}
                self._search_keys[label] = (names, level)

    @property
    def ranks(self) -> list[str]:
        return [r.value for r in self.taxonomy.ranks]

    # -- finding a taxon ----------------------------------------------------------------------------

    def search(self, query: str, limit: int = 20) -> list[str]:
        """Taxa whose name (or binomial) contains the query, finest ranks first; close matches otherwise."""
        query = " ".join(query.split()).lower()
        if not query:
            return []
        hits = []
        for label, (names, level) in self._search_keys.items():
            if any(query in name for name in names):
                hits.append((query not in names, -level, label))
        if hits:
            return [label for *_, label in sorted(hits)[:limit]]
        suggested = self.taxonomy.suggest(query)
        return [label for label, taxon in self.by_label.items() if taxon.name in suggested][:limit]

    def taxon(self, label: str) -> Taxon:
        if not label:
            raise InputError("choose a taxon first: search for a name or pick one rank by rank")
        try:
            return self.by_label[label]
        except KeyError:
            name = label.split(" (")[0]
            suggestions = self.taxonomy.suggest(name)
            hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
            raise InputError(f"{name!r} is not a taxon of this model{hint}") from None

    def children(self, label: str | None) -> list[str]:
        """The labels one rank below a taxon (the first rank's taxa for None)."""
        parent = self.by_label.get(label) if label else None
        return [taxon_label(t) for t in self.taxonomy.children(parent)]

    def lineage_markdown(self, label: str) -> str:
        taxon = self.taxon(label)
        lineage = self.taxonomy.lineage(taxon)
        rows = [f"| {rank} | {name} |" for rank, name in zip(lineage.ranks, lineage.names, strict=False)]
        return "\n".join(
            [
                f"**{lineage.scientific_name}** ({taxon.count} training images)",
                "",
                "| rank | name |",
                "|---|---|",
                *rows,
            ]
        )

    def condition_ranks(self, label: str) -> list[str]:
        """Ranks a taxon can be conditioned down to: the first rank .. its own."""
        return self.ranks[: self.taxonomy.level(self.taxon(label).rank) + 1]

    # -- sampling -----------------------------------------------------------------------------------

    def _lineage(self, label: str, condition_rank: str | None) -> Lineage:
        lineage = self.taxonomy.lineage(self.taxon(label))
        return lineage.down_to(condition_rank) if condition_rank else lineage

    def settings(self, **given) -> SamplingSettings:
        """The pipeline's saved sampling settings with the app's choices applied (a choice of None keeps the
        saved value); `window_start` / `window_end` are the window's two ends."""
        saved = self.pipeline.sampling
        start, end = given.pop("window_start", None), given.pop("window_end", None)
        if start is not None or end is not None:
            given["window"] = (
                float(saved.window[0] if start is None else start),
                float(saved.window[1] if end is None else end),
            )
        given = {k: v for k, v in given.items() if v not in (None, "")}
        if "steps" in given:
            given["steps"] = whole_number("steps", given["steps"], 1, MAX_STEPS)
        if "scale" in given:
            given["scale"] = real_number("scale", given["scale"])
        return saved.replace(**given)

    def _sample(self, lineages: list[Lineage], seeds: list[int], settings: dict) -> list[Image.Image]:
        pipe = self.pipeline
        chosen = self.settings(**settings)
        pipe.scheduler = scheduler_for(pipe.scheduler, chosen)  # the saved defaults (`pipe.sampling`) stay
        return pipe(
            lineages,
            num_inference_steps=chosen.steps,
            guidance=chosen.guidance,
            guidance_scale=chosen.scale,
            guidance_window=chosen.window,
            negative=chosen.negative,
            generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
        ).images

    def generate(self, label: str, condition_rank: str | None, n: int, seed: int, **settings) -> list[Image.Image]:
        """`n` images of a taxon; image i uses seed + i, so a gallery is reproducible image by image."""
        n = whole_number("number of images", n, 1, MAX_IMAGES)
        seed = whole_number("seed", seed, 0, MAX_SEED - n)
        lineage = self._lineage(label, condition_rank)
        return self._sample([lineage] * n, [seed + i for i in range(n)], settings)

    def rank_strip(self, label: str, seed: int, **settings) -> list[tuple[Image.Image, str]]:
        """The same seed conditioned on the lineage cut at each rank, coarse to fine."""
        seed = whole_number("seed", seed, 0, MAX_SEED)
        lineage = self.taxonomy.lineage(self.taxon(label))
        cuts = [lineage.truncate(depth) for depth in range(1, lineage.depth + 1)]
        images = self._sample(cuts, [seed] * len(cuts), settings)
        return [(image, f"{cut.finest_rank}: {cut.names[-1]}") for image, cut in zip(images, cuts, strict=True)]


# -- the UI -----------------------------------------------------------------------------------------


def build_app(explorer: Explorer):
    """The Gradio Blocks app. Heavy import inside: nothing else in the package needs gradio."""
    import gradio as gr

    with gr.Blocks(title="taxadiffusion explorer", analytics_enabled=False) as app:
        taxonomy = explorer.taxonomy
        gr.Markdown(
            f"# taxadiffusion explorer\n{len(taxonomy.taxa(taxonomy.ranks[-1]))} "
            f"{taxonomy.ranks[-1]} taxa over {len(explorer.ranks)} ranks ({', '.join(explorer.ranks)})."
        )
        ui = _layout(gr, explorer)
        _wire_browsing(gr, explorer, ui)
        _wire_generation(gr, explorer, ui)
    return app


def _layout(gr, explorer: Explorer) -> SimpleNamespace:
    """The page's components: search and browse on the left with the sampling settings, galleries on the right."""
    ranks, ui = explorer.ranks, SimpleNamespace()
    with gr.Row():
        with gr.Column(scale=1):
            ui.query = gr.Textbox(
                label="Search any name", placeholder="e.g. Amphiprion clarkii or Pomacentridae", elem_id="search"
            )
            ui.matches = gr.JSON(visible=False)
            ui.found = gr.Dropdown(label="Matches", choices=[], interactive=True)
            with gr.Accordion("Browse rank by rank", open=False):
                ui.cascade = [
                    gr.Dropdown(label=rank, choices=explorer.children(None) if i == 0 else [], interactive=True)
                    for i, rank in enumerate(ranks)
                ]
            ui.selected = gr.Textbox(label="Selected taxon", interactive=False, elem_id="selected-taxon")
            ui.lineage = gr.Markdown(elem_id="lineage")
            ui.condition_rank = gr.Dropdown(label="Condition down to rank", choices=ranks, value=None)
            ui.settings = _sampling_controls(gr, explorer.pipeline.sampling)
            with gr.Row():
                ui.seed = gr.Number(value=0, precision=0, label="Seed")
                ui.count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Images")
            ui.generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=2):
            ui.gallery = gr.Gallery(label="Samples", columns=4, elem_id="gallery", format="png")
            ui.strip = gr.Gallery(
                label="Same seed, conditioned at each rank (coarse to fine)",
                columns=len(ranks),
                elem_id="rank-strip",
                format="png",
            )
    return ui


def _sampling_controls(gr, saved: SamplingSettings) -> list:
    """Guidance, scale, window, scheduler, steps and spacing, starting from the settings the model was trained and
    evaluated with; in the order `Explorer.generate` takes them (`SETTING_NAMES`)."""
    with gr.Row():
        guidance = gr.Radio([g.value for g in Guidance], value=saved.guidance, label="Guidance")
        scale = gr.Slider(0.0, 15.0, value=saved.scale, step=0.5, label="Scale s = 1 + w")
    with gr.Row():
        window_start = gr.Slider(0.0, 1.0, value=saved.window[0], step=0.05, label="Guidance from")
        window_end = gr.Slider(0.0, 1.0, value=saved.window[1], step=0.05, label="Guidance until")
    with gr.Row():
        scheduler = gr.Dropdown([s.value for s in Scheduler], value=saved.scheduler, label="Scheduler")
        steps = gr.Slider(1, 100, value=saved.steps, step=1, label="Steps")
        spacing = gr.Dropdown([s.value for s in Spacing], value=saved.spacing, label="Step spacing")
    return [guidance, scale, window_start, window_end, scheduler, steps, spacing]


SETTING_NAMES = ("guidance", "scale", "window_start", "window_end", "scheduler", "steps", "spacing")


def _wire_browsing(gr, explorer: Explorer, ui: SimpleNamespace) -> None:
    """Search, the rank-by-rank cascade and the selected taxon's lineage. API endpoints return plain values
    (lists, text); the UI-only updates that follow them (dropdown choices) are chained with `.then`."""
    ranks = explorer.ranks

    def on_search(text):
        return explorer.search(text or "")

    def show_matches(matches):
        return gr.update(choices=matches, value=matches[0] if matches else None)

    def on_select(label):
        if not label:
            return ""
        try:
            return explorer.lineage_markdown(label)
        except TaxaDiffusionError as error:
            raise gr.Error(str(error)) from None

    def condition_choices(label):
        choices = explorer.condition_ranks(label) if label in explorer.by_label else ranks
        return gr.update(choices=choices, value=None)

    def on_cascade(level):
        """A choice at one rank lists its children at the next and clears the finer ranks."""

        def update(label):
            below = [gr.update(choices=explorer.children(label) if label else [], value=None)]
            below += [gr.update(choices=[], value=None)] * (len(ranks) - level - 2)
            # Clearing a rank (a coarser choice changed) keeps the selection that choice made.
            return [*below[: len(ranks) - level - 1], label if label else gr.update()]

        return update

    ui.query.submit(on_search, ui.query, ui.matches, api_name="search").then(
        show_matches, ui.matches, ui.found, api_name=False
    )
    ui.query.change(on_search, ui.query, ui.matches, api_name=False).then(
        show_matches, ui.matches, ui.found, api_name=False
    )
    ui.found.change(lambda label: label or "", ui.found, ui.selected, api_name=False)
    for level, box in enumerate(ui.cascade):
        box.change(on_cascade(level), box, [*ui.cascade[level + 1 :], ui.selected], api_name=False)
    ui.selected.change(on_select, ui.selected, ui.lineage, api_name="lineage").then(
        condition_choices, ui.selected, ui.condition_rank, api_name=False
    )


def _wire_generation(gr, explorer: Explorer, ui: SimpleNamespace) -> None:
    """The `generate` endpoint: a gallery of the taxon and the same seed conditioned at each rank."""
    progress_tracker = gr.Progress(track_tqdm=True)  # gradio swaps in a per-request tracker

    def on_generate(label, rank, n, seed_value, *values, progress=progress_tracker):
        options = dict(zip(SETTING_NAMES, values, strict=True))
        try:
            progress(0, desc="sampling")
            seed = 0 if seed_value in (None, "") else seed_value
            images = explorer.generate(label, rank or None, n, seed, **options)
            row = explorer.rank_strip(label, seed, **options)
        except TaxaDiffusionError as error:
            raise gr.Error(str(error)) from None
        return images, row

    ui.generate.click(
        on_generate,
        [ui.selected, ui.condition_rank, ui.count, ui.seed, *ui.settings],
        [ui.gallery, ui.strip],
        api_name="generate",
        concurrency_limit=1,
    )


def offline_theme():
    """Gradio's default theme with system fonts: the stock one fetches fonts from Google at page load."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
    )


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program listens on (Gradio would raise deep in its server start)."""
    import socket

    if not 0 < port < 65536:
        raise InputError(f"--port must be between 1 and 65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no clash
        try:
            probe.bind((host, port))
        except OSError as error:
            raise InputError(f"--port {port} on {host} is not free ({error.strerror}); choose another --port") from None


def launch(
    model: str | Path,
    port: int | None = None,
    host: str = "127.0.0.1",
    device: str | None = None,
    precision: str | None = None,
    **kwargs,
):
    """Load a saved pipeline (on `device`, in `precision`: fp32, bf16 or fp16) and serve the app (blocking unless
    `prevent_thread_lock=True`)."""
    from .devices import sampling_dtype

    if port is not None:
        check_port_free(host, port)  # before the model loads
    pipe = TaxaDiffusionPipeline.from_pretrained(model, dtype=sampling_dtype(precision)).to(device or "cpu")
    app = build_app(Explorer(pipe))
    app.queue()
    app.launch(server_name=host, server_port=port, ssr_mode=False, theme=offline_theme(), **kwargs)
    return app
