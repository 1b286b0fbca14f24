"""Accuracy, wrong answers per digit and the confusion matrix, in big batches (the post's argmax, faster)."""

from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class Evaluation:
    accuracy: float
    correct: int
    total: int
    wrong_counts: list[int]  # per true digit
    confusion: list[list[int]]  # confusion[true][predicted]

    def per_digit_totals(self) -> list[int]:
        return [sum(row) for row in self.confusion]

    def per_digit_accuracy(self) -> list[float]:
        return [row[d] / max(1, sum(row)) for d, row in enumerate(self.confusion)]

    def mean_accuracy_except(self, digit: int | Collection[int]) -> float:
        left_out = {digit} if isinstance(digit, int) else set(digit)  # what fine-tuning on it costs the rest
        kept = [a for d, a in enumerate(self.per_digit_accuracy()) if d not in left_out]
        return sum(kept) / len(kept)

    def digit_summary(self, digit: int) -> dict:  # what fine-tuning on `digit` is judged by (08, 09)
        return {"target_wrong": self.wrong_counts[digit], "others_accuracy": self.mean_accuracy_except(digit),
                "accuracy": self.accuracy}

    def worst_digit(self) -> int:  # the most wrong answers; on a tie, the smallest digit
        return max(range(10), key=lambda d: (self.wrong_counts[d], -d))

    def report(self) -> str:
        return "\n".join([f"Accuracy: {self.accuracy:.3f} ({self.correct:,} of {self.total:,} right)",
                          *(f"wrong counts for the digit {d}: {w}" for d, w in enumerate(self.wrong_counts))])

    as_dict = asdict  # what the results JSON holds

def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [model(images[i:i + batch_size].to(device)).argmax(dim=1)
                      for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).cpu()

def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 10_000) -> Evaluation:
    return from_predictions(predict(model, images, batch_size), labels)

def from_predictions(predicted: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    confusion = torch.bincount(labels.cpu() * 10 + predicted.cpu(), minlength=100).reshape(10, 10)
    return from_confusion(confusion.tolist())

def from_confusion(confusion: list[list[int]]) -> Evaluation:
    correct, total = sum(confusion[d][d] for d in range(10)), sum(map(sum, confusion))
    wrong = [sum(row) - row[d] for d, row in enumerate(confusion)]
    return Evaluation(correct / total, correct, total, wrong, confusion)
