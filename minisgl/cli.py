"""The `minisgl` command: serve over gRPC, an OpenAI HTTP gateway, generate offline, chat,
health checks."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from dataclasses import fields
from typing import TYPE_CHECKING, Any, NoReturn, get_args, get_type_hints

from minisgl.config import EngineConfig
from minisgl.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minisgl.llm import LLM


class CliParser(argparse.ArgumentParser):
    """A usage error is one line (the error and where the help is), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default: "(default: VALUE)" is appended to each help text
    that does not say its default in words already; a flag without a value is off by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if re.search(r"\bdefault\b", text, re.IGNORECASE) or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 and action.option_strings:  # store_true and the like
            return f"{text} (default: off)"
        if action.default is None and action.option_strings:
            return f"{text} (default: none)"
        return super()._get_help_string(action)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, all taken from the field: its name (`--page-size` for
    page_size, or the `flag` of its metadata), type, default, choices and help text."""
    g = parser.add_argument_group("engine")
    types = get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        kind = types[f.name]
        spec: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if kind is bool:
            assert f.metadata["flag"] or f.default is False, f"{f.name}: a flag that turns it off"
            spec["action"] = "store_false" if f.default else "store_true"
        else:
            (scalar,) = [t for t in get_args(kind) or (kind,) if t is not type(None)]
            if scalar is not str:
                spec["type"] = scalar
            if f.metadata["choices"]:
                spec["choices"] = list(f.metadata["choices"])
        g.add_argument(f.metadata["flag"] or "--" + f.name.replace("_", "-"), **spec)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig keyword options (without `model`) from parsed flags."""
    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if f.name != "model"}


