#!/usr/bin/env node
'use strict';
// A tiny command line over client.js; prints JSON.
//
//   node cli.js --address 127.0.0.1:50051 --prompt "Hello" --max-new-tokens 16 [--stream]
//
// Unary: one line, the GenerateResponse. --stream: one line per StreamGenerateResponse.
// --model-info: the GetModelInfoResponse. A failed call prints
// {"error": {"code": "INVALID_ARGUMENT", "details": "..."}} on stderr and exits 1;
// bad command line arguments exit 2.

const { parseArgs } = require('node:util');
const { MinisglClient, statusName } = require('./client');

const USAGE = `usage: node cli.js [--address HOST:PORT] (--prompt TEXT | --model-info) [options]

  --address HOST:PORT        server address (default 127.0.0.1:50051)
  --prompt TEXT              the prompt text
  --model-info               print GetModelInfo instead of generating
  --stream                   use StreamGenerate: one JSON line per message
  --max-new-tokens N         most tokens to generate
  --min-new-tokens N         fewest tokens before eos / stop tokens may end it
  --temperature X            0 is greedy
  --top-p X, --top-k N, --min-p X, --seed N
  --repetition-penalty X, --presence-penalty X, --frequency-penalty X
  --stop TEXT                a stop string (repeatable)
  --ignore-eos               keep going past end-of-sequence tokens
  --logprobs, --top-logprobs N
  --request-id ID
  --timeout SECONDS          deadline of the call (default 60; 0 = none)
  --tls                      TLS, verifying the server with the system CAs
  --tls-ca FILE              TLS, verifying the server with this CA (PEM)
  --client-cert FILE, --client-key FILE   a client certificate (a server with mTLS)
  --api-key KEY              sent as 'authorization: Bearer KEY' (default: $MINISGL_API_KEY)
  --help`;

const OPTIONS = {
  address: { type: 'string', default: '127.0.0.1:50051' },
  prompt: { type: 'string' },
  'model-info': { type: 'boolean', default: false },
  stream: { type: 'boolean', default: false },
  'max-new-tokens': { type: 'string' },
  'min-new-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  'min-p': { type: 'string' },
  seed: { type: 'string' },
  'repetition-penalty': { type: 'string' },
  'presence-penalty': { type: 'string' },
  'frequency-penalty': { type: 'string' },
  stop: { type: 'string', multiple: true },
  'ignore-eos': { type: 'boolean', default: false },
  logprobs: { type: 'boolean', default: false },
  'top-logprobs': { type: 'string' },
  'request-id': { type: 'string' },
  timeout: { type: 'string', default: '60' },
  tls: { type: 'boolean', default: false },
  'tls-ca': { type: 'string' },
  'client-cert': { type: 'string' },
  'client-key': { type: 'string' },
  'api-key': { type: 'string' },
  help: { type: 'boolean', default: false },
};

class UsageError extends Error {}

function number(values, name, integer) {
  const raw = values[name];
  if (raw === undefined) return undefined;
  const value = Number(raw);
  if (raw.trim() === '' || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new UsageError(`--${name}: not ${integer ? 'an integer' : 'a number'}: ${raw}`);
  }
  return value;
}

/** Only the options given, so that unset ones keep the server's defaults. */
function defined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined));
}

function buildRequest(values) {
  if (values.prompt === undefined) throw new UsageError('--prompt is required');
  const seed = values.seed;
  if (seed !== undefined && !/^\d+$/.test(seed)) {
    throw new UsageError(`--seed: not a non-negative integer: ${seed}`);
  }
  return {
    prompt: { text: values.prompt },
    request_id: values['request-id'] || '',
    sampling: defined({
      temperature: number(values, 'temperature', false),
      top_p: number(values, 'top-p', false),
      top_k: number(values, 'top-k', true),
      min_p: number(values, 'min-p', false),
      repetition_penalty: number(values, 'repetition-penalty', false),
      presence_penalty: number(values, 'presence-penalty', false),
      frequency_penalty: number(values, 'frequency-penalty', false),
      seed, // a string: uint64 does not fit a JS number
    }),
    stopping: defined({
      max_new_tokens: number(values, 'max-new-tokens', true),
      min_new_tokens: number(values, 'min-new-tokens', true),
      stop: values.stop,
      ignore_eos: values['ignore-eos'] || undefined,
    }),
    output: defined({
      logprobs: values.logprobs || undefined,
      top_logprobs: number(values, 'top-logprobs', true),
    }),
  };
}

/** "--temperature -1" -> "--temperature=-1" (parseArgs takes "-1" for an option). */
function joinNegatives(argv) {
  const out = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith('--') ? argv[i].slice(2) : null;
    const option = name === null ? undefined : OPTIONS[name];
    const next = argv[i + 1];
    if (option && option.type === 'string' && next !== undefined && /^-\d/.test(next)) {
      out.push(`${argv[i]}=${next}`);
      i++;
    } else {
      out.push(argv[i]);
    }
  }
  return out;
}

function print(message) {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

function makeClient(values, timeout) {
  return new MinisglClient(values.address, {
    timeoutMs: timeout > 0 ? timeout * 1000 : undefined,
    tls: values.tls,
    tlsCa: values['tls-ca'],
    clientCert: values['client-cert'],
    clientKey: values['client-key'],
    apiKey: values['api-key'] || process.env.MINISGL_API_KEY || undefined,
  });
}

async function main(argv) {
  let values;
  try {
    ({ values } = parseArgs({ args: joinNegatives(argv), options: OPTIONS, strict: true }));
  } catch (err) {
    throw new UsageError(err.message);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const timeout = number(values, 'timeout', false);
  if ((values['client-cert'] === undefined) !== (values['client-key'] === undefined)) {
    throw new UsageError('--client-cert and --client-key: give both or neither');
  }
  let client;
  try {
    client = makeClient(values, timeout);
  } catch (err) {
    throw new UsageError(err.message); // e.g. a PEM file that cannot be read
  }
  try {
    if (values['model-info']) {
      print(await client.modelInfo());
    } else if (values.stream) {
      for await (const message of client.stream(buildRequest(values))) print(message);
    } else {
      print(await client.generate(buildRequest(values)));
    }
  } finally {
    client.close();
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof UsageError) {
      process.stderr.write(`error: ${err.message}\n${USAGE}\n`);
      process.exitCode = 2;
    } else if (err && typeof err.code === 'number' && 'details' in err) {
      const error = { code: statusName(err.code), details: err.details };
      process.stderr.write(`${JSON.stringify({ error })}\n`);
      process.exitCode = 1;
    } else {
      process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
      process.exitCode = 1;
    }
  },
);
