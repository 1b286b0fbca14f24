"""One frozen base, many adapters (10): one LoRA per weak digit, switched and combined.

Each digit's adapter is the tutorial's own fine-tuning run (05's settings, that digit as the
target), saved and reused like every adapter here, with a fine-tuning seed of its own
(`adapter_seed`). The "together" adapter is trained once on the images of all the chosen digits,
with as many parameters, images and updates per parameter as the per-digit adapters have between
them, so that it is compared with their combination at equal cost. Every run is repeated for each
seed (five at least); every seed is plotted, and a verdict needs the ranges over them apart.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from ..checkpoints import load_adapter, save_adapter
from ..data import Mnist, fit_subset
from ..evaluate import Evaluation
from ..lora import separate_path
from ..pipeline import adapter_path, finetune_key, finetuned_model, lora_copy
from ..settings import Settings, SettingsError, fingerprint
from ..train import train
from .forgetting import share_answering
from .stats import Spread, spread


def check_adapter_digits(value: object) -> int | list[int]:
    """`adapter_digits`: how many of the weakest digits get an adapter (a whole number from 2 to 9:
    at least one digit must be left to measure what the adapters cost the others), or the digits
    themselves (a list of 2 to 9 different digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 9:
        return value
    if (isinstance(value, (list, tuple)) and 2 <= len(value) <= 9 and len(set(value)) == len(value)
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in value)):
        return list(value)
    raise SettingsError(f"adapter_digits={value!r} is not valid: expected how many of the weakest digits get "
                        "an adapter (2 to 9, e.g. 3; the others measure what the adapters cost), or a list "
                        "of 2 to 9 different digits, e.g. [9, 3, 2].")


def weakest_digits(training: Evaluation, count: int) -> list[int]:
    """The `count` digits the network gets wrong most on its training images, the worst first
    (the smaller digit on a tie): the same rule that makes 'worst' the target digit."""
    return sorted(range(10), key=lambda d: (-training.wrong_counts[d], d))[:count]


SEED_STRIDE = 1000  # between the fine-tuning seeds of one round's adapters (seeds are small numbers)


def adapter_seed(seed: int, index: int) -> int:
    """The fine-tuning seed of the `index`-th digit's adapter in round `seed`: `seed` for the first
    (so the worst digit's adapter is 05's run), then seed + 1000, seed + 2000, ... Adapters trained
    with one seed start from the same random A, which 100 steps barely move (08 measures it), so
    their sum would be close to a rank-r update; seeds of their own make it a real sum of r-rank
    updates, as independently trained adapters are."""
    return seed + SEED_STRIDE * index


def union_settings(settings: Settings, count: int) -> Settings:
    """The settings of the adapter trained on `count` digits together: rank, alpha and batch size
    each times `count`, the same steps. It then has the parameters and the scale alpha / r of the
    per-digit adapters together, sees as many images, and updates each parameter as often as each
    of them does. A rank too large for a layer is one sentence, before any work."""
    try:
        return dataclasses.replace(settings, rank=count * settings.rank, alpha=count * settings.alpha,
                                   batch_size=count * settings.batch_size)
    except SettingsError as err:
        raise SettingsError(f"The adapter trained on all {count} digits together has rank {count} x "
                            f"{settings.rank}: {err} Choose fewer adapter_digits, a smaller rank, or "
                            "target_modules without that layer.") from None


def union_adapter(settings: Settings, data: Mnist, base: nn.Module, digits: Sequence[int]) -> nn.Module:
    """A LoRA trained on the fit images of all `digits` together (`union_settings`), from `base`;
    saved under output_dir/adapters and loaded when it is there. Its key names the settings of the
    run (the batch size included) and all the digits."""
    union = union_settings(settings, len(digits))
    key = {**finetune_key(union, data), "target_digit": list(digits)}  # all of them, not the settings' one
    path = union.output_path / "adapters" / f"union-{fingerprint(key, data.identity)}.safetensors"
    model = lora_copy(base, union.lora_seed, rank=union.rank, alpha=union.alpha,
                      target_modules=union.target_modules)
    if path.exists():
        return load_adapter(model, path, key)
    images, labels = fit_subset(data, digits)
    train(separate_path(model), images, labels, max_steps=union.finetune_steps, batch_size=union.batch_size,
          lr=union.learning_rate, seed=union.lora_seed, progress=False)
    save_adapter(model, path, key)
    return model


def digit_adapter(settings: Settings, data: Mnist, base: nn.Module, digit: int) -> tuple[nn.Module, Path]:
    """The tutorial's fine-tuning run with `digit` as the target (loaded when saved), and its file."""
    run = dataclasses.replace(settings, target_digit=digit)
    return finetuned_model(run, data, base, verbose=False), adapter_path(run, data)


def figures(evaluation: Evaluation, digits: Sequence[int]) -> dict:
    """One row of the table: wrong answers on each chosen digit, the other digits' mean accuracy,
    the accuracy over all images; and, per chosen digit, the share of the other digits' wrong
    answers that are that digit (how strongly the network leans towards answering it)."""
    return {"wrong": {str(d): evaluation.wrong_counts[d] for d in digits},
            "others_accuracy": evaluation.mean_accuracy_except(digits), "accuracy": evaluation.accuracy,
            "answered": {str(d): share_answering(evaluation, d) for d in digits}}


def summarize(rows: Sequence[dict], digits: Sequence[int]) -> list[dict]:
    """Per configuration (in the rows' order): each figure's mean and min-max over the seeds."""
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]

        def over_seeds(value: Callable[[dict], float], mine: list[dict] = mine) -> dict:
            return dataclasses.asdict(spread([value(r) for r in mine]))

        out.append({"name": name, "seeds": [r["seed"] for r in mine],
                    "wrong": {str(d): over_seeds(lambda r, d=d: r["wrong"][str(d)]) for d in digits},
                    "others_accuracy": over_seeds(lambda r: 100 * r["others_accuracy"]),
                    "accuracy": over_seeds(lambda r: 100 * r["accuracy"])})
    return out


def measure(entry: dict, name: str, digit: int | None = None) -> Spread:
    """One figure of a summary back as a `Spread`: wrong answers on `digit`, or 'others_accuracy'
    or 'accuracy' (in %)."""
    return Spread(**(entry["wrong"][str(digit)] if name == "wrong" else entry[name]))


def count_text(counts: Spread) -> str:
    """'19.3 (17-21)': a mean of whole counts over the seeds, and their range in whole numbers."""
    return f"{counts.mean:.1f} ({counts.low:.0f}-{counts.high:.0f})"


def adapter_table(summaries: Sequence[dict], before: dict, digits: Sequence[int]) -> str:
    """A text table: wrong answers on each chosen digit, the other digits' and all digits' accuracy,
    as mean (min-max) over the seeds; the pre-trained network first."""
    others = f"other {10 - len(digits)} digits %"
    width = max(len(e["name"]) for e in summaries) + 1
    head = (f"{'adapter':<{width}}" + "".join(f"{f'wrong on {d}':>16}" for d in digits)
            + f"{others:>24}{'all %':>24}")
    lines = [head, "-" * len(head),
             f"{'none (pre-trained)':<{width}}" + "".join(f"{before['wrong'][str(d)]:>16}" for d in digits)
             + f"{100 * before['others_accuracy']:>24.2f}{100 * before['accuracy']:>24.2f}"]
    for e in summaries:
        wrong = "".join(f"{count_text(measure(e, 'wrong', d)):>16}" for d in digits)
        lines.append(f"{e['name']:<{width}}{wrong}{measure(e, 'others_accuracy').text(2):>24}"
                     f"{measure(e, 'accuracy').text(2):>24}")
    return "\n".join(lines)


