"""Attack cost, measured against anchors from the same run (machines here are noisy).

    python bench/attack.py                         # tiny policy on CPU
    python bench/attack.py --shape 3b --device cuda --image-size 448 --tokens 512   # on a GPU host

Prints, for n1 responses of T tokens on one image:
- the attack (selective entropy + gradient to the pixels + 1 PGD step, vision tower once),
- the naive attack (the model's own forward on n1 copies of the image: the vision tower n1 times),
- one learner forward + backward on the same n1 sequences (log-prob loss, gradients to the weights),
and the ratios attack/learner and shared/naive. `--shape 3b` builds a randomly initialised
Qwen2.5-VL-3B-shaped policy from a config (no weights are downloaded; needs a GPU to be useful).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adversary.attack import Attacker  # noqa: E402
from adversary.egas import pgd_attack  # noqa: E402
from adversary.pixels import image_to_model_inputs  # noqa: E402
from adversary.tsec import selective_entropy, token_entropy  # noqa: E402
from bench.shapes import SHAPES, build_policy  # noqa: E402
from core.batch import Prompt  # noqa: E402
from core.config import AdversaryConfig  # noqa: E402
from core.policy import chat_prompt, encode_prompt_response  # noqa: E402


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n1", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32, help="response length T")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="prompts in the batched-attack comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = build_policy(args.shape, Path(tmp) / "policy", args.image_size, args.device)
    model = model.to(args.device, dtype).eval()
    learner = copy.deepcopy(model).train()
    vocab = len(processor.tokenizer)
    image = np.random.default_rng(0).integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
    prompt = Prompt(uid="bench:0", problem="<image>Describe the figure.", answer="0", image=image)
    responses = [torch.randint(0, vocab - 20, (args.tokens,)) for _ in range(args.n1)]
    cfg = AdversaryConfig()
    attacker = Attacker(model, processor, cfg, "")

    def shared():
        attacker.attack(prompt, responses)

    text = chat_prompt(processor, prompt.problem)
    plain, rmask = encode_prompt_response(processor, [text] * args.n1, [image] * args.n1, responses)
    plain = {k: v.to(args.device) for k, v in plain.items()}
    rmask = rmask.to(args.device)

    def naive():
        def objective(x):
            pv, grid = image_to_model_inputs([x.to(args.device)] * args.n1, processor)
            inputs = dict(plain, pixel_values=pv.to(dtype), image_grid_thw=grid.to(args.device))
            ent = token_entropy(model(**inputs).logits[:, :-1])
            return selective_entropy(ent.float().cpu(), rmask[:, 1:].cpu())[0]

        pgd_attack(objective, image, step_size=cfg.step_size, steps=cfg.steps, device=args.device)

    def learn():
        out = learner(**dict(plain, pixel_values=plain["pixel_values"].to(dtype))).logits[:, :-1]
        labels = plain["input_ids"][:, 1:]
        logp = torch.log_softmax(out.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        loss = -(logp * rmask[:, 1:]).sum() / rmask.sum()
        loss.backward()
        learner.zero_grad(set_to_none=True)

    many = [(Prompt(uid=f"bench:{k}", problem=prompt.problem, answer="0", image=np.roll(image, k, axis=0)), responses)
            for k in range(args.prompts)]

    def batched():
        attacker.attack_many(many)

    def one_by_one():
        for p, r in many:
            attacker.attack(p, r)

    t_shared = timed(shared, args.repeats, args.device)
    t_batched = timed(batched, args.repeats, args.device)
    t_serial = timed(one_by_one, args.repeats, args.device)
    t_naive = timed(naive, args.repeats, args.device)
    t_learn = timed(learn, args.repeats, args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"policy {args.shape} ({n_params / 1e6:.1f}M params) on {args.device}, n1={args.n1} x {args.tokens} tokens, "
          f"image {args.image_size}px, median of {args.repeats}")
    print(f"attack (shared vision):     {t_shared * 1e3:9.1f} ms")
    print(f"attack (naive, n1 visions): {t_naive * 1e3:9.1f} ms")
    print(f"learner forward+backward:   {t_learn * 1e3:9.1f} ms")
    print(f"{args.prompts} prompts batched:          {t_batched * 1e3:9.1f} ms")
    print(f"{args.prompts} prompts one at a time:    {t_serial * 1e3:9.1f} ms")
    print(f"attack_vs_learner_ratio={t_shared / t_learn:.3f}")
    print(f"batched_vs_serial_ratio={t_batched / t_serial:.3f}")
    print(f"shared_vs_naive_ratio={t_shared / t_naive:.3f}")


if __name__ == "__main__":
    main()
