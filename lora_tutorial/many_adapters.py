"""One frozen base, many adapters (10): one LoRA per weak digit, switched and combined.

Each digit's adapter is the tutorial's own fine-tuning run (05's settings, that digit as the
target), saved and reused like every adapter here, with a fine-tuning seed of its own
(`adapter_seed`). The "together" adapter is trained once on the images of all the chosen digits,
with as many parameters, images and updates per parameter as the per-digit adapters have between
them, so that it is compared with their combination at equal cost. Every run is repeated for a few
seeds; the figures are the mean and the range over them.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from .checkpoints import load_adapter, save_adapter
from .data import Mnist, fit_subset
from .evaluate import Evaluation
from .forgetting import share_answering
from .lora import separate_path
from .pipeline import adapter_path, finetune_key, finetuned_model, lora_copy
from .settings import Settings, SettingsError, fingerprint
from .stats import Spread, spread
from .train import train


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
    head = (f"{'adapter':<34}" + "".join(f"{f'wrong on {d}':>16}" for d in digits)
            + f"{others:>26}{'all %':>26}")
    lines = [head, "-" * len(head),
             f"{'none (pre-trained)':<34}" + "".join(f"{before['wrong'][str(d)]:>16}" for d in digits)
             + f"{100 * before['others_accuracy']:>26.2f}{100 * before['accuracy']:>26.2f}"]
    for e in summaries:
        wrong = "".join(f"{count_text(measure(e, 'wrong', d)):>16}" for d in digits)
        lines.append(f"{e['name']:<34}{wrong}{measure(e, 'others_accuracy').text(2):>26}"
                     f"{measure(e, 'accuracy').text(2):>26}")
    return "\n".join(lines)


def leaning_lines(rows: Sequence[dict], before: dict, digits: Sequence[int]) -> str:
    """Per single-digit adapter: the share of the other digits' wrong answers that are its own digit,
    mean (min-max) over the seeds, against the pre-trained network's share."""
    lines = []
    for d in digits:
        shares = [100 * r["answered"][str(d)] for r in rows if r["name"] == f"digit {d} alone"]
        lines.append(f"  digit {d} alone: {spread(shares).text(0)} % of the other digits' wrong answers "
                     f"are a {d} (pre-trained: {100 * before['answered'][str(d)]:.0f} %)")
    return "\n".join(lines)


def overall_findings(summaries: Sequence[dict], before: dict, digits: Sequence[int]) -> str:
    """Two bullets for the summary: the configuration with the best accuracy over all images, and
    the one with the fewest wrong answers on the chosen digits (by the mean over the seeds), each
    with what the other measure says of it."""
    def total_wrong(e: dict) -> float:
        return sum(measure(e, "wrong", d).mean for d in digits)

    best = max(summaries, key=lambda e: measure(e, "accuracy").mean)
    fewest = min(summaries, key=total_wrong)
    pre_all, pre_wrong = 100 * before["accuracy"], sum(before["wrong"][str(d)] for d in digits)
    accuracy = measure(best, "accuracy")
    if accuracy.low > pre_all or accuracy.high < pre_all:
        against = f"every round {'above' if accuracy.low > pre_all else 'below'}"
    else:
        against = "a range that includes"
    chosen = ", ".join(map(str, digits))
    return (f"- Best accuracy over all images: **{best['name']}**, {accuracy.text(2)} % ({against} the "
            f"pre-trained network's {pre_all:.2f} %), with {total_wrong(best):.1f} wrong answers on {chosen} "
            f"in total (the sum of their means; pre-trained {pre_wrong}).\n"
            f"- Fewest wrong answers on {chosen}: **{fewest['name']}**, {total_wrong(fewest):.1f} in total, "
            f"but the other {10 - len(digits)} digits fall to {measure(fewest, 'others_accuracy').text(2)} % "
            f"(pre-trained {100 * before['others_accuracy']:.2f} %) and all images to "
            f"{measure(fewest, 'accuracy').text(2)} %.")


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


