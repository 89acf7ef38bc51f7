"""An OpenAI-compatible HTTP gateway in front of a `minisgl serve` gRPC server.

    minisgl serve --port 50051 &
    minisgl gateway --target 127.0.0.1:50051 --port 8000
    curl 127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream` as server-sent
events), GET /v1/models, GET /health. Each HTTP request becomes one Generate or StreamGenerate
call per choice (`n`, at most MAX_N; the server's radix cache computes the shared prompt once;
with a `seed`, choice i samples with seed + i). A client that disconnects, streaming or not,
cancels its calls, which aborts the requests in the server and frees their KV cache.

Errors: every error response, whatever its origin (a bad field, a gRPC status, an unknown
route, a wrong method, a body over MAX_BODY_BYTES, malformed JSON, a bug), has an OpenAI
body `{"error": {"message", "type", "param", "code"}}` (`code`: the HTTP status). `param` is
the OpenAI name of the offending field (`temperature`, `max_tokens`, `messages`), also for the
server's INVALID_ARGUMENT errors, whose gRPC field paths (`sampling.temperature`) are mapped
back. gRPC statuses map as `errors._STATUS` says: INVALID_ARGUMENT and OUT_OF_RANGE 400,
UNAUTHENTICATED 401 (the server refused the gateway's own key: the message says so),
PERMISSION_DENIED 403, NOT_FOUND 404, ALREADY_EXISTS 409 (an `x-request-id` already in
flight), RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500.
An error after a stream's headers is sent as a last `data: {"error": ...}` event before
`data: [DONE]`.

TLS and keys: `--tls-cert` / `--tls-key` serve HTTPS; with `--api-key` / `--api-key-file`,
every route but GET /health needs `Authorization: Bearer <key>` (what the openai client sends
for `api_key=`): a missing, malformed or wrong key is a 401 with an OpenAI body, logged
without the key. Towards the server the gateway is a gRPC client of its own: `--target-tls`
or `--target-tls-ca` (TLS), `--target-tls-cert` / `--target-tls-key` (a server with mTLS),
and `--target-api-key` / `--target-api-key-file`, the one key it sends on every call; the
clients' own keys are never forwarded.

Supported request fields (any other field is a 400 naming it; a field of the wrong type too):
- both routes: model (must name the served model when given), n, stream, stream_options
  (include_usage; include_obfuscation is accepted and has no effect), max_tokens /
  max_completion_tokens, temperature, top_p, seed, stop, presence_penalty, frequency_penalty,
  logprobs, plus vLLM's extensions top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
  stop_token_ids, skip_special_tokens, include_stop_str_in_output;
- completions: prompt (one string, or one list of token ids); `logprobs` = N alternatives;
- chat: messages (role and content: a string, null, or a list of text parts), top_logprobs
  (with `logprobs: true`); each token's text is as decoded on its own;
- structured output: response_format {"type": "json_object"} and {"type": "json_schema",
  "json_schema": {...}}; on chat, tools with tool_choice "required" or a named function (the
  call's arguments constrained to its parameter schema, returned as tool_calls).

Accepted and ignored because they do not change the output (`requests._IGNORED`): user,
metadata, store, prompt_cache_key, safety_identifier, service_tier "auto" / "default".

Not supported, a 400 "not supported" naming the field unless it has the value that asks for
nothing (`requests._NOT_SUPPORTED`): logit_bias (but {}), tools on completions (but []),
tool_choice other than the above (but "none"), functions (but []), function_call (but
"none"), parallel_tool_calls, audio, modalities (but ["text"]), prediction, reasoning_effort,
verbosity, web_search_options, service_tier other than "auto" / "default", echo (but false),
suffix (but ""), best_of other than n, stream_options.continuous_usage_stats; in chat
messages, name, tool_calls, tool_call_id, function_call and audio (but null), and content parts
other than text.

Modules, each importing only those above it: `errors` (error bodies, the status table, field
paths mapped back), `requests` (bodies -> the calls' fields), `upstream` (the gRPC client),
`responses` (reply bodies and stream chunks), `stream` (server-sent events), `app` (the
aiohttp app: middleware, handlers, `build_app`), `serve` (`listen`, `run_gateway`).

The gateway imports neither torch nor the engine; it needs aiohttp (`pip install minisgl[http]`),
which only `app` and `stream` import, so that `run_gateway` can say so when it is missing.
"""

from minisgl.gateway.requests import MAX_BODY_BYTES, MAX_N, MAX_TOP_LOGPROBS
from minisgl.gateway.serve import listen, run_gateway
from minisgl.gateway.upstream import Credentials

__all__ = ["MAX_BODY_BYTES", "MAX_N", "MAX_TOP_LOGPROBS", "Credentials", "listen", "run_gateway"]
