"""Supervised warm-up of the tiny policy, so that RL on the embedded task has signal.

`python -m cluster.bootstrap [--config configs/default.yaml] [key=value ...]` renders the synthetic
data and builds the tiny policy when they are missing, trains it on the worked solutions of the train
split (cross-entropy on response tokens only), measures greedy accuracy on the test split, and writes
the policy to `model.path` (with `bootstrap.json` holding the figures); when `model.path` already
holds a policy it says so and returns (`--force` rebuilds). `make train` runs this command; the RL
job (`cluster.train`) is to call `ensure_policy`, which does the same only when the policy is missing.

Data and policy are caches shared by runs (cluster.caches): each folder records the settings that
built it (`built_with.json`), and a run whose settings differ (another data seed, difficulty,
architecture) uses or builds a sibling folder keyed by its settings, never another run's folder; the
config's `model.path` / `data.*_files` are pointed there and the log says so. RL runs of any
`run.seed` share one bootstrapped policy: the warm-up has its own seed (BootstrapSettings.seed).

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

from cluster import caches
from cluster.evaluation import score_responses
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
from core.storage import Storage

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
    seed: int = 0
    """Seed of the warm-up's batches and dropout; not run.seed: one bootstrapped policy serves RL runs of
    every seed (the initial weights follow data.synthetic.seed)."""


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
    """The split files of the synthetic task as the config's defaults name them (before cluster.caches
    may key the folder by its settings)."""
    root = caches.build_root(cfg) / "data" / "synthetic"
    return root / "train.parquet", root / "test.parquet"


def _data_done(folder: Path) -> bool:
    return (folder / "train.parquet").exists() and (folder / "test.parquet").exists()


def ensure_data(cfg: Config) -> None:
    """Render the synthetic split files named by the config when they are missing. A folder rendered with
    other synthetic settings is left as it is: the data go to a sibling keyed by the settings
    (cluster.caches), and `data.train_files` / `data.test_files` of `cfg` are pointed there."""
    caches.localize_build_paths(cfg)
    train, test = synthetic_paths(cfg)
    named = set(cfg.data.train_files) | set(cfg.data.test_files)
    if not cfg.data.build_synthetic or not (named & {str(train), str(test)}):
        return
    wanted = {"synthetic": asdict(cfg.data.synthetic)}
    root = caches.resolve(train.parent, wanted, "synthetic data", _data_done)
    if root != train.parent:
        moved = {str(train): str(root / train.name), str(test): str(root / test.name)}
        cfg.data.train_files = [moved.get(f, f) for f in cfg.data.train_files]
        cfg.data.test_files = [moved.get(f, f) for f in cfg.data.test_files]
    if _data_done(root):
        return
    s = cfg.data.synthetic
    log.info("rendering the synthetic task (%d train, %d test) into %s", s.n_train, s.n_test, root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    synthetic.write_dataset(tmp, n_train=s.n_train, n_test=s.n_test, seed=s.seed, families=tuple(s.families),
                            difficulty=s.difficulty, image_size=s.image_size)
    caches.write_stamp(tmp, wanted)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


_EVAL_ONLY = ("eval_batch", "max_new_tokens", "threads")  # settings that leave the trained weights as they are


def policy_settings(cfg: Config, settings: BootstrapSettings | None) -> dict:
    """What a bootstrapped policy depends on (recorded in its folder). Without `settings` any warm-up
    settings will do: the job asks for a bootstrapped policy, not for a particular warm-up."""
    data = [caches.read_stamp(Path(f).parent) or str(Path(f).resolve()) for f in cfg.data.train_files]
    wanted = {"arch": cfg.model.arch, "init_seed": cfg.data.synthetic.seed, "train_data": data,
              "format_prompt": cfg.data.format_prompt, "max_pixels": cfg.data.max_pixels,
              "limit_train": cfg.data.limit_train}
    if settings is not None:
        wanted["bootstrap"] = {k: v for k, v in asdict(settings).items() if k not in _EVAL_ONLY}
    return wanted


def policy_dir(cfg: Config, settings: BootstrapSettings | None = None) -> Path:
    """The folder of the tiny policy bootstrapped with these settings: `model.path`, or its keyed sibling
    when `model.path` holds one bootstrapped otherwise (cluster.caches)."""
    return caches.resolve(Path(cfg.model.path), policy_settings(cfg, settings), "bootstrapped policy",
                          lambda p: (p / "config.json").exists())


def init_policy(cfg: Config, path: Path) -> Path:
    """The untrained tiny policy the warm-up starts from (built when missing), keyed like the caches."""
    wanted = {"arch": cfg.model.arch, "seed": cfg.data.synthetic.seed}
    path = caches.resolve(path, wanted, "initial tiny policy", lambda p: (p / "config.json").exists())
    if not (path / "config.json").exists():
        build_tiny_policy(path, arch=cfg.model.arch, seed=cfg.data.synthetic.seed)
        caches.write_stamp(path, wanted)
    return path


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
    scored = score_responses(prompts, responses)  # the job's evaluation scores the same way
    return scored.accuracy, scored.format_rate, scored.by_family, responses


def warmup_cosine(step: int, st: BootstrapSettings) -> float:
    """Learning rate at `step`: linear warm-up over `st.warmup` steps, then cosine decay to 0."""
    if step < st.warmup:
        return st.lr * (step + 1) / st.warmup
    t = (step - st.warmup) / max(1, st.steps - st.warmup)
    return st.lr * 0.5 * (1 + math.cos(math.pi * t))


def supervised_train(model, processor, train, format_prompt: str, st: BootstrapSettings,
                     progress: bool = True) -> list[float]:
    """`st.steps` AdamW steps of cross-entropy on the response tokens of the worked solutions (a share
    slipped, `st.slip_rate`); the first `st.look_first` on the `count` family only. Returns the losses."""
    torch.manual_seed(st.seed)
    rng = random.Random(st.seed)
    texts = [chat_prompt(processor, p.problem, format_prompt) for p in train]
    slip = [zlib.crc32(f"slip/{p.uid}".encode()) / 2**32 < st.slip_rate for p in train]  # fixed per example
    demos = [synthetic.slipped_solution(p.solution, synthetic.family_of(p.problem)) if s else p.solution
             for p, s in zip(train, slip)]
    targets = [processor.tokenizer(d + "<|im_end|>", add_special_tokens=False)["input_ids"] for d in demos]
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr, weight_decay=0.01)
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
            g["lr"] = warmup_cosine(step, st)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    return losses


def write_policy(model, processor, out: Path, result: BootstrapResult, built_with: dict, samples: list[str]) -> None:
    """The policy, its processor, `bootstrap.json`, sample responses and what built it, into `out`.
    Written next to `out` and renamed into place: an interrupted run leaves no half-written policy
    that later runs would take for a finished one."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    save_processor(processor, tmp)
    (tmp / "bootstrap.json").write_text(json.dumps(asdict(result), indent=2))
    (tmp / "bootstrap_samples.txt").write_text("\n".join(samples))
    caches.write_stamp(tmp, built_with)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def bootstrap(cfg: Config, settings: BootstrapSettings | None = None, out: str | Path | None = None,
              init: str | Path | None = None, progress: bool = True) -> BootstrapResult:
    """Train the tiny policy at `init` (built when missing) on worked solutions; write it to `out`
    (default: `policy_dir`, the folder of a policy bootstrapped with these settings)."""
    st = settings or BootstrapSettings()
    torch.set_num_threads(st.threads)
    ensure_data(cfg)
    out = Path(out) if out else policy_dir(cfg, st)
    init = Path(init) if init else init_policy(cfg, out.parent / "init")
    processor = load_processor(init)
    model = load_policy(init, dtype="float32", device="cpu")
    train = load_split(cfg, processor, cfg.data.train_files, cfg.data.limit_train)
    test = load_split(cfg, processor, cfg.data.test_files, cfg.data.limit_test)
    missing = sum(1 for p in train if not p.solution)
    if missing:
        raise ValueError(f"{missing} of {len(train)} training prompts have no `solution` column: the bootstrap "
                         "trains on worked solutions (the synthetic task has them)")

    t0 = time.perf_counter()
    losses = supervised_train(model, processor, train, cfg.data.format_prompt, st, progress)
    acc, fmt, by_family, responses = greedy_accuracy(model, processor, test, cfg.data.format_prompt,
                                                     st.eval_batch, st.max_new_tokens)
    blank_acc = greedy_accuracy(model, processor, test, cfg.data.format_prompt, st.eval_batch, st.max_new_tokens,
                                blank=True)[0]
    window = max(1, min(50, len(losses) // 5))
    result = BootstrapResult(path=str(out), seconds=round(time.perf_counter() - t0, 1), steps=st.steps,
                             initial_loss=round(sum(losses[:window]) / window, 4),
                             final_loss=round(sum(losses[-window:]) / window, 4),
                             accuracy=acc, format_rate=fmt, blank_accuracy=blank_acc,
                             accuracy_by_family=by_family, n_test=len(test))
    samples = [f"{p.uid}\tanswer={p.answer}\t{r!r}" for p, r in zip(test[:40], responses[:40])]
    write_policy(model, processor, out, result, policy_settings(cfg, st), samples)
    return result


def ensure_policy(cfg: Config, settings: BootstrapSettings | None = None, progress: bool = True) -> Path | str:
    """`model.path`, bootstrapping the tiny policy first when it is missing and `model.build_tiny` is set.
    When `model.path` holds a policy bootstrapped with other settings (another data seed, difficulty,
    architecture), the policy of this config's settings lives in a keyed sibling (cluster.caches):
    built there when missing, and `cfg.model.path` is pointed at it. A storage URI is returned as it is,
    once its config.json is found (nothing is built into a URI)."""
    caches.localize_build_paths(cfg)
    if "://" in cfg.model.path:
        if Storage(cfg.model.path).size("config.json") is None:
            raise FileNotFoundError(f"model.path {cfg.model.path}: no config.json there; a policy URI must name "
                                    "a Hugging Face folder (the tiny policy is built only into a local path)")
        return cfg.model.path
    path = Path(cfg.model.path)
    if (path / "config.json").exists() and (not cfg.model.build_tiny or not (path / "bootstrap.json").exists()):
        return path  # a folder of the user's, not one the bootstrap wrote: nothing recorded to compare
    if not cfg.model.build_tiny:
        raise FileNotFoundError(f"model.path {path} has no config.json and model.build_tiny is false: point "
                                "model.path at a local Hugging Face folder")
    ensure_data(cfg)  # first: the policy's folder is keyed by the data it learns from
    path = policy_dir(cfg, settings)
    cfg.model.path = str(path)
    if (path / "config.json").exists():
        return path
    log.info("no policy at %s: building and bootstrapping the tiny policy", path)
    result = bootstrap(cfg, settings, out=path, progress=progress)
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
    settings = BootstrapSettings(steps=args.steps)
    ensure_data(cfg)  # the data first: the policy's folder is keyed by them too
    path = policy_dir(cfg, settings)
    if (path / "config.json").exists() and not args.force:
        info = path / "bootstrap.json"
        print(f"policy already at {path}" + (f": {info.read_text()}" if info.exists() else ""))
        return 0
    result = bootstrap(cfg, settings, out=path)
    print(json.dumps(asdict(result), indent=2))
    print(f"bootstrapped policy: {result.path} (greedy test accuracy {100 * result.accuracy:.1f}%, "
          f"{100 * result.blank_accuracy:.1f}% with blank images, {result.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
