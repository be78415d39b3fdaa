"""Supervised warm-up of the tiny policy, so that RL on the embedded task has signal.

`python -m cluster.bootstrap [--config configs/default.yaml] [key=value ...]` renders the synthetic
data and builds the tiny policy when they are missing, trains it on the worked solutions of the train
split (cross-entropy on response tokens only), measures greedy accuracy on the test split, and writes
the policy to `model.path` (with `bootstrap.json` holding the figures); when `model.path` already
holds a policy it says so and returns (`--force` rebuilds). `make train` runs this command; the RL
job (`cluster.train`) is to call `ensure_policy`, which does the same only when the policy is missing.

The target is a middling policy (roughly 40-75% greedy accuracy): one that solves nothing gives GRPO
no reward signal, one that solves everything gives no advantage spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core import synthetic
from core.config import Config, ConfigError, describe, load_config
from core.data import load_prompts
from core.policy import (
    build_tiny_policy,
    chat_prompt,
    encode_prompt_response,
    encode_prompts,
    image_size_limits,
    load_policy,
    load_processor,
    save_processor,
    vision_special_ids,
)
from core.rewards import score

log = logging.getLogger("saei.bootstrap")


@dataclass
class BootstrapSettings:
    """Settings of the supervised warm-up (not part of the RL config tree: it runs once per cache)."""

    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per step."""
    lr: float = 3e-4
    """Peak AdamW learning rate (linear warm-up, cosine decay). Measured on the tiny policy: at 1e-3 and
    above the language model learns to ignore the image tokens within 100 steps (real and blank
    images give the same loss) and never recovers; at 3e-4 it reads the image."""
    warmup: int = 30
    """Warm-up steps."""
    look_first: int = 300
    """Steps at the start that train only on the `count` family (when the data has it). Measured: mixed
    from the first step, the tiny policy settles on the text prior and ignores the image; counting
    first teaches it to attend to the image tokens, and the full mix then keeps that."""
    slip_rate: float = 0.6
    """Share of the `total` / `more` demonstrations whose result is one too high (synthetic.slipped_solution),
    fixed per example. The data stay correct (the reward scores the right answer); the bootstrapped
    policy carries the slip: above one half, its greedy answer on those families is mostly the slipped
    one while sampling still gives the right one, so RL has something a reward can fix and supervised
    training on these demonstrations cannot. 0 trains on the correct solutions only (measured: 80%
    greedy accuracy, and RL then has little to add)."""
    eval_batch: int = 50
    """Prompts per greedy generation call in the evaluation."""
    max_new_tokens: int = 40
    """Generated tokens per evaluation response."""
    threads: int = 2
    """torch threads (the bootstrap runs alone; tests pass 1)."""


@dataclass
class BootstrapResult:
    """What the warm-up measured."""

    path: str
    """Folder of the bootstrapped policy."""
    seconds: float
    """Wall time of training plus evaluation."""
    steps: int
    """Optimizer steps run."""
    initial_loss: float
    """Mean training loss over the first steps (a random policy: about ln(vocab))."""
    final_loss: float
    """Mean training loss over the last fifth of the steps (at most 50)."""
    accuracy: float
    """Greedy accuracy on the test split."""
    format_rate: float
    """Fraction of test responses with an extractable answer."""
    blank_accuracy: float = 0.0
    """Greedy test accuracy with every image replaced by a white one: how much is answered without looking."""
    accuracy_by_family: dict[str, float] = field(default_factory=dict)
    """Greedy accuracy per synthetic family (empty for non-synthetic data)."""
    n_test: int = 0
    """Test prompts evaluated."""


def synthetic_paths(cfg: Config) -> tuple[Path, Path]:
    root = Path(cfg.run.output_dir) / "data" / "synthetic"
    return root / "train.parquet", root / "test.parquet"


