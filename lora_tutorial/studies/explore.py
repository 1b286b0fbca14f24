"""The explorer: an ipywidgets panel that fine-tunes LoRA with the knobs you pick and redraws.

A view only: every number comes from `trial.py` (which the tests cover without a browser), every
figure from `plots.plot_trial`. Pick a rank, alpha and scaling rule, the layers, the steps, the
target digit, the replay share and the seed; "Fine-tune" trains a fresh adapter on the cached
pre-trained network and shows each digit's accuracy before and after, the loss curve and the
numbers. The button is disabled while a run trains, and while the knobs make no valid run (the
message line says why, in the words a notebook parameter would get).

    explorer = Explorer(settings, data, pre.model)  # the knobs start at the notebook's settings
    explorer.fine_tune()  # what the button does (headless runs call it to fill the panel)
    explorer  # displays the panel
"""

from __future__ import annotations

import base64
import html
import io
import time

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..data import Mnist, split_images
from ..evaluate import Evaluation, evaluate
from ..model import LAYER_NAMES
from ..plots import plot_trial
from ..settings import Settings
from .trial import SCALING_RULES, Trial, TrialResult, run_trial, trial_of, trial_settings, warm_up

RANKS = (1, 2, 4, 8, 16, 32, 64)
ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
ERROR_STYLE = "color: var(--jp-error-color1, #c62828)"  # JupyterLab's own red, in both themes
WIDE = {"description_width": "initial"}


def _with(options: tuple, value) -> list:
    """The picker's options, with the notebook's own value added where it is not among them."""
    return sorted({*options, value})


