"""The one scoring path of every evaluation: responses to held-out prompts -> accuracy metrics.

Two callers generate the responses their own way: the job through its rollout pool
(`cluster.pipeline.evaluate`) and the supervised bootstrap with its in-process model
(`cluster.bootstrap.greedy_accuracy`). Both hand the decoded texts here, so "greedy accuracy" means
the same number in bootstrap.json and in a run's metrics.jsonl. Imports neither ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core import synthetic
from core.batch import Prompt
from core.rewards import score


@dataclass
class EvalScore:
    """Accuracy of greedy responses (and of k sampled ones, when given) to a set of prompts."""

    accuracy: float
    """Greedy accuracy: share of prompts whose greedy response has the reference answer."""
    format_rate: float
    """Share of greedy responses with an extractable answer."""
    by_family: dict[str, float] = field(default_factory=dict)
    """Greedy accuracy per synthetic family (empty for other data)."""
    pass_at_k: float | None = None
    """Share of prompts with at least one correct response among the k samples (None: not sampled)."""
    mean_at_k: float | None = None
    """Mean accuracy over all k samples of every prompt (None: not sampled)."""
    prompts: int = 0
    """Prompts scored."""

    def metrics(self) -> dict[str, float]:
        """The `eval/...` keys of metrics.jsonl."""
        out = {"eval/accuracy": self.accuracy, "eval/format": self.format_rate, "eval/prompts": float(self.prompts)}
        if self.pass_at_k is not None:
            out["eval/pass@k"], out["eval/mean@k"] = self.pass_at_k, self.mean_at_k
        out.update({f"eval/accuracy/{f}": v for f, v in self.by_family.items()})
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score_responses(prompts: list[Prompt], greedy: list[str], sampled: list[list[str]] | None = None) -> EvalScore:
    """Score `greedy[i]` (and every text of `sampled[i]`) against `prompts[i].answer` with core.rewards."""
    if len(greedy) != len(prompts) or (sampled is not None and len(sampled) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts but {len(greedy)} greedy and "
                         f"{'no' if sampled is None else len(sampled)} sampled response lists")
    results = [score(text, p.answer) for text, p in zip(greedy, prompts)]
    by_family: dict[str, list[float]] = {}
    for p, res in zip(prompts, results):
        fam = synthetic.family_of(p.problem)
        if fam:
            by_family.setdefault(fam, []).append(res.accuracy)
    out = EvalScore(accuracy=_mean([r.accuracy for r in results]),
                    format_rate=_mean([float(r.format_ok) for r in results]),
                    by_family={f: _mean(v) for f, v in sorted(by_family.items())}, prompts=len(prompts))
    if sampled is not None:
        acc = [[score(text, p.answer).accuracy for text in texts] for texts, p in zip(sampled, prompts)]
        out.pass_at_k = _mean([max(a, default=0.0) for a in acc])
        out.mean_at_k = _mean([x for a in acc for x in a])
    return out
