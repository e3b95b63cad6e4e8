"""The offline engine: owns model, cache, scheduler; `step()` advances every request.

`Engine.generate` runs a list of prompts to completion. Servers drive the same engine
through `AsyncEngine`, which calls `add_request`/`abort`/`step` from one background thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from model.kernels import log_choices
from model.placement import PlacementError, dtype_name, resolve_device, resolve_dtype
from services.engine.block_manager import BlockManager
from services.engine.images import check_spans, release
from services.engine.metrics import Metrics, MetricsSnapshot
from services.engine.params import DEFAULT_CACHE_BYTES, EngineOptions, SamplingParams
from services.engine.priority import Overloaded, Priority
from services.engine.runner import ModelRunner
from services.engine.sampler import sample
from services.engine.scheduler import Scheduler
from services.engine.sequence import ImageSpan, RequestOutput, Sequence, StreamDelta
from services.engine.text import TextStream


class InvalidRequest(ValueError):
    """The request cannot be served as given; the message says what to fix."""


def _eos_id(tokenizer: Any, config: Any) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


def _placement(model: torch.nn.Module, opts: EngineOptions) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's weights, which must be what the options ask for
    (``auto`` takes the model as it is): an engine never moves or converts a model itself."""
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    if opts.device != "auto" and resolve_device(opts.device) != device:
        raise PlacementError(
            f"the model's weights are on {device} but device={opts.device!r}: load it with "
            f"Engine.from_pretrained(path, device={opts.device!r}) or move it there first"
        )
    if opts.dtype != "auto" and resolve_dtype(opts.dtype, device) != dtype:
        raise PlacementError(
            f"the model's weights are {dtype_name(dtype)} but dtype={opts.dtype!r}: load it "
            f"with Engine.from_pretrained(path, dtype={opts.dtype!r}) or convert it first"
        )
    return device, dtype


