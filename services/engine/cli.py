"""`dsv2 generate`: run the engine offline on one prompt."""

from __future__ import annotations

import argparse
import json
import sys
import time

from services.engine_args import add_engine_arguments, engine_options_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="checkpoint directory (config.json + safetensors)"
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text, tokenized as is")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    add_engine_arguments(parser, default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from services.engine import Engine, SamplingParams

    if args.prompt_ids is not None:
        try:
            prompt: str | list[int] = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            print("error: --prompt-ids must be comma-separated integers", file=sys.stderr)
            return 2
    else:
        prompt = args.prompt
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    try:
        engine = Engine.from_pretrained(args.model, **engine_options_from(args))
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
    except (ValueError, FileNotFoundError) as e:  # InvalidRequest, bad --device/--dtype
        print(f"error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    if args.json:
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "finish_reason": out.finish_reason,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": len(out.token_ids),
                    "seconds": round(elapsed, 3),
                },
                ensure_ascii=False,
            )
        )
    else:
        print(out.text if engine.tokenizer is not None else " ".join(map(str, out.token_ids)))
    return 0
