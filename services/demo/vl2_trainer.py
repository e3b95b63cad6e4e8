"""Train the VL2 demo model: a tiny DeepSeek-VL2 (SigLIP-shaped vision tower on 64 px tiles,
the `downsample_mlp_gelu` projector, the demo's MLA + MoE language model) in stages, and write
it as a DeepSeek-VL2 checkpoint (`model_type: deepseek_vl_v2`) that `model.load_pretrained`
reads.

Stages (`VL2_RECIPE`), all in one process so no stage boundary rounds the weights:
1. text: the language model alone on the arithmetic and small-talk corpus;
2. reading pre-stage (`vl2_reading`): the vision tower and projector with a throw-away
   classifier, single glyphs first, then numbers 0-99 and shape counts;
3. pictures: the language model on picture conversations (counts, numbers, the
   arithmetic-picture stretch) with text turns kept in the mix, the tower and projector frozen
   as the reading stage left them (`train_vision=False`: a picture step then costs about a text
   step).

A chat stage can also teach the language model, at the pictures' own positions, what each
image token shows (`image_reading_weight`, vl2_reading.image_token_targets).

A chat stage can train the tower too, with the reading pre-stage's loss on a few more
pictures a step (`reading_batch_size`) so it keeps its direct signal (services/demo/README.md
has what each did).

Chat stages: cross-entropy on the assistant's tokens only, plus the MoE balance loss.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm

from model import DeepseekV2Config, save_pretrained
from model.image_processing import ProcessedImage, process_image
from model.projector import ProjectorConfig
from model.vision import VisionConfig
from model.vl2 import DeepseekVL2Config, DeepseekVL2ForCausalLM
from services.demo import build_tokenizer as tok
from services.demo.background import in_background
from services.demo.trainer import GENERATION_CONFIG, IGNORE, TrainConfig, model_config
from services.demo.vl2_corpus import Message, Mix, Sample, stream


@dataclass
class StageConfig:
    name: str
    steps: int
    lr: float
    lm_lr_scale: float = 1.0  # the language model's LR relative to `lr` (vision side: 1.0)
    mix: Mix = field(default_factory=Mix)
    # "chat": next-token loss on conversations; "see": the reading pre-stage (the vision tower
    # and projector alone, with a throw-away classifier reading counts and digits)
    kind: str = "chat"
    batch_size: int | None = None  # None: the run's batch size
    constant_lr: bool = False  # after the warm-up: no cosine decay (a stage that must first
    # get off a plateau would otherwise lose its LR before it learns anything)
    # a chat stage: also this many reading pictures per step, with the reading pre-stage's loss
    # (the tower keeps a direct signal while the language model learns to read its tokens)
    reading_batch_size: int = 0
    # a chat stage: False keeps the vision tower and projector as the reading stage left them
    # (no gradients through them, so a picture costs a chat step little more than its extra
    # tokens, and a language model still learning cannot pull the reading apart)
    train_vision: bool = True
    # a chat stage: the weight of a second loss at picture positions, where the language model
    # says what each image token shows (the digit it holds, or how many shapes' centres:
    # vl2_reading.image_token_targets); 0: none
    image_reading_weight: float = 0.0


@dataclass
class VL2TrainConfig:
    seed: int = 0
    batch_size: int = 32
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    threads: int = 2
    device: str = "cpu"
    save_dtype: str = "bfloat16"
    log_every: int = 0  # also print the loss every this many steps (0: only the progress bar)
    # a chat step's batch goes through the model in this many length-sorted slices (the same
    # cross-entropy gradient, less padding: Batch.split)
    micro_batches: int = 2
    # the language model (as the text demo) ...
    language: TrainConfig = field(default_factory=TrainConfig)
    # ... and the vision side: 64 px tiles of 8 px patches (8 x 8 patches, 4 x 4 tokens)
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp_ratio: float = 4.0
    stages: list[StageConfig] = field(default_factory=list)


# 41 min on 2 cores of an AMD EPYC (Zen 5); about an hour on the Intel Xeon of earlier sessions
# (services/demo/README.md, "Status and figures"): the text model (a quarter of its filler words
# unknown ones, phrasing.unknown_word: without them its held-out phrasings swung from 94.5% to
# 85.5% between two CPUs); the reading pre-stage (the vision tower and projector with per-patch
# targets, which take a ViT from scratch off its plateau at once; 5000 steps read 98.5% of
# held-out numbers, 2400 about 92%); then the language model on picture conversations with the
# tower frozen (text kept in the mix: 60% pictures held the text bars, 80% cost them 5 points)
# and the loss at the image positions (`image_reading_weight`: the language model names each
# image token's digit or shape centres, so the reply reads what is already named).
VL2_RECIPE: tuple[StageConfig, ...] = (
    StageConfig("text", steps=5200, lr=3e-3),
    StageConfig(
        "see",
        steps=5000,
        lr=2e-3,
        kind="see",
        batch_size=64,
        mix=Mix(count=0.5, number=0.5, easy_share=0.2),
    ),
    StageConfig(
        "pictures",
        steps=1500,
        lr=1e-3,
        mix=Mix(picture_share=0.6, count=0.45, number=0.5, problem=0.05),
        train_vision=False,
        image_reading_weight=1.0,
    ),
)


def vl2_config(cfg: VL2TrainConfig, vocab_size: int, image_token_id: int) -> DeepseekVL2Config:
    language = model_config(cfg.language, vocab_size)
    language["torch_dtype"] = cfg.save_dtype
    return DeepseekVL2Config(
        language=DeepseekV2Config.from_dict(language),
        vision=VisionConfig(
            model_name="siglip_demo",
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            width=cfg.vision_width,
            layers=cfg.vision_layers,
            heads=cfg.vision_heads,
            mlp_ratio=cfg.vision_mlp_ratio,
        ),
        projector=ProjectorConfig(
            input_dim=cfg.vision_width, n_embed=cfg.language.hidden_size, downsample_ratio=2
        ),
        candidate_resolutions=[(cfg.image_size, cfg.image_size)],
        image_token_id=image_token_id,
    )


class VL2ChatEncoder:
    """Token ids and labels of a conversation in DeepSeek-VL2's format; each `<image>` becomes
    `num_tokens` copies of the image token id (text around it tokenized piece by piece, as
    `model.vl2_prompt.tokenize_with_images` does). Labels cover " reply<eos>" only."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.token_to_id(tok.BOS)
        self.eos = tokenizer.token_to_id(tok.EOS)
        self.image = tokenizer.token_to_id(tok.IMAGE_TOKEN)

    def _ids(self, text: str, image_tokens: list[int]) -> list[int]:
        pieces = text.split(tok.IMAGE_TOKEN)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.image] * image_tokens.pop(0)
            if piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def encode(
        self, messages: list[Message], image_tokens: list[int] = ()
    ) -> tuple[list[int], list[int]]:
        counts = list(image_tokens)
        ids, labels = [self.bos], [IGNORE]
        prompt = ""
        for message in messages:
            if message["role"] == "system":
                prompt += message["content"] + "\n\n"
            elif message["role"] == "user":
                prompt += f"{tok.USER_TAG}: " + message["content"].strip() + "\n\n"
            else:
                prompt_ids = self._ids(prompt + f"{tok.ASSISTANT_TAG}:", counts)
                reply_ids = [*self._ids(" " + message["content"], counts), self.eos]
                ids += prompt_ids + reply_ids
                labels += [IGNORE] * len(prompt_ids) + reply_ids
                prompt = ""
        if prompt:
            prompt_ids = self._ids(prompt, counts)
            ids += prompt_ids
            labels += [IGNORE] * len(prompt_ids)
        return ids, labels

    def prompt(self, messages: list[Message], image_tokens: list[int] = ()) -> list[int]:
        """The ids a reply is generated after: the conversation, then "<|Assistant|>:"."""
        ids, _ = self.encode(messages, image_tokens)
        return ids + self._ids(f"{tok.ASSISTANT_TAG}:", [])


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    targets: Tensor  # [B, T]
    images: list[ProcessedImage]  # in row order, as their tokens appear
    # [B, T] at image positions the token saying what each shows (IGNORE elsewhere), or None
    image_targets: Tensor | None = None
    lengths: list[int] = field(default_factory=list)  # [B] each row's tokens before its padding
    images_per_row: list[int] = field(default_factory=list)  # [B]

    def split(self, parts: int) -> list[Batch]:
        """The rows in `parts` consecutive slices, each cut to its own longest row. `batches`
        gives rows sorted by length, so the short slices are not padded to the longest row
        (a text step 1.08x faster in two slices than whole, for the same cross-entropy
        gradient)."""
        rows = len(self.lengths)
        parts = min(parts, rows)
        if parts <= 1:
            return [self]
        bounds = [rows * i // parts for i in range(parts + 1)]
        pieces, first_image = [], 0
        for begin, end in itertools.pairwise(bounds):
            width = max(self.lengths[begin:end])
            n_images = sum(self.images_per_row[begin:end])
            pieces.append(
                Batch(
                    self.input_ids[begin:end, :width],
                    self.targets[begin:end, :width],
                    self.images[first_image : first_image + n_images],
                    None if self.image_targets is None else self.image_targets[begin:end, :width],
                    self.lengths[begin:end],
                    self.images_per_row[begin:end],
                )
            )
            first_image += n_images
        return pieces


def batches(
    encoder: VL2ChatEncoder,
    config: DeepseekVL2Config,
    seed: int,
    batch_size: int,
    pad_id: int,
    mix: Mix,
    pool_batches: int = 4,
    image_targets: bool = False,
) -> Iterator[Batch]:
    """Right-padded batches grouped by length within pools of a few batches (less padding),
    each batch's rows shortest first; `image_targets`: with what each image position shows
    (vl2_reading.image_token_targets)."""
    from services.demo import vl2_reading as reading

    samples = stream(seed, mix)
    rng = random.Random(seed)
    pre = config.preprocess
    digit_ids = [encoder.tokenizer.token_to_id(str(d)) for d in range(10)]

    def encode(sample: Sample):
        images = [
            process_image(image, pre, cropping=len(sample.images) <= 2) for image in sample.images
        ]
        ids, labels = encoder.encode(sample.messages, [im.num_tokens for im in images])
        at_images = None
        if image_targets:
            # the images' tokens come in runs, in order: their targets one after another
            per_position = (
                target
                for ink, image in zip(sample.inks, images, strict=True)
                for target in reading.image_token_targets(ink, image, config, digit_ids)
            )
            at_images = [next(per_position) if t == encoder.image else IGNORE for t in ids]
        return ids, labels, images, at_images

    while True:
        pool = [encode(next(samples)) for _ in range(batch_size * pool_batches)]
        pool.sort(key=lambda row: len(row[0]))
        groups = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
        rng.shuffle(groups)
        for rows in groups:
            width = max(len(ids) for ids, _, _, _ in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
            targets = torch.full((len(rows), width), IGNORE, dtype=torch.long, device="cpu")
            at_images = torch.full_like(targets, IGNORE) if image_targets else None
            for r, (ids, labels, _, image_labels) in enumerate(rows):
                input_ids[r, : len(ids)] = torch.tensor(ids, device="cpu")
                targets[r, : len(ids) - 1] = torch.tensor(labels[1:], device="cpu")
                if at_images is not None:
                    # not shifted: the logits at an image position say what it shows
                    at_images[r, : len(ids)] = torch.tensor(image_labels, device="cpu")
            images = [im for _, _, ims, _ in rows for im in ims]
            lengths = [len(ids) for ids, _, _, _ in rows]
            per_row = [len(ims) for _, _, ims, _ in rows]
            yield Batch(input_ids, targets, images, at_images, lengths, per_row)


def image_rows(model: DeepseekVL2ForCausalLM, images: list[ProcessedImage]) -> Tensor:
    """[sum of num_tokens, D] image embeddings in the 2D layout, with gradients (the serving
    `embed_images` runs under no_grad)."""
    embed = getattr(DeepseekVL2ForCausalLM.embed_images, "__wrapped__", None)
    if embed is None:  # not wrapped by no_grad
        return torch.cat(model.embed_images(images))
    return torch.cat(embed(model, images))


def input_embeddings(
    model: DeepseekVL2ForCausalLM, input_ids: Tensor, images: list[ProcessedImage]
) -> Tensor:
    """[B, T] ids -> [B, T, D]: token embeddings with the image rows at the image positions."""
    embeds = model.embed_tokens(input_ids)
    if not images:
        return embeds
    mask = (input_ids == model.vl2_config.image_token_id).unsqueeze(-1)  # [B, T, 1]
    return embeds.masked_scatter(mask, image_rows(model, images).to(embeds.dtype))


def lr_factor(step: int, steps: int, cfg: VL2TrainConfig, constant: bool = False) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if constant:
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_optimizer(
    model: DeepseekVL2ForCausalLM, stage: StageConfig, cfg: VL2TrainConfig
) -> torch.optim.Optimizer:
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        language = name.startswith("language.")
        decay = p.dim() >= 2 and not name.endswith("gate.weight")
        groups.setdefault((language, decay), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": cfg.weight_decay if decay else 0.0,
                "lr_scale": stage.lm_lr_scale if language else 1.0,
            }
            for (language, decay), params in groups.items()
        ],
        lr=stage.lr,
        betas=(0.9, 0.98),
        fused=True,  # one kernel for all parameters: ~4x faster than the per-tensor loop
    )


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    final_loss: float


