"""The ``kvrelay`` command: generate (one process), serve and demo (a cluster), and the client
commands (complete, chat, status, drain) that talk to a served cluster over gRPC."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import yaml


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvrelay.cluster.runtime.config import sparse_settings
    from kvrelay.workers.engine.config import EngineConfig
    from kvrelay.workers.llm import LLM
    from kvrelay.workers.model.sparse_attention import SparseConfig
    from kvrelay.workers.types import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        sparse = SparseConfig(**sparse_settings(args))
        llm = LLM(args.model, engine_config=EngineConfig(sparse=sparse), threads=args.threads)
        if args.chat:
            prompt_ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        else:
            prompt_ids = llm.tokenizer.encode(args.prompt)
        (out,) = llm.generate([prompt_ids], params)
    except (ValueError, OSError) as exc:
        print(f"kvrelay generate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "text": out.text,
                    "token_ids": list(out.token_ids),
                    "finish_reason": out.finish_reason.value,
                }
            )
        )
    else:
        print(out.text)
    return 0


def _cmd_calibrate_heads(args: argparse.Namespace) -> int:
    from kvrelay.workers.model.calibrate_heads import calibrate

    path = calibrate(
        args.model, args.texts, args.tokens, args.fraction, args.output, args.threads,
        args.retrieval, args.needle_mass,
    )  # fmt: skip
    print(path)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from kvrelay.cluster.runtime.config import config_or_exit
    from kvrelay.cluster.runtime.serve_loop import serve_forever

    cfg = config_or_exit(args, args.parser)
    if args.print_config:
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    return serve_forever(cfg)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvrelay.cluster.cli.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text in this process (no cluster)")
    g.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--json", action="store_true", help="print text, token_ids, finish_reason")
    g.add_argument("--threads", type=int, default=None)
    _add_sampling(g)
    from kvrelay.cluster.runtime.config import add_serve_arguments, add_sparse_arguments

    add_sparse_arguments(g)
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser("calibrate-heads", help="pick streaming heads for sparse attention")
    c.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M)")
    c.add_argument("--texts", type=int, default=4, help="ShareGPT texts to measure on")
    c.add_argument("--tokens", type=int, default=4096, help="tokens per text")
    c.add_argument("--retrieval", type=int, default=4,
                   help="pass-key retrieval prompts to measure on too (0: plain text only)")  # fmt: skip
    c.add_argument("--needle-mass", type=float, default=0.02,
                   help="heads putting this much attention on the pass key stay dense")  # fmt: skip
    c.add_argument("--fraction", type=float, default=0.5, help="share of KV heads made streaming")
    c.add_argument("--output", default=None, help="default: beside the model")
    c.add_argument("--threads", type=int, default=None)
    c.set_defaults(func=_cmd_calibrate_heads)

    s = sub.add_parser("serve", help="start (or join) a Ray cluster and serve the model")
    add_serve_arguments(s)
    s.add_argument("--print-config", action="store_true",
                   help="print the resolved settings (file, then flags) as YAML and exit")
    s.set_defaults(func=_cmd_serve, parser=s)

    d = sub.add_parser("demo", help="local 1P+1D cluster, a mixed chat workload, a latency table")
    add_serve_arguments(d)
    d.add_argument("--requests", type=int, default=12)
    d.set_defaults(func=_cmd_demo, parser=d)

    from kvrelay.cluster.cli.client_commands import add_client_commands
    from kvrelay.cluster.cli.node import add_node_command

    add_client_commands(sub)
    add_node_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