def leaning_lines(rows: Sequence[dict], before: dict, digits: Sequence[int]) -> str:
    """Per single-digit adapter: the share of the other digits' wrong answers that are its own digit
    (how strongly it leans towards answering it), mean (min-max) over the seeds, and the pre-trained
    network's share."""
    lines = []
    for d in digits:
        shares = [100 * r["answered"][str(d)] for r in rows if r["name"] == f"digit {d} alone"]
        pre = 100 * before["answered"][str(d)]
        lines.append(f"  {d} alone: {spread(shares).text(0)} % (pre-trained {pre:.0f} %)")
    return "\n".join(lines)


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, Spread]:
    """Seconds per call of each function: the median, and the min-max, over `repeats` rounds in
    which the functions take turns (after one warm-up each), so that the machine's ups and downs
    hit them alike. Compare the ratios, not the seconds."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(repeats):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: Spread(statistics.median(v), min(v), max(v), len(v)) for name, v in times.items()}


def check_repeats(value: object) -> int:
    """`switch_repeats`: timed rounds, a whole number >= 1, checked before any work."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"switch_repeats={value!r} is not valid: expected a whole number >= 1, e.g. 20.")
    return value


def _verdict(mine: Spread, theirs: Spread, higher_is_better: bool) -> str:
    """'fewer'/'more' for wrong answers, 'higher'/'lower' for accuracies, when the two ranges over the
    seeds do not overlap (every seed of one beyond every seed of the other); else 'no difference
    detected'."""
    verdict = mine.versus(theirs, higher_is_better)
    if verdict == "tie":
        return "no difference detected"
    if higher_is_better:
        return "higher" if verdict == "better" else "lower"
    return "fewer" if verdict == "better" else "more"


def _grouped(verdicts: dict[str, str], joiner: str) -> str:
    """{'9': 'more', '3': 'no difference detected', '7': 'no difference detected'} as
    'more on 9, no difference detected on 3 and 7' (`joiner` 'on')."""
    by_word: dict[str, list[str]] = {}
    for who, word in verdicts.items():
        by_word.setdefault(word, []).append(who)
    return ", ".join(f"{word} {joiner} {', '.join(who[:-1]) + ' and ' + who[-1] if len(who) > 1 else who[0]}"
                     for word, who in by_word.items())


def verdict_lines(summaries: Sequence[dict], digits: Sequence[int],
                  comparisons: Sequence[tuple[str, str | None]]) -> str:
    """Markdown bullets, one per (name, reference) pair: a verdict from the ranges over the seeds
    (`_verdict`) on the wrong answers of each chosen digit and on the other digits' mean accuracy.
    A reference of None compares each digit with that digit's own adapter, and the other digits'
    accuracy with each single-digit adapter's. The means are in the table; these are the verdicts."""
    by_name = {e["name"]: e for e in summaries}
    missing = sorted({n for pair in comparisons for n in pair if n is not None} - set(by_name))
    if missing:
        raise ValueError(f"verdict_lines: no summary named {missing}; the summaries are {list(by_name)}.")
    lines = []
    for name, reference in comparisons:
        e = by_name[name]
        wrong = {str(d): _verdict(measure(e, "wrong", d),
                                  measure(by_name[reference or f"digit {d} alone"], "wrong", d), False)
                 for d in digits}
        others = measure(e, "others_accuracy")
        if reference:
            kept = _verdict(others, measure(by_name[reference], "others_accuracy"), True)
            against = f"the {reference}" if reference.startswith(("sum", "mean")) else reference
        else:
            kept = _grouped({f"{d} alone": _verdict(others, measure(by_name[f"digit {d} alone"],
                                                                    "others_accuracy"), True)
                             for d in digits}, "than")
            kept = kept.replace("no difference detected than", "no difference detected from")
            against = "each digit's own adapter"
        lines.append(f"- **{name}** against {against}: wrong answers {_grouped(wrong, 'on')}; "
                     f"the other {10 - len(digits)} digits' accuracy {kept}.")
    return "\n".join(lines)