def train_vl2(
    cfg: VL2TrainConfig, out_dir: Path, *, progress: bool = True
) -> tuple[DeepseekVL2ForCausalLM, list[StageResult]]:
    """Tokenizer, model, every stage of cfg.stages, then the checkpoint in out_dir."""
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tok.write_vl2_tokenizer(
        out_dir, seed=cfg.seed, model_max_length=cfg.language.max_position_embeddings
    )
    config = vl2_config(cfg, tokenizer.get_vocab_size(), tokenizer.token_to_id(tok.IMAGE_TOKEN))
    with torch.device(device):
        model = DeepseekVL2ForCausalLM(config)
    model.init_weights(torch.Generator(device).manual_seed(cfg.seed))
    model.train()
    encoder = VL2ChatEncoder(tokenizer)
    pad = tokenizer.token_to_id(tok.PAD)
    results = []
    reading_head: list = []  # the reading stages share one throw-away classifier
    for index, stage in enumerate(cfg.stages):
        if stage.kind == "see":
            result = _reading_stage(
                model, config, stage, index, cfg, device, progress, reading_head
            )
        else:
            result = _chat_stage(
                model, config, encoder, pad, stage, index, cfg, device, progress, reading_head
            )
        results.append(result)
    model.eval()
    save_vl2_checkpoint(model, out_dir, cfg)
    return model, results