def add_sampling_args(
    parser: argparse.ArgumentParser,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_new_tokens_help: str = "most tokens to generate (as in the API)",
) -> None:
    """Sampling flags shared by `generate` and `chat` (with their own defaults)."""
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help
    )
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=-1, help="-1 = off")
    parser.add_argument(
        "--sampling-seed", type=int, default=None, help="seed for sampling (default: a fresh one)"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    parser.add_argument("--stop", action="append", help="stop string (repeatable; default: none)")


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


def check_engine(args: argparse.Namespace) -> None:
    """The device and attention backend can run here (one clear error, before any loading)."""
    from minisgl.engine.preflight import check_device_and_backend

    check_device_and_backend(EngineConfig.from_options(args.model, engine_options(args)))


def _generate(args: argparse.Namespace) -> int:
    from minisgl.llm import LLM

    check_engine(args)
    llm = LLM(args.model, **engine_options(args))
    params = sampling_params(args)
    prompts: list[Any] = (
        [[{"role": "user", "content": p}] for p in args.prompts] if args.chat else args.prompts
    )
    for prompt, out in zip(args.prompts, llm.generate(prompts, params), strict=True):
        summary = f"[{len(out.token_ids)} tokens, {out.finish_reason}]"
        if args.json:
            record: dict[str, Any] = {
                "prompt": prompt,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
            }
            if out.text is None:
                record["text_unavailable"] = llm.text_unavailable
            print(json.dumps(record))
        elif out.text is None:  # never an empty string in place of the answer
            print(f"{prompt}\n  [text unavailable: {llm.text_unavailable}]")
            print(f"  token ids: {_ids(out.token_ids)}\n  {summary}")
        else:
            print(f"{prompt}{out.text}\n  {summary}")
    return 0


def _ids(token_ids: list[int]) -> str:
    return " ".join(map(str, token_ids)) or "(none)"


def _reply_as_ids(llm: LLM, messages: list[dict[str, str]], params: SamplingParams) -> None:
    """`minisgl chat` for a model whose output has no text: the reply's token ids."""
    try:
        out = llm.generate(messages, params)[0]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return
    n = len(out.token_ids)
    print(f"[text unavailable] token ids: {_ids(out.token_ids)}  [{n} tokens, {out.finish_reason}]")


def _chat(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from minisgl.llm import LLM

    check_engine(args)
    llm = LLM(args.model, **engine_options(args))
    if llm.tokenizer is None:
        print(f"{llm.model_name} has no tokenizer: nothing to chat with", file=sys.stderr)
        return 2
    free = sampling_params(args)
    params = replace(free, json_object=True) if args.json else free
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    commands = (
        "/reset starts over, /json constrains the replies to a JSON object (/json FILE: to the "
        "JSON schema in FILE, /json off: free text again), /help lists these, /exit (or "
        "Ctrl-D) quits."
    )

    def constrained(arg: str) -> SamplingParams | None:
        """The params of `/json ARG`; None (the error printed) for a bad schema file."""
        if arg == "off":
            return free
        if not arg:
            return replace(free, json_object=True)
        try:
            with open(os.path.expanduser(arg), encoding="utf-8") as f:
                text = f.read()
            json.loads(text)
        except OSError as e:
            print(f"error: /json: cannot read {arg}: {e.strerror or e}", file=sys.stderr)
            return None
        except ValueError as e:  # UnicodeDecodeError and json.JSONDecodeError alike
            print(f"error: /json: {arg} is not valid JSON: {e}", file=sys.stderr)
            return None
        schema = replace(free, json_schema=text)
        try:  # the schema's shape, then whether it compiles (cached for the replies)
            schema.validate(llm.vocab_size)
            llm.scheduler.grammars.compile(schema)
        except ValueError as e:
            print(f"error: /json: {arg}: {e}", file=sys.stderr)
            return None
        return schema

    print(f"Chatting with {llm.model_name}. {commands}")
    if args.json:
        print("(replies are JSON objects)")
    if llm.text_unavailable is not None:
        print(
            f"Text is unavailable: {llm.text_unavailable}. Replies are shown as token ids, and "
            "each message is answered on its own (a reply without text cannot be put back into "
            "the conversation)."
        )
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
        if line == "/help":
            print(commands)
            continue
        if line == "/json" or line.startswith("/json "):
            arg = line.removeprefix("/json").strip()
            chosen = constrained(arg)
            if chosen is None:
                continue  # the error is printed; the replies stay as they were
            params = chosen
            if params is free:
                print("(free text)")
            else:
                print(
                    f"(replies follow the JSON schema in {arg})"
                    if arg
                    else "(replies are JSON objects)"
                )
            continue
        if not line:
            continue
        if llm.text_unavailable is not None:
            _reply_as_ids(llm, [*system, {"role": "user", "content": line}], params)
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
        else:
            if params.constraint is not None:
                try:
                    json.loads("".join(reply))
                except ValueError:  # a constrained reply ends complete unless the limit cut it
                    print(
                        f"\n(cut at --max-new-tokens {params.max_new_tokens}: incomplete)", end=""
                    )
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """Flags for each RequestLimits field (bounds on one request's input)."""
    from minisgl.server.config import RequestLimits

    d = RequestLimits()
    g = parser.add_argument_group("request limits (beyond them: INVALID_ARGUMENT naming the field)")
    g.add_argument(
        "--max-stop-strings",
        type=int,
        default=d.max_stop_strings,
        help="most stop strings in a request",
    )
    g.add_argument(
        "--max-stop-string-chars",
        type=int,
        default=d.max_stop_string_chars,
        help="most characters in one stop string",
    )
    g.add_argument(
        "--max-chat-messages",
        type=int,
        default=d.max_chat_messages,
        help="most messages in a chat prompt",
    )
    g.add_argument(
        "--max-role-chars",
        type=int,
        default=d.max_role_chars,
        help="most characters in a chat role",
    )
    g.add_argument(
        "--max-prompt-chars",
        type=int,
        default=d.max_prompt_chars,
        help="most characters in a text prompt or in a chat's contents, before tokenization "
        "(default: 0, meaning 32 per token of the context length)",
    )


def add_security_args(parser: argparse.ArgumentParser, what: str, client_ca: bool) -> None:
    """TLS and API-key flags of `serve` (what: "the gRPC port") and `gateway` (its HTTP port)."""
    g = parser.add_argument_group(f"TLS and API keys of {what}")
    g.add_argument("--tls-cert", metavar="PEM", help="certificate chain: serve TLS")
    g.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    if client_ca:
        g.add_argument(
            "--tls-client-ca",
            metavar="PEM",
            help="CA bundle: clients must present a certificate it signed (mTLS)",
        )
    g.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="a key that calls must send as 'authorization: Bearer KEY' (repeatable; health "
        "needs none); visible in the process list: prefer --api-key-file (default: none)",
    )
    g.add_argument(
        "--api-key-file",
        action="append",
        metavar="FILE",
        help="a file of keys, one per line; blank lines and # comments are ignored "
        "(repeatable; default: none)",
    )


def add_metrics_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"serve Prometheus metrics of {what} over HTTP at /metrics on this port, on "
        "--host (default: off)",
    )


def _serve(args: argparse.Namespace) -> int:
    from minisgl.server.config import RequestLimits, ServerConfig
    from minisgl.server.launcher import serve
    from minisgl.server.security import load_tls, read_api_keys

    cfg = EngineConfig.from_options(args.model, engine_options(args))
    scfg = ServerConfig(
        host=args.host,
        port=args.port,
        max_queued_requests=args.max_queued_requests,
        shutdown_grace_s=args.shutdown_grace,
        exit_grace_s=args.exit_grace,
        max_message_bytes=args.max_message_mib * 2**20,
        max_connection_age_s=args.max_connection_age,
        log_level=args.log_level,
        log_format=args.log_format,
        log_stats_interval_s=args.log_stats_interval,
        metrics_port=args.metrics_port,
        limits=RequestLimits(
            max_stop_strings=args.max_stop_strings,
            max_stop_string_chars=args.max_stop_string_chars,
            max_chat_messages=args.max_chat_messages,
            max_role_chars=args.max_role_chars,
            max_prompt_chars=args.max_prompt_chars,
        ),
        tls=load_tls(args.tls_cert, args.tls_key, args.tls_client_ca),
        api_keys=read_api_keys(args.api_key, args.api_key_file),
    )
    return serve(cfg, scfg)