def plot_combinations(rows: Sequence[dict], before: dict, digits: Sequence[int], labels: dict[str, str],
                      title: str = ""):
    """One column per adapter or combination (`labels`: row name -> tick label, in order), one point
    per seed: wrong answers on each chosen digit (left, a colour per digit, symlog axis) and the
    other digits' mean accuracy (right); a bar at each mean, the pre-trained network dashed."""
    from ..plots import new_figure, seed_column

    names = list(labels)
    missing = [n for n in names if not any(r["name"] == n for r in rows)]
    if missing:
        raise ValueError(f"plot_combinations: no rows named {missing}.")
    fig, (left, right) = new_figure(1, 2, figsize=(12, 5.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
              "tab:olive", "tab:cyan"]

    def column(ax, i: int, ys: list[float], offset: float, color: str, label: str | None) -> None:
        seed_column(ax, i + offset, ys, color, 0.035, 0.1, size=18, label=label)

    width = 0.26 if len(digits) > 1 else 0
    for k, d in enumerate(digits):
        color, offset = colors[k % len(colors)], (k - (len(digits) - 1) / 2) * width
        for i, name in enumerate(names):
            ys = [float(r["wrong"][str(d)]) for r in rows if r["name"] == name]
            column(left, i, ys, offset, color, f"digit {d}, one point per seed" if i == 0 else None)
        left.axhline(before["wrong"][str(d)], color=color, ls="--", lw=1, label=f"pre-trained, digit {d}")
    left.set_yscale("symlog", linthresh=10)
    top = max([float(v) for r in rows for v in r["wrong"].values()] + list(before["wrong"].values()))
    ticks = [t for t in (0, 3, 10, 30, 100, 300, 1000, 3000, 10000) if t <= 1.5 * top]
    left.set_yticks(ticks, [str(t) for t in ticks])
    left.set_ylim(0, 1.6 * top)
    left.set(title="Wrong answers on the chosen digits", ylabel="wrong answers (log scale above 10)")
    for i, name in enumerate(names):
        ys = [100 * r["others_accuracy"] for r in rows if r["name"] == name]
        column(right, i, ys, 0, "tab:gray", "one point per seed" if i == 0 else None)
    right.axhline(100 * before["others_accuracy"], color="black", ls="--", lw=1, label="pre-trained")
    others = 10 - len(digits)
    right.set(title=f"The other {others} digits' mean accuracy", ylabel="accuracy (%)")
    for ax in (left, right):
        ax.set_xticks(range(len(names)), [labels[n] for n in names])
        ax.set_xlabel("adapter")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3 if ax is left else 2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _how_fast(seconds: float, baseline: float) -> str:
    """'12 times as fast' or '5.5 times as slow': `seconds` measured against `baseline`."""
    if seconds <= baseline:
        return f"{baseline / seconds:,.1f} times as fast"
    return f"{seconds / baseline:,.1f} times as slow"


# What the notebook times, by name (the keys of `interleaved_seconds`' result that cost_findings reads)
SWITCH = "switch adapters (PEFT's set_adapter)"
SWITCH_TWO = "the same, 2 adapters held"
SWAP = "copy another A and B in (ours)"
LOAD_ADAPTER = "load + delete an adapter folder (PEFT)"
LOAD_NETWORK = "load a network file"


def cost_findings(sizes: dict[str, int], seconds: dict[str, Spread], count: int, held: int) -> str:
    """The costs in two bullets, as ratios measured in this run (the seconds move with the machine):
    `count` tasks; `held` adapters on the network PEFT switches."""
    adapter, network = sizes["adapter (the tutorial's file)"], sizes["fine-tuned network"]
    median = {name: s.mean for name, s in seconds.items()}
    base = median[LOAD_NETWORK]
    return (f"- Disk: {count} adapters take {count * adapter / 1024:,.1f} KiB; {count} fine-tuned copies "
            f"{count * network / 2**20:,.1f} MiB, {network / adapter:,.0f} times as much.\n"
            f"- Time per call, against loading a network file ({base * 1e3:,.2f} ms): set_adapter "
            f"{median[SWITCH] * 1e3:,.2f} ms with {held} adapters held ({_how_fast(median[SWITCH], base)}), "
            f"{median[SWITCH_TWO] * 1e3:,.2f} ms with 2 held; copying A and B into our LoRA "
            f"{median[SWAP] * 1e3:,.3f} ms ({_how_fast(median[SWAP], base)}); loading a PEFT adapter folder "
            f"{median[LOAD_ADAPTER] * 1e3:,.2f} ms ({_how_fast(median[LOAD_ADAPTER], base)}).")
