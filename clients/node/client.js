'use strict';
// A small Node.js client for a `minisgl serve` server.
//
//   const { MinisglClient } = require('./client');
//   const client = new MinisglClient('127.0.0.1:50051');
//   const out = await client.generate({
//     prompt: { text: 'Hello' },
//     sampling: { temperature: 0 },
//     stopping: { max_new_tokens: 16 },
//   });
//   for await (const msg of client.stream({ prompt: { text: 'Hello' } })) process.stdout.write(msg.text);
//   client.close();
//
// Requests and responses are plain objects with the proto's field names (snake_case) as in
// proto/minisgl/v1/*.proto, which are loaded at run time (no code generation). 64-bit integers
// (seed, kv_cache_tokens, retractions) are strings; enums are their names
// ("FINISH_REASON_STOP"). Errors are grpc-js ServiceErrors: `code` (a grpc.status number),
// `details`, `metadata`; statusName(err.code) gives "INVALID_ARGUMENT" and so on.
//
// TLS and API keys (a server started with --tls-cert, --tls-client-ca, --api-key):
//   new MinisglClient('localhost:50051', { tlsCa: 'ca.pem' })  // TLS, our own CA
//   new MinisglClient('localhost:50051', { tls: true })        // TLS, the system CAs
//   new MinisglClient('localhost:50051', { tlsCa: 'ca.pem', clientCert: 'c.pem', clientKey: 'c.key' })
//   new MinisglClient('127.0.0.1:50051', { apiKey: 'KEY' })    // `authorization: Bearer KEY`

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILES = ['minisgl/v1/generation.proto', 'minisgl/v1/model.proto'];
const LOADER_OPTIONS = {
  keepCase: true, // field names as in the .proto files
  longs: String,
  enums: String,
  defaults: true, // unset response fields come back as their defaults ([] , 0, '')
  oneofs: true, // a oneof's name tells which member is set, e.g. finish.matched
  includeDirs: [PROTO_ROOT],
};

let cachedPackage = null;

/** The loaded minisgl.v1 package (service constructors and message types). */
function loadProto() {
  if (cachedPackage === null) {
    const definition = protoLoader.loadSync(PROTO_FILES, LOADER_OPTIONS);
    cachedPackage = grpc.loadPackageDefinition(definition).minisgl.v1;
  }
  return cachedPackage;
}

/** The name of a grpc status code: 3 -> "INVALID_ARGUMENT". */
function statusName(code) {
  for (const [name, value] of Object.entries(grpc.status)) {
    if (value === code) return name;
  }
  return String(code);
}

/** A PEM file's contents: a path is read, a Buffer is taken as is, undefined stays null. */
function pem(value) {
  if (value === undefined || value === null) return null;
  return Buffer.isBuffer(value) ? value : fs.readFileSync(value);
}

/**
 * Channel credentials from the options: plaintext, or TLS when `tls`, `tlsCa` or `clientCert`
 * is set (the server verified with `tlsCa`, else the system CAs; `clientCert` and `clientKey`
 * for a server that requires client certificates, mTLS).
 */
function channelCredentials(options) {
  if (options.credentials) return options.credentials;
  const { tls, tlsCa, clientCert, clientKey } = options;
  if ((clientCert == null) !== (clientKey == null)) {
    throw new Error('clientCert and clientKey: give both or neither');
  }
  if (!tls && tlsCa == null && clientCert == null) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(pem(tlsCa), pem(clientKey), pem(clientCert));
}

class MinisglClient {
  /**
   * @param {string} address "host:port"
   * @param {{timeoutMs?: number, credentials?: grpc.ChannelCredentials, channelOptions?: object,
   *   tls?: boolean, tlsCa?: string|Buffer, clientCert?: string|Buffer, clientKey?: string|Buffer,
   *   apiKey?: string}} [options]
   *   timeoutMs: the default deadline of each call (none if unset); tls, tlsCa, clientCert,
   *   clientKey: see channelCredentials (paths or PEM Buffers); apiKey: sent on every call as
   *   `authorization: Bearer <apiKey>`.
   */
  constructor(address = '127.0.0.1:50051', options = {}) {
    const v1 = loadProto();
    const credentials = channelCredentials(options);
    const channelOptions = options.channelOptions || {};
    this.timeoutMs = options.timeoutMs;
    this._metadata = new grpc.Metadata();
    if (options.apiKey) this._metadata.set('authorization', `Bearer ${options.apiKey}`);
    this._generation = new v1.GenerationService(address, credentials, channelOptions);
    // The second stub shares the first one's channel.
    this._model = new v1.ModelService(address, credentials, {
      ...channelOptions,
      channelOverride: this._generation.getChannel(),
    });
  }

  _callOptions(timeoutMs) {
    const ms = timeoutMs !== undefined ? timeoutMs : this.timeoutMs;
    return ms === undefined || ms === null ? {} : { deadline: Date.now() + ms };
  }

  _unary(stub, method, request, timeoutMs) {
    return new Promise((resolve, reject) => {
      stub[method](request, this._metadata, this._callOptions(timeoutMs), (err, response) => {
        if (err) reject(err);
        else resolve(response);
      });
    });
  }

  /** Generate: resolves to the whole GenerateResponse once the request has finished. */
  generate(request, { timeoutMs } = {}) {
    return this._unary(this._generation, 'Generate', request, timeoutMs);
  }

  /**
   * StreamGenerate: an async iterator of StreamGenerateResponse messages (each carries what is
   * new since the previous one). Leaving the loop early (break, throw) cancels the request;
   * a failed call throws its ServiceError from the loop.
   */
  async *stream(request, { timeoutMs } = {}) {
    const call = this._generation.StreamGenerate(
      request,
      this._metadata,
      this._callOptions(timeoutMs),
    );
    try {
      for await (const message of call) yield message;
    } finally {
      call.cancel(); // a no-op once the stream has ended
    }
  }

  /** GetModelInfo: the served model and the engine's options. */
  modelInfo({ timeoutMs } = {}) {
    return this._unary(this._model, 'GetModelInfo', {}, timeoutMs);
  }

  /** GetLoad: queue length, running requests and KV cache use. */
  load({ timeoutMs } = {}) {
    return this._unary(this._model, 'GetLoad', {}, timeoutMs);
  }

  /** Tokenize a prompt ({text} or {chat: {messages}}): resolves to the token ids. */
  async tokenize(prompt, { timeoutMs } = {}) {
    return (await this._unary(this._model, 'Tokenize', { prompt }, timeoutMs)).token_ids;
  }

  /** Detokenize token ids: resolves to the text. */
  async detokenize(tokenIds, { skipSpecialTokens = true, timeoutMs } = {}) {
    const request = { token_ids: tokenIds, skip_special_tokens: skipSpecialTokens };
    return (await this._unary(this._model, 'Detokenize', request, timeoutMs)).text;
  }

  /** Close the channel; calls in flight are cancelled. */
  close() {
    this._generation.close();
  }
}

module.exports = { MinisglClient, loadProto, statusName, grpc, PROTO_ROOT };