def _chat_stage(
    model: DeepseekVL2ForCausalLM,
    config: DeepseekVL2Config,
    encoder: VL2ChatEncoder,
    pad: int,
    stage: StageConfig,
    index: int,
    cfg: VL2TrainConfig,
    device: torch.device,
    progress: bool,
    shared_head: list,
) -> StageResult:
    started = time.perf_counter()
    with _vision_trainable(model, stage.train_vision):
        optimizer = build_optimizer(model, stage, cfg)
        # each stage its own data seed, so changing one stage leaves the others' data alone
        batch_size = stage.batch_size or cfg.batch_size
        make_batches = partial(
            batches,
            encoder,
            config,
            cfg.seed + 1 + index,
            batch_size,
            pad,
            stage.mix,
            image_targets=stage.image_reading_weight > 0,
        )
        head = None
        if stage.reading_batch_size:
            head = _reading_head(shared_head, config, device, cfg.seed)
            optimizer.add_param_group(
                {"params": list(head.parameters()), "weight_decay": 0.0, "lr_scale": 1.0}
            )
            make_batches = partial(
                _paired,
                make_batches,
                partial(_stage_reading_batches, config, stage, cfg.seed + 101 + index, cfg),
            )
        with in_background(make_batches) as data:
            ema = _chat_steps(model, optimizer, data, stage, cfg, device, progress, started, head)
    return StageResult(stage.name, stage.steps, time.perf_counter() - started, float(ema or 0))