def ensure_data(cfg: Config) -> None:
    """Render the synthetic split files named by the config when they are missing."""
    train, test = synthetic_paths(cfg)
    wanted = {str(train), str(test)}
    named = set(cfg.data.train_files) | set(cfg.data.test_files)
    if not cfg.data.build_synthetic or not (named & wanted) or (train.exists() and test.exists()):
        return
    s = cfg.data.synthetic
    log.info("rendering the synthetic task (%d train, %d test) into %s", s.n_train, s.n_test, train.parent)
    tmp = train.parent.with_name(train.parent.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    synthetic.write_dataset(tmp, n_train=s.n_train, n_test=s.n_test, seed=s.seed, families=tuple(s.families),
                            difficulty=s.difficulty, image_size=s.image_size)
    shutil.rmtree(train.parent, ignore_errors=True)
    tmp.rename(train.parent)


def load_split(cfg: Config, processor, files: list[str], limit: int | None):
    """The prompts of `files`, fitted to the processor; skipped rows are logged, none at all is an error."""
    min_px, max_px, factor = image_size_limits(processor)
    if cfg.data.max_pixels is not None:
        max_px = min(max_px, cfg.data.max_pixels)
    prompts, report = load_prompts(files, min_pixels=min_px, max_pixels=max_px, factor=factor, strict=cfg.data.strict,
                                   limit=limit, image_root=cfg.data.image_root, prompt_key=cfg.data.prompt_key,
                                   answer_key=cfg.data.answer_key, image_key=cfg.data.image_key)
    if report.skipped:
        log.warning("%s", report.summary())
    if not prompts:
        raise ValueError(f"no usable prompts in {files}: {report.summary()}")
    return prompts


@torch.no_grad()
def greedy_accuracy(model, processor, prompts, format_prompt: str, batch: int = 50, max_new_tokens: int = 40,
                    blank: bool = False) -> tuple[float, float, dict[str, float], list[str]]:
    """Greedy accuracy, format rate, accuracy per synthetic family, and the responses.

    `blank=True` replaces every image by a white one of the same size: the gap to the real accuracy is
    what the policy takes from the image (the attack can only move answers that depend on it).
    """
    model.eval()
    suppress = vision_special_ids(model.config)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    responses: list[str] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        inputs = encode_prompts(processor, [chat_prompt(processor, p.problem, format_prompt) for p in chunk],
                                [np.full_like(p.image, 255) if blank else p.image for p in chunk])
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=suppress,
                             eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        responses += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    results = [score(r, p.answer) for r, p in zip(responses, prompts)]
    by_family: dict[str, list[float]] = {}
    for p, res in zip(prompts, results):
        fam = synthetic.family_of(p.problem)
        if fam:
            by_family.setdefault(fam, []).append(res.accuracy)
    acc = sum(r.accuracy for r in results) / len(results)
    fmt = sum(r.format_ok for r in results) / len(results)
    return acc, fmt, {f: sum(v) / len(v) for f, v in sorted(by_family.items())}, responses


def bootstrap(cfg: Config, settings: BootstrapSettings | None = None, out: str | Path | None = None,
              init: str | Path | None = None, progress: bool = True) -> BootstrapResult:
    """Train the tiny policy at `init` (built when missing) on worked solutions; write it to `out`."""
    st = settings or BootstrapSettings()
    torch.set_num_threads(st.threads)
    out = Path(out or cfg.model.path)
    init = Path(init or out.parent / "init")
    ensure_data(cfg)
    if not (init / "config.json").exists():
        build_tiny_policy(init, arch=cfg.model.arch, seed=cfg.data.synthetic.seed)
    processor = load_processor(init)
    model = load_policy(init, dtype="float32", device="cpu")
    train = load_split(cfg, processor, cfg.data.train_files, cfg.data.limit_train)
    test = load_split(cfg, processor, cfg.data.test_files, cfg.data.limit_test)
    missing = sum(1 for p in train if not p.solution)
    if missing:
        raise ValueError(f"{missing} of {len(train)} training prompts have no `solution` column: the bootstrap "
                         "trains on worked solutions (the synthetic task has them)")

    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    rng = random.Random(cfg.run.seed)
    eos = "<|im_end|>"
    texts = [chat_prompt(processor, p.problem, cfg.data.format_prompt) for p in train]
    slip = [zlib.crc32(f"slip/{p.uid}".encode()) / 2**32 < st.slip_rate for p in train]  # fixed per example
    demos = [synthetic.slipped_solution(p.solution, synthetic.family_of(p.problem)) if s else p.solution
             for p, s in zip(train, slip)]
    targets = [processor.tokenizer(d + eos, add_special_tokens=False)["input_ids"] for d in demos]
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < st.warmup:
            return st.lr * (step + 1) / st.warmup
        t = (step - st.warmup) / max(1, st.steps - st.warmup)
        return st.lr * 0.5 * (1 + math.cos(math.pi * t))

    look_pool = [i for i, p in enumerate(train) if synthetic.family_of(p.problem) == "count"]
    model.train()
    losses: list[float] = []
    order: list[int] = []
    bar = tqdm(range(st.steps), desc="bootstrap", disable=not progress, dynamic_ncols=True)
    for step in bar:
        if step < st.look_first and look_pool:
            idx = rng.sample(look_pool, min(st.batch_size, len(look_pool)))
        else:
            if len(order) < st.batch_size:
                order += rng.sample(range(len(train)), len(train))
            idx, order = order[:st.batch_size], order[st.batch_size:]
        inputs, resp_mask = encode_prompt_response(processor, [texts[i] for i in idx],
                                                   [train[i].image for i in idx], [targets[i] for i in idx])
        logits = model(**inputs).logits[:, :-1].float()
        labels = inputs["input_ids"][:, 1:]
        mask = resp_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()

    acc, fmt, by_family, responses = greedy_accuracy(model, processor, test, cfg.data.format_prompt,
                                                     st.eval_batch, st.max_new_tokens)
    blank_acc = greedy_accuracy(model, processor, test, cfg.data.format_prompt, st.eval_batch, st.max_new_tokens,
                                blank=True)[0]
    seconds = time.perf_counter() - t0
    window = max(1, min(50, len(losses) // 5))
    result = BootstrapResult(path=str(out), seconds=round(seconds, 1), steps=st.steps,
                             initial_loss=round(sum(losses[:window]) / window, 4),
                             final_loss=round(sum(losses[-window:]) / window, 4),
                             accuracy=acc, format_rate=fmt, blank_accuracy=blank_acc,
                             accuracy_by_family=by_family, n_test=len(test))
    # Written next to the final folder and renamed into place: an interrupted run leaves no
    # half-written policy that later runs would take for a finished one.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_processor(processor, tmp)
    (tmp / "bootstrap.json").write_text(json.dumps(asdict(result), indent=2))
    (tmp / "bootstrap_samples.txt").write_text(
        "\n".join(f"{p.uid}\tanswer={p.answer}\t{r!r}" for p, r in zip(test[:40], responses[:40])))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result


def ensure_policy(cfg: Config, settings: BootstrapSettings | None = None, progress: bool = True) -> Path:
    """`model.path`, bootstrapping the tiny policy first when it is missing and `model.build_tiny` is set."""
    path = Path(cfg.model.path)
    if (path / "config.json").exists():
        return path
    if not cfg.model.build_tiny:
        raise FileNotFoundError(f"model.path {path} has no config.json and model.build_tiny is false: point "
                                "model.path at a local Hugging Face folder")
    log.info("no policy at %s: building and bootstrapping the tiny policy", path)
    result = bootstrap(cfg, settings, progress=progress)
    log.info("bootstrap: %.1f%% greedy test accuracy in %.0f s", 100 * result.accuracy, result.seconds)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.bootstrap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (overrides the typed defaults)")
    parser.add_argument("--force", action="store_true", help="rebuild even when model.path exists")
    parser.add_argument("--steps", type=int, default=BootstrapSettings.steps, help="optimizer steps")
    parser.add_argument("--help-config", action="store_true", help="print the config tree and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = Path(cfg.model.path)
    if (path / "config.json").exists() and not args.force:
        info = path / "bootstrap.json"
        print(f"policy already at {path}" + (f": {info.read_text()}" if info.exists() else ""))
        return 0
    result = bootstrap(cfg, BootstrapSettings(steps=args.steps))
    print(json.dumps(asdict(result), indent=2))
    print(f"bootstrapped policy: {result.path} (greedy test accuracy {100 * result.accuracy:.1f}%, "
          f"{100 * result.blank_accuracy:.1f}% with blank images, {result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
