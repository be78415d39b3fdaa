"""The attack on CUDA: bf16 weights, float32 entropy, the same behaviour as on CPU (marker gpu)."""

import numpy as np
import pytest
import torch

from adversary.attack import Attacker
from core import synthetic
from core.batch import Prompt
from core.config import AdversaryConfig
from core.policy import load_policy, load_processor

pytestmark = pytest.mark.gpu


def test_attack_on_cuda_bf16_matches_cpu_selection_and_raises_entropy(tiny_policy_dir):
    processor = load_processor(tiny_policy_dir)
    gpu = Attacker(load_policy(tiny_policy_dir, dtype="bfloat16", device="cuda"), processor, AdversaryConfig())
    cpu = Attacker(load_policy(tiny_policy_dir, dtype="float32", device="cpu"), processor, AdversaryConfig())
    tok = processor.tokenizer
    raised = 0
    for i in range(10):
        ex = synthetic.make_example(i, split="test")
        prompt = Prompt(uid=f"g:{i}", problem=ex.problem, answer=ex.answer, image=np.asarray(ex.image))
        responses = [torch.tensor(tok(ex.solution + "<|im_end|>")["input_ids"]), torch.tensor(tok("\\boxed{1}")["input_ids"])]
        g, c = gpu.attack(prompt, responses), cpu.attack(prompt, responses)
        assert g.image.dtype == np.uint8 and g.image.shape == prompt.image.shape
        assert g.metrics["tsec/before"] == pytest.approx(c.metrics["tsec/before"], rel=5e-2)
        assert g.metrics["tsec/tokens_kept"] == c.metrics["tsec/tokens_kept"]
        raised += g.metrics["tsec/after"] > g.metrics["tsec/before"]
    assert raised >= 8
