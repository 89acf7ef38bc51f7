"""The `minisgl` command: serve over gRPC, an OpenAI HTTP gateway, generate offline, chat."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Any

from minisgl.config import EngineConfig
from minisgl.sampling_params import SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags for every EngineConfig field; help text comes from the field docs below."""
    g = parser.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="HF checkpoint directory or preset name "
        "(`minisgl presets`); default: the built-in demo model (random weights)",
    )
    g.add_argument(
        "--dummy-weights",
        action="store_true",
        help="random weights from the config alone (benchmarks, presets)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: the config's dtype on GPU, float32 on CPU",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "torch", "triton", "flashinfer", "fa3"],
        help="auto: our Triton kernels on CUDA, torch on CPU. flashinfer / fa3 need those "
        "libraries installed, are used only when named and have not been run on a GPU yet",
    )
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV-cache page")
    g.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pool size in pages (default: sized from memory)",
    )
    g.add_argument(
        "--mem-fraction",
        type=float,
        default=0.85,
        help="fraction of GPU memory for weights + KV cache",
    )
    g.add_argument("--cpu-kv-gib", type=float, default=2.0, help="KV cache budget on CPU, GiB")
    g.add_argument(
        "--max-running-requests", type=int, default=256, help="most requests in the running batch"
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length; default the model's max_position_embeddings",
    )
    g.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=8192,
        help="most new tokens per forward step (long prompts are chunked)",
    )
    g.add_argument(
        "--disable-cuda-graph",
        action="store_true",
        help="run decode steps eagerly instead of replaying CUDA graphs (GPU only)",
    )
    g.add_argument(
        "--cuda-graph-max-bs",
        type=int,
        default=256,
        help="largest decode batch put in a CUDA graph",
    )
    g.add_argument(
        "--overlap-schedule",
        default="auto",
        choices=["auto", "on", "off"],
        help="prepare and launch step N+1 on the CPU while the GPU runs step N "
        "(auto: on with CUDA, off on CPU where nothing runs asynchronously)",
    )
    g.add_argument(
        "--disable-radix-cache",
        action="store_true",
        help="recompute every prompt instead of reusing cached prefixes",
    )
    g.add_argument(
        "--schedule-policy",
        default="fcfs",
        choices=["fcfs", "lpm"],
        help="fcfs: first come first served; lpm: longest cached prefix first",
    )
    g.add_argument(
        "--tp-size",
        type=int,
        default=1,
        help="tensor-parallel ranks: processes that each hold 1/N of the weights and KV heads "
        "(one GPU each, cuda:0..N-1; gloo on CPU)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for --dummy-weights")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keyword options (without `model`) from parsed flags."""
    names = {f.name for f in fields(EngineConfig)} - {"model", "progress"}
    opts = {name: getattr(args, name) for name in names}
    opts["progress"] = not args.no_progress
    return opts


def add_sampling_args(
    parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """Sampling flags shared by `generate` and `chat` (with their own defaults)."""
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help="most tokens to generate"
    )
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    parser.add_argument("--sampling-seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from the flags of add_sampling_args."""
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
        stop=args.stop or [],
    )


def _generate(args: argparse.Namespace) -> int:
    from minisgl.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    params = sampling_params(args)
    prompts: list[Any] = (
        [[{"role": "user", "content": p}] for p in args.prompts] if args.chat else args.prompts
    )
    for prompt, out in zip(args.prompts, llm.generate(prompts, params), strict=True):
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": out.text,
                        "token_ids": out.token_ids,
                        "finish_reason": out.finish_reason,
                    }
                )
            )
        else:
            print(f"{prompt}{out.text}\n  [{len(out.token_ids)} tokens, {out.finish_reason}]")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from minisgl.llm import LLM

    llm = LLM(args.model, **engine_options(args))
    if llm.tokenizer is None:
        print(f"{llm.model_name} has no tokenizer: nothing to chat with", file=sys.stderr)
        return 2
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"Chatting with {llm.model_name}. /reset starts over, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        reply: list[str] = []
        try:
            for piece in llm.stream(messages, params):
                print(piece, end="", flush=True)
                reply.append(piece)
        except ValueError as e:  # e.g. the conversation outgrew the context length
            print(f"error: {e}; try /reset", file=sys.stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", end="")
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def _serve(args: argparse.Namespace) -> int:
    from minisgl.server.config import ServerConfig
    from minisgl.server.launcher import serve

    cfg = EngineConfig.from_options(args.model, engine_options(args))
    scfg = ServerConfig(
        host=args.host,
        port=args.port,
        max_queued_requests=args.max_queued_requests,
        shutdown_grace_s=args.shutdown_grace,
        max_message_bytes=args.max_message_mib * 2**20,
        max_connection_age_s=args.max_connection_age,
        log_level=args.log_level,
    )
    return serve(cfg, scfg)


def _gateway(args: argparse.Namespace) -> int:
    from minisgl.gateway import run_gateway

    return run_gateway(args.target, args.host, args.port)


def _presets(_: argparse.Namespace) -> int:
    from minisgl.models.source import preset_names

    print("\n".join(preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    parser = argparse.ArgumentParser(prog="minisgl", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", parents=[common], help="generate text for prompts with the offline engine"
    )
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    add_sampling_args(gen, max_new_tokens=32, temperature=0.0, top_p=1.0)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    chat = sub.add_parser(
        "chat", parents=[common], help="chat with the model in the terminal (offline engine)"
    )
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat, max_new_tokens=256, temperature=0.7, top_p=0.95)
    add_engine_args(chat)
    chat.set_defaults(func=_chat)
    srv = sub.add_parser(
        "serve", parents=[common], help="serve the model over gRPC (Generate, StreamGenerate, ...)"
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=50051, help="port to listen on")
    srv.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests waiting for their first token before RESOURCE_EXHAUSTED",
    )
    srv.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGTERM",
    )
    srv.add_argument(
        "--max-message-mib", type=int, default=64, help="largest gRPC message accepted or sent, MiB"
    )
    srv.add_argument(
        "--max-connection-age",
        type=float,
        default=1800.0,
        help="seconds after which connections are closed so load balancers rebalance",
    )
    add_engine_args(srv)
    srv.set_defaults(func=_serve)
    gw = sub.add_parser(
        "gateway",
        parents=[common],
        help="OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) for a server",
    )
    gw.add_argument("--target", default="127.0.0.1:50051", help="the gRPC server, host:port")
    gw.add_argument("--host", default="127.0.0.1", help="address to listen on")
    gw.add_argument("--port", type=int, default=8000, help="port to listen on")
    gw.set_defaults(func=_gateway)
    pre = sub.add_parser(
        "presets", parents=[common], help="list the model configs usable with --dummy-weights"
    )
    pre.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from minisgl.models.errors import ModelLoadError

    try:
        result: int = args.func(args)
    except (ModelLoadError, ValueError) as e:
        print(f"minisgl: error: {e}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
