"""`vlmfix demo train`: the recipe that builds the demo VLM (docs/results.md), seeded, on CPU.

Stage 1, vision pre-training: the CLIP vision tower alone learns to tell which of the 65
EmojiCOCO categories a scene holds (multi-label, binary cross-entropy on a linear head over the
mean of the last layer's patch features). Without it the captioning stage collapses to one
sentence for every image.

Stage 2, LLaVA-style instruction tuning: projector + vision tower + LoRA on every attention and
MLP projection of the frozen SmolLM2-135M-Instruct decoder learn, in one multi-turn conversation
per image (turns shuffled), a caption ("Please describe this image in detail." and variants,
answered with one of the image's reference captions) and yes/no questions in POPE's format
("Is there a dog in the image?\\nAnswer the question using a single word or phrase.", half
present objects, half absent ones drawn uniformly). The loss is the cross-entropy of the
assistant tokens. A frozen decoder cannot learn the yes/no answers (measured): hence LoRA.

Training scenes come from the EmojiCOCO world with seed `world_seed` (1); the held-out images of
`docs/results.md` use seed 0, the check at the end of training seed 2. Matrix products run in
bfloat16 autocast; the trainable weights and the optimiser stay fp32. Progress is checkpointed
after stage 1 and every `checkpoint_every` steps; a rerun with the same --out resumes.

Outputs in --out: demo.safetensors (vision tower, projector, LoRA; fp16), recipe.json,
train_log.jsonl (one record per step), loss.png, check.json (held-out yes/no accuracy, captions).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmfix.data.world import CATEGORIES, draw_image
from vlmfix.demo.lora import TARGETS, add_lora, lora_state
from vlmfix.data.prompts import CAPTION_PROMPTS, yes_no_question



@dataclass
class Recipe:
    """Every knob of the demo VLM's training; the defaults are the committed model's."""

    seed: int = 0
    world_seed: int = 1
    check_seed: int = 2
    n_images: int = 10000
    image_size: int = 168  # 12 x 12 = 144 image tokens
    patch_size: int = 14
    vision_hidden: int = 192
    vision_layers: int = 6
    # stage 1: vision tower as a multi-label classifier
    pretrain_steps: int = 600
    pretrain_batch: int = 48
    pretrain_lr: float = 1e-3
    # stage 2: projector + vision tower + LoRA, captions and yes/no
    steps: int = 500
    batch: int = 8
    lr_projector: float = 1e-3
    lr_vision: float = 2e-4
    lr_lora: float = 5e-4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = TARGETS
    yes_no_per_image: int = 4
    warmup: int = 30
    weight_decay: float = 0.0
    bf16: bool = False  # bfloat16 autocast: faster only where the CPU has bf16 units (not AVX2-only ones)
    checkpoint_every: int = 50

    def check(self) -> None:
        """Raise ValueError for a recipe that cannot run (before anything is loaded or drawn)."""
        for name in ("n_images", "steps", "pretrain_steps", "batch", "pretrain_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"the recipe's {name} must be >= 1, got {getattr(self, name)}")
        need = max(self.batch, self.pretrain_batch)
        if self.n_images < need:
            raise ValueError(f"--n-images {self.n_images} is fewer than one training batch draws ({self.pretrain_batch} "
                             f"images a stage-1 step, {self.batch} a stage-2 step): give --n-images {need} or more")
    check_images: int = 100


# -- data ---------------------------------------------------------------------------------------
@dataclass
class Scenes:
    """Rendered training scenes: pixel values as the demo processor makes them (fp16), the object
    categories present, the reference captions."""

    pixels: torch.Tensor
    present: list[list[str]]
    captions: list[list[str]]

    def labels(self) -> torch.Tensor:
        index = {c: i for i, c in enumerate(CATEGORIES)}
        y = torch.zeros(len(self.present), len(CATEGORIES))
        for row, names in enumerate(self.present):
            y[row, [index[n] for n in names]] = 1.0
        return y


def render_scenes(seed: int, n: int, image_processor: Any, workers: int = 2, desc: str = "render") -> Scenes:
    """Draw images 1..n of the EmojiCOCO world `seed` and preprocess them."""
    from tqdm.auto import tqdm

    def one(image_id: int):
        picture, _, objects, captions = draw_image(seed, image_id)
        pixels = image_processor(picture, return_tensors="pt")["pixel_values"][0].half()
        return pixels, sorted({name for name, _, _ in objects}), captions

    with ThreadPoolExecutor(max(1, workers)) as pool:
        rows = list(tqdm(pool.map(one, range(1, n + 1)), total=n, desc=desc, mininterval=5))
    return Scenes(torch.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows])


def conversation(rng: random.Random, present: list[str], captions: list[str], yes_no: int) -> list[tuple[str, str]]:
    """(question, answer) turns for one image: one caption and `yes_no` yes/no questions (half
    about present categories, as far as there are, half about absent ones), shuffled."""
    n_pos = min(yes_no // 2, len(present))
    absent = [c for c in CATEGORIES if c not in present]
    turns = [(rng.choice(CAPTION_PROMPTS), rng.choice(captions))]
    turns += [(yes_no_question(c), "Yes") for c in rng.sample(present, n_pos)]
    turns += [(yes_no_question(c), "No") for c in rng.sample(absent, yes_no - n_pos)]
    rng.shuffle(turns)
    return turns


def encode(tokenizer: Any, turns: list[tuple[str, str]], image_id: int, n_image_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant's answers) of a conversation in the demo's
    chat format: the image comes first in the first user turn, as `prompt_for` writes it."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if learn else [-100] * len(piece))

    for k, (question, answer) in enumerate(turns):
        add("<|im_start|>user\n", False)
        if k == 0:
            ids.extend([image_id] * n_image_tokens)
            labels.extend([-100] * n_image_tokens)
            add("\n", False)
        add(f"{question}<|im_end|>\n<|im_start|>assistant\n", False)
        add(f"{answer}<|im_end|>", True)
        add("\n", False)
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# -- schedule, checkpoints, logs ------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t)))


def batch_indices(seed: int, stage: str, step: int, n: int, size: int) -> list[int]:
    """The images of one step: a pure function of (seed, stage, step), so a resumed run is identical."""
    return random.Random(f"{seed}/{stage}/{step}").sample(range(n), size)


class Log:
    """train_log.jsonl, appended and flushed per record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate(self, stage: str, steps_done: int) -> None:
        """Drop records of `stage` at or after `steps_done` (written after the checkpoint resumed from)."""
        keep = [r for r in self.records if not (r["stage"] == stage and r["step"] >= steps_done)]
        if len(keep) != len(self.records):
            self.records = keep
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