@contextmanager
def _vision_trainable(model: DeepseekVL2ForCausalLM, train: bool) -> Iterator[None]:
    """The vision tower and projector trainable or frozen for one stage, and trainable again
    after it (also when the stage fails)."""
    parts = (model.vision, model.projector)
    for part in parts:
        part.requires_grad_(train)
    try:
        yield
    finally:
        for part in parts:
            part.requires_grad_(True)


def _paired(first: Callable[[], Iterator], second: Callable[[], Iterator]) -> Iterator[tuple]:
    """Items of two streams side by side (one background worker makes both)."""
    return zip(first(), second(), strict=True)


def _chat_steps(
    model: DeepseekVL2ForCausalLM,
    optimizer: torch.optim.Optimizer,
    data: Iterator[Batch],
    stage: StageConfig,
    cfg: VL2TrainConfig,
    device: torch.device,
    progress: bool,
    started: float,
    head: nn.Module | None = None,
) -> float | None:
    from services.demo import vl2_reading as reading

    ema = None
    bar = tqdm(range(stage.steps), desc=f"train-demo {stage.name}", disable=not progress)
    for step in bar:
        factor = lr_factor(step, stage.steps, cfg, stage.constant_lr)
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * factor * group["lr_scale"]
        batch, reading_batch = next(data) if head is not None else (next(data), None)
        optimizer.zero_grad(set_to_none=True)
        ce = _accumulate_gradients(model, batch.split(cfg.micro_batches), stage, device)
        if reading_batch is not None:
            reading.reading_loss(model, head, reading_batch, device)[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema = ce if ema is None else 0.95 * ema + 0.05 * ce
        bar.set_postfix(loss=f"{ema:.4f}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            elapsed = time.perf_counter() - started
            print(f"{stage.name} step {step + 1}: loss {ema:.4f} ({elapsed:.0f} s)", flush=True)
    return ema


def _accumulate_gradients(
    model: DeepseekVL2ForCausalLM, parts: list[Batch], stage: StageConfig, device: torch.device
) -> float:
    """Backward of one step's loss, slice by slice: the mean cross-entropy over all the
    replies' tokens (each slice's sum over the step's count), the balance loss (a mean over
    sequences: each slice's weighted by its share of the rows) and the image-position loss;
    the gradient of one pass over the whole batch, but for the balance loss, which counts a
    row's padding as tokens (a slice pads less). Returns the cross-entropy."""
    targets = [part.targets.to(device) for part in parts]
    image_targets = [
        None if part.image_targets is None else part.image_targets.to(device) for part in parts
    ]
    taught = [t != IGNORE for t in targets]  # [B, T] each
    shown = [None if t is None else t != IGNORE for t in image_targets]
    n_taught = max(1, sum(int(mask.sum()) for mask in taught))
    n_image = sum(int(mask.sum()) for mask in shown if mask is not None)
    n_rows = sum(part.input_ids.shape[0] for part in parts)
    total_ce = 0.0
    for part, target, image_target, at_replies, at_images in zip(
        parts, targets, image_targets, taught, shown, strict=True
    ):
        # logits [N, V] only where a loss is taken: the replies' tokens (and the image
        # positions); the head over every position cost ~7% of a text step
        keep = at_replies if at_images is None else at_replies | at_images  # [B, T]
        embeds = input_embeddings(model, part.input_ids.to(device), part.images)
        logits, balance = model(inputs_embeds=embeds, return_balance_loss=True, logits_at=keep)
        ce = F.cross_entropy(logits, target[keep], ignore_index=IGNORE, reduction="sum") / n_taught
        loss = ce + balance * (part.input_ids.shape[0] / n_rows)
        if image_target is not None and n_image:
            at_images_ce = F.cross_entropy(
                logits, image_target[keep], ignore_index=IGNORE, reduction="sum"
            )
            loss = loss + stage.image_reading_weight * at_images_ce / n_image
        loss.backward()
        total_ce += ce.item()
    return total_ce


def _reading_stage(
    model: DeepseekVL2ForCausalLM,
    config: DeepseekVL2Config,
    stage: StageConfig,
    index: int,
    cfg: VL2TrainConfig,
    device: torch.device,
    progress: bool,
    shared_head: list,
) -> StageResult:
    """The reading pre-stage (services.demo.vl2_reading): vision tower + projector only.
    `shared_head` holds the classifier from one reading stage to the next."""
    from services.demo import vl2_reading as reading

    started = time.perf_counter()
    head = _reading_head(shared_head, config, device, cfg.seed)
    params = [*model.vision.parameters(), *model.projector.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=stage.lr,
        betas=(0.9, 0.98),
        fused=True,
    )
    make_batches = partial(_stage_reading_batches, config, stage, cfg.seed + 1 + index, cfg)
    with in_background(make_batches) as data:
        ema = _reading_steps(model, head, optimizer, params, data, stage, cfg, device, progress)
    if cfg.log_every:
        for split in ("train", "held_out"):
            acc = reading.reading_accuracy(model, head, config, device, split=split)
            print(f"{stage.name} classifier on {split} pictures: {acc}", flush=True)
    return StageResult(stage.name, stage.steps, time.perf_counter() - started, float(ema or 0))


def _reading_head(
    shared_head: list, config: DeepseekVL2Config, device: torch.device, seed: int
) -> nn.Module:
    """The throw-away reading classifier, made by the first stage that needs it. Its initial
    weights come from `seed` alone (made on the CPU, then moved), not from whatever the global
    generator went through before, so a stage gives the same result whether the stages before
    it ran in this process or in another one."""
    from services.demo import vl2_reading as reading

    if not shared_head:
        h = config.tokens_per_tile_side
        cpu = torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = reading.ReadingHead(h * h, config.projector.n_embed, config.vision.width, cpu)
        shared_head.append(head.to(device))
    return shared_head[0]


def _stage_reading_batches(
    config: DeepseekVL2Config, stage: StageConfig, seed: int, cfg: VL2TrainConfig
) -> Iterator:
    """A stage's reading batches: the reading stage's own batch size, or a chat stage's
    `reading_batch_size`; shapes and numbers in the proportion of the stage's mix."""
    from services.demo import vl2_reading as reading

    if stage.kind == "see":
        batch_size = stage.batch_size or cfg.batch_size
    else:
        batch_size = stage.reading_batch_size
    return reading.reading_batches(
        config,
        seed,
        batch_size,
        count_share=stage.mix.count / max(1e-9, stage.mix.count + stage.mix.number),
        single_digit_share=1.0 if stage.mix.max_number < 10 else 0.3,
        easy_share=stage.mix.easy_share,
    )


def _reading_steps(
    model: DeepseekVL2ForCausalLM,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    data: Iterator,
    stage: StageConfig,
    cfg: VL2TrainConfig,
    device: torch.device,
    progress: bool,
) -> float | None:
    from services.demo import vl2_reading as reading

    started = time.perf_counter()
    ema = None
    bar = tqdm(range(stage.steps), desc=f"train-demo {stage.name}", disable=not progress)
    for step in bar:
        factor = lr_factor(step, stage.steps, cfg, stage.constant_lr)
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * factor
        loss, accuracy = reading.reading_loss(model, head, next(data), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}")
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            elapsed = time.perf_counter() - started
            acc = " ".join(f"{k} {v:.2f}" for k, v in accuracy.items())
            print(
                f"{stage.name} step {step + 1}: loss {ema:.4f} {acc} ({elapsed:.0f} s)", flush=True
            )
    return ema


def save_vl2_checkpoint(model: DeepseekVL2ForCausalLM, out_dir: Path, cfg: VL2TrainConfig) -> None:
    dtype = torch.bfloat16 if cfg.save_dtype == "bfloat16" else torch.float32
    save_pretrained(model, out_dir, dtype=dtype)
    (out_dir / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    (out_dir / "training_args.json").write_text(
        json.dumps(_jsonable(dataclasses.asdict(cfg)), indent=2) + "\n"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def recipe_config(**overrides: Any) -> VL2TrainConfig:
    cfg = VL2TrainConfig(**overrides)
    if not cfg.stages:
        cfg.stages = [dataclasses.replace(s) for s in VL2_RECIPE]
    return cfg