def _gateway(args: argparse.Namespace) -> int:
    from minisgl.gateway import Credentials, run_gateway
    from minisgl.server.config import check_port
    from minisgl.server.security import TlsFiles, load_tls, read_api_keys

    check_port(args.port)
    if args.metrics_port is not None:
        check_port(args.metrics_port, "--metrics-port")
    load_tls(args.tls_cert, args.tls_key, None)  # checked here; aiohttp's ssl reads the paths
    target_flags = ("--target-tls-cert", "--target-tls-key", "--target-tls-ca")
    target_tls = load_tls(
        args.target_tls_cert, args.target_tls_key, args.target_tls_ca, target_flags, False
    )
    target_keys = read_api_keys(
        args.target_api_key and [args.target_api_key],
        args.target_api_key_file and [args.target_api_key_file],
        "--target-api-key",
        "--target-api-key-file",
    )
    if len(target_keys) > 1:
        raise ValueError("--target-api-key / --target-api-key-file: give one key, not several")
    upstream = Credentials(
        tls=target_tls if target_tls is not None else TlsFiles() if args.target_tls else None,
        api_key=target_keys[0] if target_keys else None,
    )
    return run_gateway(
        args.target,
        args.host,
        args.port,
        upstream=upstream,
        https=(args.tls_cert, args.tls_key) if args.tls_cert else None,
        api_keys=read_api_keys(args.api_key, args.api_key_file),
        metrics_port=args.metrics_port,
    )


def _health(args: argparse.Namespace) -> int:
    from minisgl.server.health_check import run

    return run(args)


def _presets(_: argparse.Namespace) -> int:
    from minisgl.models.source import preset_names

    print("\n".join(preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = CliParser(add_help=False)
    common.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="how much to log",
    )
    parser = CliParser(prog="minisgl", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", parents=[common], help="generate text for prompts with the offline engine"
    )
    gen.add_argument("prompts", nargs="+", help="prompt texts")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    api_max_new_tokens = SamplingParams().max_new_tokens
    add_sampling_args(gen, api_max_new_tokens, temperature=0.0, top_p=1.0)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    chat = sub.add_parser(
        "chat", parents=[common], help="chat with the model in the terminal (offline engine)"
    )
    chat.add_argument("--system", default=None, help="system prompt (default: none)")
    chat.add_argument(
        "--json", action="store_true", help="start with the replies constrained to a JSON object"
    )
    add_sampling_args(
        chat,
        max_new_tokens=256,
        temperature=0.7,
        top_p=0.95,
        max_new_tokens_help=f"most tokens per reply (the API's is {api_max_new_tokens}: chat "
        "answers are often longer, and one cut short must be asked for again)",
    )
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
        "--exit-grace",
        type=float,
        default=5.0,
        help="seconds the server still answers (NOT_SERVING, UNAVAILABLE) after a worker "
        "process died, before it exits with code 1 so that a supervisor restarts it "
        "(default: %(default)s)",
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
    add_security_args(srv, "the gRPC port", client_ca=True)
    add_metrics_args(srv, "gRPC calls and the engine")
    srv.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines as text, or as JSON objects, one per line",
    )
    srv.add_argument(
        "--log-stats-interval",
        type=float,
        default=10.0,
        help="seconds between the throughput lines logged while busy (0: none)",
    )
    add_limit_args(srv)
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
    add_metrics_args(gw, "HTTP requests")
    add_security_args(gw, "the HTTP port (a missing or wrong key: 401)", client_ca=False)
    up = gw.add_argument_group("TLS and API key towards --target")
    up.add_argument(
        "--target-tls", action="store_true", help="call the server over TLS (system CAs)"
    )
    up.add_argument(
        "--target-tls-ca", metavar="PEM", help="CA of the server's certificate (implies TLS)"
    )
    up.add_argument(
        "--target-tls-cert", metavar="PEM", help="client certificate, for a server with mTLS"
    )
    up.add_argument("--target-tls-key", metavar="PEM", help="private key of --target-tls-cert")
    up.add_argument(
        "--target-api-key",
        metavar="KEY",
        help="the key the gateway sends to the server (the clients' keys are never forwarded)",
    )
    up.add_argument("--target-api-key-file", metavar="FILE", help="a file holding --target-api-key")
    gw.set_defaults(func=_gateway)
    from minisgl.server.health_check import add_health_args

    health = sub.add_parser(
        "health",
        parents=[common],
        help="exit 0 if a server's grpc.health.v1 says SERVING, else 1 (container health "
        "checks, Kubernetes exec probes)",
    )
    add_health_args(health, os.environ)
    health.set_defaults(func=_health)
    pre = sub.add_parser(
        "presets", parents=[common], help="list the model configs usable with --dummy-weights"
    )
    pre.set_defaults(func=_presets)
    for command in (parser, *sub.choices.values()):
        command.formatter_class = HelpFormatter  # every --help shows each option's default
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
    except KeyboardInterrupt:  # Ctrl-C before a command installed its own handling
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