class Engine:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any | None = None,
        options: EngineOptions | None = None,
    ):
        self.options = opts = options or EngineOptions()
        opts.validate()
        self.model = model.eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.device, self.dtype = _placement(model, opts)
        self.kernels = log_choices(self.device)  # which fast paths this hardware gets (logged)
        self.max_model_len = opts.max_model_len or self.config.max_position_embeddings
        if opts.cache_tokens is not None:
            tokens = opts.cache_tokens
        else:
            per_token = ModelRunner.bytes_per_token(self.config, self.dtype)
            tokens = (opts.cache_bytes or DEFAULT_CACHE_BYTES) // per_token
            # no point holding more than max_num_seqs full contexts
            tokens = min(tokens, opts.max_num_seqs * (self.max_model_len + opts.block_size))
        num_blocks = max(1, tokens // opts.block_size)
        self.blocks = BlockManager(num_blocks, opts.block_size, opts.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, opts.max_num_seqs, opts.max_num_batched_tokens, opts.priority_aging_s
        )
        self.shed_classes = opts.shed_classes()
        self.runner = ModelRunner(
            model,
            num_blocks,
            opts.block_size,
            self.dtype,
            device=self.device,
            prepack=opts.prepack_weights,
            cuda_graphs=opts.cuda_graphs,
            fused_decode=opts.fused_decode,
            max_batch_size=opts.max_num_seqs,
            max_model_len=self.max_model_len,
            image_cache_bytes=opts.image_cache_bytes if self.accepts_images else 0,
        )
        self.eos_token_id = _eos_id(tokenizer, self.config)
        self.seqs: dict[str, Sequence] = {}
        self._metrics = Metrics()
        self._ids = itertools.count()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        expert_executor: Any | None = None,
        experts: Any = "all",
        **options: Any,
    ) -> Engine:
        """Load a checkpoint straight onto ``device`` in ``dtype`` (None: the option's
        default, ``auto``) and build the engine; other keywords are EngineOptions fields."""
        import model as dsv2_model

        known = {f.name for f in fields(EngineOptions)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown engine options {sorted(unknown)}; known: {sorted(known)}")
        if dtype is not None:
            options["dtype"] = dtype
        if device is not None:
            options["device"] = device
        opts = EngineOptions(**options)
        opts.validate()
        # resolved here, in the process that runs the engine (a Ray replica sees its GPU)
        dev = resolve_device(opts.device)
        dt = resolve_dtype(opts.dtype, dev)
        opts = replace(opts, device=str(dev), dtype=dtype_name(dt))
        m = dsv2_model.load_pretrained(path, dtype=dt, experts=experts, device=dev)
        if expert_executor is not None:
            m.set_expert_executor(expert_executor)
        tokenizer = None
        if (Path(path) / "tokenizer.json").is_file():
            from model.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_pretrained(path)
        return cls(m, tokenizer, opts)

    # -- requests ---------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("this checkpoint has no tokenizer: send token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
        return ids

    def check_prompt(self, ids: list[int]) -> None:
        """Refuse a prompt the engine cannot run, before any work."""
        if not ids:
            raise InvalidRequest("prompt is empty: send at least one token")
        vocab = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"prompt has token ids outside the vocabulary [0, {vocab})")
        if len(ids) > self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} "
                f"tokens: shorten the prompt by {len(ids) - self.max_model_len} tokens"
            )
        if len(ids) > self.blocks.capacity_tokens:
            raise InvalidRequest(
                f"prompt has {len(ids)} tokens but the KV cache holds {self.blocks.capacity_tokens}: "
                "shorten the prompt or start the engine with a larger cache"
            )

    @property
    def accepts_images(self) -> bool:
        """Whether the model embeds pictures (a DeepSeek-VL2 checkpoint)."""
        return hasattr(self.model, "embed_images")

    def check_images(self, ids: list[int], images: list[ImageSpan] | None) -> None:
        """Refuse images a text-only model cannot take, or (a VL2 model) spans that do not
        cover exactly the prompt's image-token runs."""
        if not self.accepts_images:
            if images:
                raise InvalidRequest("this model takes no images: send text only")
            return
        image_token_id = self.model.vl2_config.image_token_id
        if image_token_id is None:
            if images:
                raise InvalidRequest(
                    "this checkpoint does not name its <image> token (no tokenizer.json with "
                    "one, no image_token_id in config.json): it cannot take images"
                )
            return
        # a prompt holding image tokens without pictures would embed the placeholder's
        # vocabulary row as if it were a picture: refused too
        try:
            check_spans(ids, images or [], image_token_id)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: Priority = Priority.FREE,
        images: list[ImageSpan] | None = None,
    ) -> str:
        """Queue a request. ``images``: the pictures in the prompt, each over its run of
        image token ids (image tokens count toward the context like any other)."""
        params = params or SamplingParams()
        try:
            params.validate()
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        ids = self.encode(prompt)
        self.check_prompt(ids)
        self.check_images(ids, images)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        detok = None
        if self.tokenizer is not None:
            from model.detokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer)
        seq = Sequence(
            request_id,
            ids,
            params,
            TextStream(detok, list(params.stop)),
            self.eos_token_id,
            self.device,
            priority=priority,
            images=images,
        )
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        self._metrics.prompt_tokens += len(ids)
        return request_id

    def check_overload(self, priority: Priority, pending: tuple[int, int] = (0, 0)) -> None:
        """Refuse (Overloaded) a new request of a shed class while the waiting queue, plus
        `pending` (requests, tokens) submitted but not yet queued, is at or past a bound.
        Called from any thread: the counts it reads may be one step stale."""
        if priority not in self.shed_classes:
            return
        opts, queue = self.options, self.scheduler.waiting
        requests = queue.total_requests + pending[0]
        tokens = queue.total_tokens + pending[1]
        over = None
        if opts.max_waiting_requests is not None and requests >= opts.max_waiting_requests:
            over = f"{requests} requests are waiting (bound {opts.max_waiting_requests})"
        elif opts.max_waiting_tokens is not None and tokens >= opts.max_waiting_tokens:
            over = f"{tokens} prompt tokens are waiting (bound {opts.max_waiting_tokens})"
        if over is not None:
            self._metrics.count_shed(priority)
            raise Overloaded(
                f"the model plane is overloaded ({over}); {priority.label} requests are "
                "refused until the queue shrinks, retry shortly"
            )

    def abort(self, request_id: str) -> StreamDelta | None:
        """Cancel a request; its blocks are free when this returns."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.finished:
            return None
        return self._finish(seq, "abort", "", [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Schedule, run one forward, sample, and return what changed for each request."""
        batch = self.scheduler.schedule()
        deltas: list[StreamDelta] = []
        for seq in batch.rejected:
            deltas.append(self._finish(seq, "length", "", []))
        if batch.empty:
            return deltas
        samplers, logits = self.runner.execute(batch)
        for seq in batch.decodes:
            if seq.num_computed < seq.prompt_len:
                self._metrics.computed_prompt_tokens += 1
            seq.num_computed += 1
            release(seq)
        for seq, n in batch.prefills:
            if seq.num_computed < seq.prompt_len:
                computed = min(seq.num_computed + n, seq.prompt_len) - seq.num_computed
                self._metrics.computed_prompt_tokens += computed
            seq.num_computed += n
            release(seq)
        if self.blocks.enable_prefix_caching:
            for seq in batch.decodes:
                if seq.num_computed % self.blocks.block_size == 0:
                    self.blocks.commit_full_blocks(seq)
            for seq, _ in batch.prefills:
                self.blocks.commit_full_blocks(seq)
        if samplers:
            now = time.perf_counter()
            for seq, token in zip(samplers, sample(logits, samplers), strict=True):
                deltas.append(self._append_token(seq, token, now))
        return deltas

    def _append_token(self, seq: Sequence, token: int, now: float) -> StreamDelta:
        seq.token_ids.append(token)
        m = self._metrics
        m.generation_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
            m.add_ttft(now - seq.arrival)
        seq.last_token_time = now
        p = seq.params
        if token in seq.stop_ids:
            return self._finish(seq, "stop", "", [token])
        text, stopped = seq.text.push(token)
        if stopped:
            return self._finish(seq, "stop", text, [token], flush=False)
        if seq.num_output >= p.max_tokens or len(seq.token_ids) > self.max_model_len:
            return self._finish(seq, "length", text, [token])
        return self._delta(seq, text, [token], None)

    def _finish(
        self, seq: Sequence, reason: str, text: str, tokens: list[int], flush: bool = True
    ) -> StreamDelta:
        if flush:  # emit text held back for stop strings and any undecoded bytes
            text += seq.text.finish()
        self.scheduler.remove(seq)
        seq.image_embeds.clear()
        seq.finish_reason = reason
        del self.seqs[seq.request_id]
        m = self._metrics
        m.requests_finished += 1
        if seq.first_token_time is not None and seq.num_output > 1:
            m.add_tpot((seq.last_token_time - seq.first_token_time) / (seq.num_output - 1))
        return self._delta(seq, text, tokens, reason)

    @staticmethod
    def _delta(seq: Sequence, text: str, tokens: list[int], reason: str | None) -> StreamDelta:
        return StreamDelta(
            request_id=seq.request_id,
            text=text,
            token_ids=tokens,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_output,
            cached_prompt_tokens=max(seq.cached_prompt_tokens, 0),
        )

    # -- offline API ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        images: Seq[list[ImageSpan] | None] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together (continuous batching) and return one output per prompt;
        ``images``: None, or each prompt's pictures (None for a text prompt)."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError("give images for every prompt (None for a text prompt)")
        # validate everything first so a bad prompt leaves nothing half-submitted
        encoded = [self.encode(p) for p in prompts]
        for ids_, sp, im in zip(encoded, params, images, strict=True):
            self.check_prompt(ids_)
            self.check_images(ids_, im)
            try:
                sp.validate()
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        ids = [
            self.add_request(p, sp, images=im)
            for p, sp, im in zip(encoded, params, images, strict=True)
        ]
        seqs = {rid: self.seqs[rid] for rid in ids}
        texts = {rid: [] for rid in ids}
        while self.has_unfinished():
            for d in self.step():
                if d.request_id in texts:
                    texts[d.request_id].append(d.text)
        return [
            RequestOutput(
                request_id=rid,
                prompt_token_ids=seqs[rid].token_ids[: seqs[rid].prompt_len],
                token_ids=seqs[rid].output_ids,
                text="".join(texts[rid]),
                finish_reason=seqs[rid].finish_reason or "abort",
                cached_prompt_tokens=max(seqs[rid].cached_prompt_tokens, 0),
            )
            for rid in ids
        ]

    # -- metrics ----------------------------------------------------------------------------
    @property
    def metrics(self) -> MetricsSnapshot:
        m = self._metrics
        s = self.scheduler
        ttft, tpot = m.samples()
        return MetricsSnapshot(
            running=len(s.running),
            waiting=len(s.waiting),
            waiting_by_priority={p.label: n for p, n in s.waiting.requests.items()},
            waiting_tokens_by_priority={p.label: n for p, n in s.waiting.tokens.items()},
            shed_by_priority=m.shed_counts(),
            cache_blocks_used=self.blocks.num_used_blocks,
            cache_blocks_total=self.blocks.num_blocks,
            prefix_cache_hit_rate=self.blocks.hit_rate,
            prompt_tokens=m.prompt_tokens,
            cached_prompt_tokens=self.blocks.hit_tokens,
            computed_prompt_tokens=m.computed_prompt_tokens,
            generation_tokens=m.generation_tokens,
            recomputed_tokens=s.recomputed_tokens,
            num_preemptions=s.num_preemptions,
            requests_finished=m.requests_finished,
            ttft_s=ttft,
            tpot_s=tpot,
        )

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks
