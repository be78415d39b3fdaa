"""cluster.evaluation.score_responses: the one scoring path of the job's and the bootstrap's evaluations."""

import numpy as np
import pytest

from cluster.evaluation import score_responses
from core import synthetic
from core.batch import Prompt


def _prompts(k: int) -> list[Prompt]:
    out = []
    for i in range(k):
        ex = synthetic.make_example(i, split="test")
        out.append(Prompt(uid=f"t:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image)))
    return out


def test_greedy_accuracy_format_families_and_pass_at_k():
    prompts = _prompts(4)
    right = [rf"so \boxed{{{p.answer}}}" for p in prompts]
    wrong = [rf"\boxed{{{p.answer}1}}" for p in prompts]
    greedy = [right[0], wrong[1], "no answer here", right[3]]
    sampled = [[wrong[0], wrong[0]], [wrong[1], right[1]], ["none", "none"], [right[3], right[3]]]
    s = score_responses(prompts, greedy, sampled)
    assert s.accuracy == 0.5 and s.format_rate == 0.75 and s.prompts == 4
    assert s.pass_at_k == 0.5 and s.mean_at_k == 3 / 8
    families = [synthetic.family_of(p.problem) for p in prompts]
    assert set(s.by_family) == set(families)
    for fam, acc in s.by_family.items():
        mine = [g is right[i] for i, g in enumerate(greedy) if families[i] == fam]
        assert acc == sum(mine) / len(mine)
    m = s.metrics()
    assert m["eval/accuracy"] == 0.5 and m["eval/pass@k"] == 0.5 and m["eval/mean@k"] == 3 / 8
    assert all(f"eval/accuracy/{fam}" in m for fam in families)
    assert "eval/pass@k" not in score_responses(prompts, greedy).metrics()  # greedy only: no pass@k


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="2 prompts but 1 greedy"):
        score_responses(_prompts(2), ["x"])
