'use strict';
// A small Node client for mlxtune's PEFT and trainer services.
//
// The protos are loaded at run time from the repository's protos/ folder (the
// single source of truth), so there is no generated code to keep in sync.

const crypto = require('node:crypto');
const { once } = require('node:events');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILES = [
  'mlxtune/peft/v1/peft_service.proto',
  'mlxtune/trainer/v1/trainer_service.proto',
];

const LOAD_OPTIONS = {
  // Field names as the protos and the docs spell them (max_steps, not maxSteps).
  keepCase: true,
  // int64 fields (steps, parameter counts, bytes) arrive as decimal strings:
  // exact beyond 2^53. Requests accept numbers or strings.
  longs: String,
  // Enums by name ("JOB_STATE_SUCCEEDED"): readable, and stable if numbers grow.
  enums: String,
  // Unset scalars read as their zero value. proto3 `optional` fields are not
  // defaulted: they stay undefined when the server did not set them.
  defaults: true,
  // Each oneof gets a virtual field naming the member that is set
  // (event.kind === 'step'), so callers can switch on it.
  oneofs: true,
  includeDirs: [PROTO_ROOT],
};

// Every create RPC carries a request_id, so a retry of the same message can
// never create a second checkpoint, dataset or job; reads are idempotent.
// That makes retrying UNAVAILABLE (a restarting server, a mesh hiccup) safe.
const SERVICE_CONFIG = {
  methodConfig: [{
    name: [{ service: 'mlxtune.peft.v1.PeftService' },
      { service: 'mlxtune.trainer.v1.TrainerService' }],
    retryPolicy: {
      maxAttempts: 4,
      initialBackoff: '0.2s',
      maxBackoff: '2s',
      backoffMultiplier: 2,
      retryableStatusCodes: ['UNAVAILABLE'],
    },
  }],
};

const UPLOAD_CHUNK_BYTES = 64 * 1024;

function loadApi() {
  const definition = protoLoader.loadSync(PROTO_FILES, LOAD_OPTIONS);
  const api = grpc.loadPackageDefinition(definition).mlxtune;
  return { PeftService: api.peft.v1.PeftService, TrainerService: api.trainer.v1.TrainerService };
}

/** A fresh id for one logical create; reuse it when retrying that create by hand. */
function newRequestId() {
  return crypto.randomUUID();
}

/** Calls a unary method and resolves with its response. */
function unary(stub, method, request) {
  return new Promise((resolve, reject) => {
    stub[method](request, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/** Iterates over a server stream's messages, yielding each one's event. */
async function* events(call) {
  try {
    for await (const response of call) {
      yield response.event;
    }
  } finally {
    call.cancel(); // a caller that stops early closes the stream; no-op once it ended
  }
}

class MlxtuneClient {
  /**
   * @param {string} peftAddress host:port of the PEFT service
   * @param {string} trainerAddress host:port of the trainer service
   * @param {grpc.ChannelCredentials} [credentials] insecure (plaintext) by default
   */
  constructor(peftAddress, trainerAddress, credentials = grpc.credentials.createInsecure()) {
    const { PeftService, TrainerService } = loadApi();
    const options = { 'grpc.service_config': JSON.stringify(SERVICE_CONFIG) };
    this.peft = new PeftService(peftAddress, credentials, options);
    this.trainer = new TrainerService(trainerAddress, credentials, options);
  }

  close() {
    this.peft.close();
    this.trainer.close();
  }

  /** Describes a model without loading its weights (InspectModelResponse). */
  inspect(model) {
    return unary(this.peft, 'InspectModel', { model });
  }

  /** Applies an adapter config to a model; resolves with the prepared Checkpoint. */
  async prepare(model, adapterConfig = {}, requestId = newRequestId()) {
    const response = await unary(this.peft, 'PrepareCheckpoint',
      { model, adapter_config: adapterConfig, request_id: requestId });
    return response.checkpoint;
  }

  async getCheckpoint(name) {
    return (await unary(this.peft, 'GetCheckpoint', { name })).checkpoint;
  }

  /**
   * Uploads JSONL as a client stream: the header first, then the bytes in chunks.
   * @param {Buffer|AsyncIterable<Buffer>} source the bytes, e.g. fs.createReadStream(file)
   * @param {object} [header] UploadDatasetHeader fields (display_name, format, request_id)
   * @returns {Promise<object>} the stored Dataset
   */
  async uploadDataset(source, header = {}) {
    let call;
    const done = new Promise((resolve, reject) => {
      call = this.trainer.UploadDataset((error, response) => (
        error ? reject(error) : resolve(response.dataset)));
    });
    const write = async (message) => {
      // Respect back-pressure so a large file is not buffered whole in memory.
      if (!call.write(message)) await once(call, 'drain');
    };
    try {
      await write({ header: { request_id: newRequestId(), ...header } });
      const chunks = Buffer.isBuffer(source) ? [source] : source;
      for await (const bytes of chunks) {
        for (let at = 0; at < bytes.length; at += UPLOAD_CHUNK_BYTES) {
          await write({ chunk: bytes.subarray(at, at + UPLOAD_CHUNK_BYTES) });
        }
      }
      call.end();
    } catch (error) {
      call.cancel();
      done.catch(() => {}); // the server's answer no longer matters
      throw error;
    }
    return done;
  }

  /**
   * Creates a training job and yields its JobEvents until the job's final state.
   * Breaking out of the loop cancels only the stream, never the job.
   * @param {object} job CreateTrainingJobRequest fields (checkpoint, dataset, config, ...)
   */
  train(job, heartbeatSeconds = 0) {
    const request = { job: { request_id: newRequestId(), ...job }, heartbeat_seconds: heartbeatSeconds };
    return events(this.trainer.Train(request));
  }

  /** Yields a job's events after a sequence number: history first, then live ones. */
  watch(name, afterSequence = 0, heartbeatSeconds = 0) {
    const request = { name, after_sequence: afterSequence, heartbeat_seconds: heartbeatSeconds };
    return events(this.trainer.WatchTrainingJob(request));
  }

  async getJob(name) {
    return (await unary(this.trainer, 'GetTrainingJob', { name })).training_job;
  }
}

module.exports = { MlxtuneClient, newRequestId, grpc };
