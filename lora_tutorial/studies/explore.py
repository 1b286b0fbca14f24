"""11's explorer: a panel of knobs that fine-tunes LoRA and redraws, a view over `trial.py`."""

import base64
import html
import io
import time

import ipywidgets as W
import matplotlib.pyplot as plt
import torch
from torch import nn

from ..data import Mnist, split_images
from ..evaluate import evaluate
from ..model import LAYER_NAMES
from ..plots import plot_trial
from ..settings import Settings
from ..train import make_adam
from .rank_study import SCALINGS
from .trial import Trial, TrialResult, report, run_trial, trial_of, trial_settings

RANKS = (1, 2, 4, 8, 16, 32, 64)  # the pickers' options; the notebook's own value is added
ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
WIDE = {"description_width": "initial"}

class Explorer(W.VBox):
    """The panel. `result` is the last run's TrialResult, `seconds` its timings (None before one)."""

    def __init__(self, settings: Settings, data: Mnist, base: nn.Module, trial: Trial | None = None):
        t = trial or trial_of(settings)
        self.settings, self.data, self.base = settings, data, base
        self.images = split_images(data, ("validation",))["validation"]
        self.before = evaluate(base, *self.images)
        # the first Adam imports PyTorch's compiler (1.5 s on a 2-core CPU): here, not on the first press
        make_adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
        self.result, self.seconds, self.timing, self.busy = None, None, "", False
        self.rank = W.Dropdown(options=sorted({*RANKS, t.rank}), value=t.rank, description="rank",
                               layout={"width": "130px"})
        self.alpha = W.Dropdown(options=[(f"{a:g}", a) for a in sorted({*ALPHAS, float(t.alpha)})],
                                value=float(t.alpha), description="alpha", layout={"width": "140px"})
        rules = [(f"{name}: factor {rule}", name) for name, rule in SCALINGS.items()]
        self.scaling = W.Dropdown(options=rules, value=t.scaling, description="scaling rule", style=WIDE,
                                  layout={"width": "330px"})
        self.layers = {name: W.Checkbox(value=name in (t.target_modules or LAYER_NAMES), description=name,
                                        indent=False, layout={"width": "90px"}) for name in LAYER_NAMES}
        self.steps = W.IntSlider(value=t.finetune_steps, min=10, max=max(500, t.finetune_steps), step=10,
                                 description="steps", continuous_update=False)
        self.digit = W.Dropdown(options=list(range(10)), value=t.target_digit, description="target digit",
                                style=WIDE, layout={"width": "160px"})
        self.replay = W.FloatSlider(value=t.replay_share, min=0.0, max=0.9, step=0.1, style=WIDE,
                                    description="replay share", readout_format=".1f", continuous_update=False)
        self.seed = W.BoundedIntText(value=t.seed, max=999_999, description="seed", layout={"width": "160px"})
        self.button = W.Button(description="Fine-tune", button_style="primary", icon="play",
                               tooltip="Fine-tune a fresh adapter with these settings and redraw")
        self.progress = W.IntProgress(value=0, min=0, max=t.finetune_steps, layout={"width": "300px"})
        self.factor, self.step_label, self.message, self.numbers = W.HTML(), W.Label(), W.HTML(), W.HTML()
        self.figure = W.Image(format="png", layout={"max_width": "100%"})
        for knob in [self.rank, self.alpha, self.scaling, *self.layers.values(), self.steps, self.digit,
                     self.replay, self.seed]:
            knob.observe(lambda _: self.check(), names="value")
        self.button.on_click(lambda _: self.fine_tune())
        layers = W.HBox([W.Label("layers LoRA adapts:"), *self.layers.values()])
        super().__init__([W.HBox([self.rank, self.alpha, self.scaling, self.factor]),
                          W.HBox([layers, self.digit, self.seed]), W.HBox([self.steps, self.replay]),
                          W.HBox([self.button, self.progress, self.step_label]), self.message, self.numbers,
                          self.figure])
        self.add_class("lora-explorer")  # CSS classes: the browser test finds the parts by them
        for part in ("rank", "button", "message", "numbers", "figure", "factor"):
            getattr(self, part).add_class(f"lora-explorer-{part}")
        self.check()

    def trial(self) -> Trial:
        """The trial the knobs describe now (not yet checked)."""
        ticked = tuple(name for name, box in self.layers.items() if box.value)
        return Trial(self.rank.value, self.alpha.value, self.scaling.value,
                     None if ticked == LAYER_NAMES else ticked, self.steps.value, self.digit.value,
                     round(self.replay.value, 2), self.seed.value)

    def check(self) -> bool:
        """Show the factor, or say what is wrong with the knobs and disable the button."""
        trial = self.trial()
        try:
            trial_settings(self.settings, trial)
        except Exception as error:  # a SettingsError: one sentence that names the value and the fix
            return self.show_error(error)
        self.factor.value = f"factor in front of B @ A: {SCALINGS[trial.scaling]} = {trial.factor:g}"
        self.message.value, self.button.disabled = "", self.busy
        return True

    def show_error(self, error: Exception) -> bool:
        red = "var(--jp-error-color1, #c62828)"  # JupyterLab's own, in both themes
        text = html.escape(str(error) or type(error).__name__)
        self.button.disabled, self.message.value = True, f'<span style="color: {red}">{text}</span>'
        return False

    def fine_tune(self) -> TrialResult | None:
        """The button: train and redraw; an error becomes the message, the last result stays shown."""
        if self.busy or not self.check():
            return None
        trial, started = self.trial(), time.perf_counter()
        self.busy, self.button.disabled, self.button.description = True, True, "Training..."
        self.progress.max, self.progress.value, self.progress.bar_style = trial.finetune_steps, 0, ""
        try:
            result = run_trial(self.settings, self.data, self.base, trial, self.before, self.images,
                               on_step=self.on_step)
            drawing = time.perf_counter()
            self.numbers.value = report(result, html_table=True)
            fig = plot_trial(result.before.per_digit_accuracy(), result.after.per_digit_accuracy(),
                             result.losses, trial.target_digit, trial.describe())
            buffer = io.BytesIO()  # the figure as a PNG, drawn off screen
            fig.savefig(buffer, format="png", dpi=80, facecolor=fig.get_facecolor())
            plt.close(fig)
            self.figure.value = buffer.getvalue()
        except Exception as error:  # FloatingPointError (diverged) and the like: said in the panel
            self.progress.bar_style = "danger"
            return self.show_error(error) or None
        finally:
            self.busy, self.button.description = False, "Fine-tune"
        done, self.result = time.perf_counter(), result
        self.seconds = {"fine-tuning": result.train_seconds, "judging": result.judge_seconds,
                        "drawing": done - drawing, "update": done - started}
        self.timing = f"Updated in {done - started:.2f} s: " + ", ".join(
            f"{part} {seconds:.2f} s" for part, seconds in list(self.seconds.items())[:3]) + "."
        self.progress.bar_style, self.button.disabled = "success", False
        self.message.value = html.escape(self.timing)
        return result

    def on_step(self, step: int, steps: int) -> None:
        self.progress.value, self.step_label.value = step, f"step {step} of {steps}"

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """The live panel, plus its last result as text and PNG for viewers that draw no widget."""
        bundle = super()._repr_mimebundle_(**kwargs)
        if self.result is not None:
            png = base64.b64encode(self.figure.value).decode("ascii")
            bundle["text/plain"] = f"{report(self.result)}\n{self.timing}"
            bundle["text/html"] = (f"{html.escape(self.timing)}<br>{self.numbers.value}"
                                   f'<img src="data:image/png;base64,{png}" style="max-width: 100%">')
            bundle["image/png"] = png
        return bundle