# -- the two stages -------------------------------------------------------------------------------
def _autocast(recipe: Recipe, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16)


def pretrain_vision(tower: nn.Module, scenes: Scenes, recipe: Recipe, out: Path, log: Log,
                    device: torch.device) -> None:
    """Stage 1 (see the module docstring); resumable from out/stage1.pt."""
    from tqdm.auto import tqdm

    y = scenes.labels().to(device)
    head = nn.Linear(recipe.vision_hidden, len(CATEGORIES)).to(device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.pretrain_lr, weight_decay=0.05)
    ckpt = out / "stage1.pt"
    start = 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False, map_location=device)
        tower.load_state_dict(saved["tower"])
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    log.truncate("vision", start)
    pos_weight = ((1 - y.mean(0)) / y.mean(0).clamp_min(1e-3)).clamp(max=20.0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    tower.train()
    bar = tqdm(range(start, recipe.pretrain_steps), desc="stage 1: vision tower", initial=start,
               total=recipe.pretrain_steps)
    for step in bar:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = recipe.pretrain_lr * lr_factor(step, recipe.pretrain_steps, recipe.warmup)
        idx = batch_indices(recipe.seed, "vision", step, len(y), recipe.pretrain_batch)
        with _autocast(recipe, device):
            feats = tower(pixel_values=scenes.pixels[idx].to(device).float()).last_hidden_state[:, 1:].mean(1)
            logits = head(feats)
        loss = loss_fn(logits.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        pred = logits.detach().float() > 0
        truth = y[idx] > 0
        bal = 0.5 * ((pred & truth).sum() / truth.sum().clamp_min(1) + (~pred & ~truth).sum() / (~truth).sum())
        log.write({"stage": "vision", "step": step, "loss": loss.item(), "balanced_acc": bal.item(),
                   "sec": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{loss.item():.3f}", bal=f"{bal.item():.2f}")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.pretrain_steps:
            _save_checkpoint(ckpt, {"tower": tower.state_dict(), "head": head.state_dict(),
                                    "opt": opt.state_dict(), "step": step + 1})
    tower.eval()


def trainable_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """Freeze the decoder, add LoRA; the optimiser's groups: projector, vision tower, LoRA."""
    for p in model.parameters():
        p.requires_grad_(False)
    lora = add_lora(model.model.language_model, recipe.lora_rank, recipe.lora_alpha, recipe.lora_targets)
    projector = list(model.model.multi_modal_projector.parameters())
    vision = list(model.model.vision_tower.parameters())
    for p in projector + vision + lora:
        p.requires_grad_(True)
    return [{"params": projector, "lr": recipe.lr_projector, "name": "projector"},
            {"params": vision, "lr": recipe.lr_vision, "name": "vision"},
            {"params": lora, "lr": recipe.lr_lora, "name": "lora"}]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the demo ships: vision tower, projector, LoRA (A, B) of the decoder."""
    state = {f"vision_tower.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    state.update({f"projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()})
    state.update({f"lora.{k}": v for k, v in lora_state(model.model.language_model).items()})
    return state


def tune(model: nn.Module, processor: Any, scenes: Scenes, recipe: Recipe, out: Path, log: Log,
         device: torch.device) -> None:
    """Stage 2 (see the module docstring); resumable from out/stage2.pt."""
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    n_tokens = (recipe.image_size // recipe.patch_size) ** 2
    groups = trainable_groups(model, recipe)
    opt = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    params = [p for g in groups for p in g["params"]]
    ckpt = out / "stage2.pt"
    start = 0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False, map_location=device)
        missing = set(saved["model"]) - set(model.state_dict())
        if missing:
            raise RuntimeError(f"{ckpt} does not match this recipe ({len(missing)} unknown weights); delete it")
        model.load_state_dict(saved["model"], strict=False)
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
    log.truncate("tune", start)
    model.train()
    peaks = [g["lr"] for g in groups]
    image_id = model.config.image_token_index
    bar = tqdm(range(start, recipe.steps), desc="stage 2: projector + vision + LoRA", initial=start,
               total=recipe.steps)
    for step in bar:
        t0 = time.perf_counter()
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * lr_factor(step, recipe.steps, recipe.warmup)
        idx = batch_indices(recipe.seed, "tune", step, len(scenes.present), recipe.batch)
        rng = random.Random(f"{recipe.seed}/turns/{step}")
        batch = collate([encode(tokenizer, conversation(rng, scenes.present[i], scenes.captions[i],
                                                        recipe.yes_no_per_image), image_id, n_tokens)
                         for i in idx], tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(recipe, device):
            logits, targets = answer_logits(model, batch, scenes.pixels[idx].to(device).float())
        loss = nn.functional.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        yes_no = _yes_no_accuracy(logits.detach(), targets, tokenizer)
        log.write({"stage": "tune", "step": step, "loss": loss.item(), "yes_no_acc": yes_no,
                   "sec": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{loss.item():.3f}", yes_no=f"{yes_no:.2f}")
        if (step + 1) % recipe.checkpoint_every == 0 or step + 1 == recipe.steps:
            _save_checkpoint(ckpt, {"model": {k: v for k, v in model.state_dict().items()
                                              if "lora_" in k or "vision_tower" in k or "multi_modal_projector" in k},
                                    "opt": opt.state_dict(), "step": step + 1})
    model.eval()


def answer_logits(model: nn.Module, batch: dict[str, torch.Tensor],
                  pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits (N, V) and targets (N,) of the learned tokens only. The decoder's last hidden
    state at each position whose next token is learned (shifted label != -100) goes through the
    output layer; the other positions (the image, the questions: about 90 % of a conversation)
    never reach the 49k-way product and its softmax. The mean cross-entropy over them equals the
    full-logits loss with ignore_index=-100."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=pixel_values).last_hidden_state
    labels = batch["labels"][:, 1:]
    learned = labels != -100
    return model.lm_head(hidden[:, :-1][learned]).float(), labels[learned]


def _yes_no_accuracy(logits: torch.Tensor, labels: torch.Tensor, tokenizer: Any) -> float:
    """Share of "Yes"/"No" answer tokens predicted right (teacher-forced) in a batch."""
    targets = {tokenizer.convert_tokens_to_ids(t) for t in ("Yes", "No")}
    where = torch.zeros_like(labels, dtype=torch.bool)
    for t in targets:
        where |= labels == t
    if not where.any():
        return float("nan")
    return (logits.argmax(-1)[where] == labels[where]).float().mean().item()


# -- the whole recipe -----------------------------------------------------------------------------
def train(out: str | Path, recipe: Recipe | None = None, device: str = "cpu") -> Path:
    """Run the recipe into `out` on `device`; returns the path of demo.safetensors. Resumes a
    stopped run. The recipe's numbers do not depend on the device, its results do slightly."""
    from safetensors.torch import save_file

    from vlmfix.demo import build_llava, load_smollm2
    from vlmfix.demo.check import check_model
    from vlmfix.demo.plots import loss_plot

    recipe = recipe or Recipe()
    recipe.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / "recipe.json"
    if recipe_path.exists() and json.loads(recipe_path.read_text()) != json.loads(json.dumps(asdict(recipe))):
        raise RuntimeError(f"{out} holds a run of a different recipe ({recipe_path}); use another --out or delete it")
    recipe_path.write_text(json.dumps(asdict(recipe), indent=1))
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    log = Log(out / "train_log.jsonl")
    lm, tokenizer = load_smollm2()
    model, processor = build_llava(
        lm, tokenizer, image_size=recipe.image_size, patch_size=recipe.patch_size, vision_hidden=recipe.vision_hidden,
        vision_layers=recipe.vision_layers, seed=recipe.seed, pad_to_square=True,
    )
    del lm
    where = torch.device(device)
    model.to(where)
    scenes = render_scenes(recipe.world_seed, recipe.n_images, processor.image_processor, workers=os.cpu_count() or 2)
    pretrain_vision(model.model.vision_tower, scenes, recipe, out, log, where)
    tune(model, processor, scenes, recipe, out, log, where)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in trainable_state(model).items()}
    weights = out / "demo.safetensors"
    meta = {"recipe": json.dumps(asdict(recipe)), "format": "vlmfix-demo-1"}
    save_file(state, str(weights), metadata=meta)
    loss_plot(log.records, out / "loss.png")
    minutes = (time.perf_counter() - start) / 60
    from vlmfix.demo.load import load_demo

    demo, demo_processor = load_demo(weights)
    check = check_model(demo.to(where), demo_processor, seed=recipe.check_seed, n_images=recipe.check_images)
    check.update(train_minutes_this_run=round(minutes, 1), device=str(where), torch_threads=torch.get_num_threads())
    (out / "check.json").write_text(json.dumps(check, indent=1))
    print(json.dumps({k: v for k, v in check.items() if k != "captions"}, indent=1))
    return weights