class Explorer(widgets.VBox):
    """The panel. `result` is the last run's TrialResult, `seconds` its timings (None before one)."""

    def __init__(self, settings: Settings, data: Mnist, base: nn.Module, trial: Trial | None = None,
                 images: tuple[torch.Tensor, torch.Tensor] | None = None, before: Evaluation | None = None
                 ) -> None:
        trial = trial or trial_of(settings)
        self.settings, self.data, self.base = settings, data, base
        self.images = images if images is not None else split_images(data, ("validation",))["validation"]
        self.before = before if before is not None else evaluate(base, *self.images)
        warm_up()  # PyTorch's one-time cost of a first optimizer, here rather than on the first press
        self.result: TrialResult | None = None
        self.seconds: dict[str, float] | None = None
        self.busy = False

        self.rank = widgets.Dropdown(options=_with(RANKS, trial.rank), value=trial.rank, description="rank",
                                     layout={"width": "130px"})
        alphas = [(f"{a:g}", a) for a in _with(ALPHAS, float(trial.alpha))]
        self.alpha = widgets.Dropdown(options=alphas, value=float(trial.alpha), description="alpha",
                                      layout={"width": "140px"})
        self.scaling = widgets.Dropdown(options=[(f"{name}: factor {rule}", name) for name, rule in
                                                 SCALING_RULES.items()], value=trial.scaling,
                                        description="scaling rule", style=WIDE, layout={"width": "330px"})
        self.factor = widgets.HTML()
        chosen = trial.target_modules or LAYER_NAMES
        self.layers = {name: widgets.Checkbox(value=name in chosen, description=name, indent=False,
                                              layout={"width": "90px"}) for name in LAYER_NAMES}
        self.steps = widgets.IntSlider(value=trial.finetune_steps, min=10, max=max(500, trial.finetune_steps),
                                       step=10, description="steps", continuous_update=False)
        self.digit = widgets.Dropdown(options=list(range(10)), value=trial.target_digit,
                                      description="target digit", style=WIDE, layout={"width": "160px"})
        self.replay = widgets.FloatSlider(value=trial.replay_share, min=0.0, max=0.9, step=0.1,
                                          description="replay share", style=WIDE, readout_format=".1f",
                                          continuous_update=False)
        self.seed = widgets.BoundedIntText(value=trial.seed, min=0, max=999_999, description="seed",
                                           layout={"width": "160px"})
        self.button = widgets.Button(description="Fine-tune", button_style="primary", icon="play",
                                     tooltip="Fine-tune a fresh adapter with these settings and redraw")
        self.progress = widgets.IntProgress(value=0, min=0, max=trial.finetune_steps, description="",
                                            layout={"width": "300px"})
        self.step_label = widgets.Label()
        self.message = widgets.HTML()
        self.numbers = widgets.HTML()
        self.figure = widgets.Image(format="png", layout={"max_width": "100%"})

        for knob in self.knobs():
            knob.observe(lambda _: self.check(), names="value")
        self.button.on_click(lambda _: self.fine_tune())
        layers = widgets.HBox([widgets.Label("layers LoRA adapts:"), *self.layers.values()])
        super().__init__([
            widgets.HBox([self.rank, self.alpha, self.scaling, self.factor]),
            widgets.HBox([layers, self.digit, self.seed]),
            widgets.HBox([self.steps, self.replay]),
            widgets.HBox([self.button, self.progress, self.step_label]),
            self.message, self.numbers, self.figure,
        ])
        self.add_class("lora-explorer")  # CSS classes: the browser test finds the parts by them
        for part in ("rank", "button", "message", "numbers", "figure", "factor"):
            getattr(self, part).add_class(f"lora-explorer-{part}")
        self.check()

    def knobs(self) -> list[widgets.Widget]:
        return [self.rank, self.alpha, self.scaling, *self.layers.values(), self.steps, self.digit,
                self.replay, self.seed]

    def trial(self) -> Trial:
        """The trial the knobs describe now (not yet checked)."""
        ticked = tuple(name for name, box in self.layers.items() if box.value)
        return Trial(rank=self.rank.value, alpha=self.alpha.value, scaling=self.scaling.value,
                     target_modules=None if ticked == LAYER_NAMES else ticked,
                     finetune_steps=self.steps.value, target_digit=self.digit.value,
                     replay_share=round(self.replay.value, 2), seed=self.seed.value)

    def check(self) -> bool:
        """Check the knobs: show the factor, or say what is wrong and disable the button."""
        trial = self.trial()
        try:
            trial_settings(self.settings, trial)
        except Exception as error:  # a SettingsError: one sentence that names the value and the fix
            self.show_error(error)
            return False
        self.factor.value = (f"factor in front of B @ A: {SCALING_RULES[trial.scaling]} = "
                             f"{trial.factor:g}")
        self.message.value = ""
        self.button.disabled = self.busy
        return True

    def show_error(self, error: Exception) -> None:
        text = str(error) if getattr(error, "args", None) else type(error).__name__
        self.message.value = f'<span style="{ERROR_STYLE}">{html.escape(text)}</span>'
        self.button.disabled = True

    def fine_tune(self) -> TrialResult | None:
        """What the button does: train with the knobs as they are, then redraw. Errors become the
        message line (nothing is raised into the page); the last good result stays shown."""
        if self.busy or not self.check():
            return None
        trial = self.trial()
        self.busy, self.button.disabled, self.button.description = True, True, "Training..."
        self.progress.max, self.progress.value, self.progress.bar_style = trial.finetune_steps, 0, ""
        started = time.perf_counter()
        try:
            result = run_trial(self.settings, self.data, self.base, trial, self.before, self.images,
                               on_step=self.on_step)
            drawing = time.perf_counter()
            self.draw(result)
        except Exception as error:  # FloatingPointError (diverged) and the like: said in the panel
            self.progress.bar_style = "danger"
            self.show_error(error)
            return None
        finally:
            self.busy, self.button.description = False, "Fine-tune"
        done = time.perf_counter()
        self.result = result
        self.seconds = {"fine-tuning": result.train_seconds, "judging": result.judge_seconds,
                        "drawing": done - drawing, "update": done - started}
        self.progress.bar_style = "success"
        self.message.value = html.escape(self.timing())
        self.button.disabled = False
        return result

    def on_step(self, step: int, steps: int) -> None:
        self.progress.value = step
        self.step_label.value = f"step {step} of {steps}"

    def timing(self) -> str:
        s = self.seconds
        return (f"Updated in {s['update']:.2f} s: fine-tuning {s['fine-tuning']:.2f} s, judging "
                f"{s['judging']:.2f} s, drawing {s['drawing']:.2f} s.")

    def draw(self, result: TrialResult) -> None:
        """The numbers as a small table and the figure as a PNG (drawn off screen, then closed)."""
        self.numbers.value = numbers_html(result)
        fig = plot_trial(result.before.per_digit_accuracy(), result.after.per_digit_accuracy(), result.losses,
                         result.trial.target_digit, result.trial.describe(), result.images)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=80, facecolor=fig.get_facecolor())
        plt.close(fig)
        self.figure.value = buffer.getvalue()

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The live panel, plus a plain copy of its last result (text and figure) for where no
        widget can be drawn: a notebook viewer, the committed notebook's outputs."""
        bundle = super()._repr_mimebundle_(**kwargs)
        if self.result is not None:
            png = base64.b64encode(self.figure.value).decode("ascii")
            bundle["text/plain"] = f"{self.result.report()}\n{self.timing()}"
            bundle["text/html"] = (f"{html.escape(self.timing())}<br>{numbers_html(self.result)}"
                                   f'<img src="data:image/png;base64,{png}" style="max-width: 100%">')
            bundle["image/png"] = png
        return bundle


def numbers_html(result: TrialResult) -> str:
    """The run's description and its (what, before, after) rows as a small HTML table."""
    def cell(text: str, align: str = "left", tag: str = "td") -> str:
        return f"<{tag} style='text-align: {align}; padding: 0 1.5em 0 0'>{html.escape(text)}</{tag}>"

    head = cell(f"on the {result.before.total:,} {result.images}", tag="th") + \
        cell("pre-trained", "right", "th") + cell("fine-tuned", tag="th")
    rows = "".join(f"<tr>{cell(what)}{cell(before, 'right')}{cell(after)}</tr>"
                   for what, before, after in result.numbers())
    return (f"<b>{html.escape(result.trial.describe())}</b>: factor {result.scale:g}, "
            f"{result.trainable:,} trained numbers<table><tr>{head}</tr>{rows}</table>")