def _against(mine: Spread, theirs: Spread, higher_is_better: bool) -> str:
    """'fewer (2.0 (1-3) against 19.0 (17-21))' for wrong answers, 'higher (...)' for accuracies: a
    verdict from the ranges over the seeds ('a tie' when they overlap), with both figures."""
    verdict = mine.versus(theirs, higher_is_better)
    if higher_is_better:
        words, shown = {"better": "higher", "worse": "lower"}, (mine.text(2), theirs.text(2))
    else:
        words, shown = {"better": "fewer", "worse": "more"}, (count_text(mine), count_text(theirs))
    return f"{words.get(verdict, 'a tie')} ({shown[0]} against {shown[1]})"


def combination_findings(summaries: Sequence[dict], before: dict, digits: Sequence[int], sum_name: str,
                         mean_name: str, together_name: str) -> str:
    """What each adapter and each combination does, in Markdown bullets written from the table:
    'fewer', 'more' (or 'higher', 'lower') only where the ranges over the seeds do not overlap."""
    by_name = {e["name"]: e for e in summaries}
    others = f"the other {10 - len(digits)} digits"
    lines = []
    for digit in digits:
        e = by_name[f"digit {digit} alone"]
        cross = ", ".join(f"{d}: {before['wrong'][str(d)]} -> {count_text(measure(e, 'wrong', d))}"
                          for d in digits if d != digit)
        own = count_text(measure(e, "wrong", digit))
        lines.append(f"- **digit {digit} alone**: wrong on {digit} {before['wrong'][str(digit)]} -> {own}; "
                     f"on the other chosen digits {cross}; {others} {100 * before['others_accuracy']:.2f} % "
                     f"-> {measure(e, 'others_accuracy').text(2)} %.")
    for name, reference in ((sum_name, None), (mean_name, sum_name), (together_name, sum_name)):
        e = by_name[name]
        wrong = []
        for d in digits:
            theirs = by_name[reference or f"digit {d} alone"]
            wrong.append(f"on {d}, {_against(measure(e, 'wrong', d), measure(theirs, 'wrong', d), False)}")
        if reference:
            kept = _against(measure(e, "others_accuracy"),
                            measure(by_name[reference], "others_accuracy"), True)
            text = (f"- **{name}** against the {reference}: wrong answers {'; '.join(wrong)}; "
                    f"accuracy on {others} (%) {kept}.")
        else:
            text = (f"- **{name}** against each digit's own adapter alone: wrong answers {'; '.join(wrong)}; "
                    f"accuracy on {others} {measure(e, 'others_accuracy').text(2)} %.")
        lines.append(text)
    return "\n".join(lines)


def _how_fast(seconds: float, baseline: float) -> str:
    """'12 times as fast as' or '5.5 times as slow as': `seconds` measured against `baseline`."""
    if seconds <= baseline:
        return f"{baseline / seconds:,.1f} times as fast as"
    return f"{seconds / baseline:,.1f} times as slow as"


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
    return (f"- Disk: {count} adapters take {count * adapter / 1024:,.1f} KiB, {count} fine-tuned copies of "
            f"the network {count * network / 2**20:,.1f} MiB: {network / adapter:,.0f} times as much.\n"
            f"- Time, against loading a network file ({base * 1e3:,.2f} ms, the median): PEFT's set_adapter "
            f"took {median[SWITCH] * 1e3:,.2f} ms with {held} adapters held, "
            f"{_how_fast(median[SWITCH], base)} it, and {median[SWITCH_TWO] * 1e3:,.2f} ms with 2 held; "
            f"copying another adapter's A and B into the tutorial's LoRA {median[SWAP] * 1e3:,.3f} ms, "
            f"{_how_fast(median[SWAP], base)} it; loading an adapter folder with PEFT (and deleting it "
            f"again) {median[LOAD_ADAPTER] * 1e3:,.2f} ms, {_how_fast(median[LOAD_ADAPTER], base)} it.")
