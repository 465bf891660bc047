#!/usr/bin/env node
'use strict';
// Prepares a LoRA checkpoint, uploads a JSONL dataset, trains and prints the
// streamed loss. The last line is a JSON summary of what the streams carried,
// the same one the Go example prints. Exits 1 unless the job succeeded.
//
//   node example.js --peft HOST:PORT --trainer HOST:PORT --model NAME \
//     --dataset FILE.jsonl --steps N [--rank R] [--learning-rate LR]

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const { MlxtuneClient, grpc } = require('./mlxtune');

const USAGE = 'usage: node example.js --peft ADDR --trainer ADDR --model NAME '
  + '--dataset FILE --steps N [--rank R] [--learning-rate LR]';

function parseOptions(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      peft: { type: 'string' },
      trainer: { type: 'string' },
      model: { type: 'string' },
      dataset: { type: 'string' },
      steps: { type: 'string' },
      rank: { type: 'string', default: '8' },
      'learning-rate': { type: 'string' },
    },
  });
  for (const name of ['peft', 'trainer', 'model', 'dataset', 'steps']) {
    if (!values[name]) throw new Error(`--${name} is required`);
  }
  return values;
}

// JSON has no NaN or Infinity: a non-finite loss is reported as null.
const finiteOrNull = (x) => (Number.isFinite(x) ? x : null);

async function run(options) {
  const client = new MlxtuneClient(options.peft, options.trainer);
  try {
    const model = await client.inspect(options.model);
    console.log(`model ${options.model}: ${model.base_model.architecture}, `
      + `${model.num_layers} layers, hidden ${model.hidden_size}, `
      + `${model.total_parameters} parameters`);

    const checkpoint = await client.prepare(options.model, { rank: Number(options.rank) });
    console.log(`prepared ${checkpoint.name}: ${checkpoint.parameters.summary}`);

    const dataset = await client.uploadDataset(fs.createReadStream(options.dataset),
      { display_name: path.basename(options.dataset) });
    console.log(`dataset ${dataset.name}: ${dataset.num_records} records, ${dataset.format}`);

    const config = { max_steps: Number(options.steps) };
    if (options['learning-rate']) config.learning_rate = Number(options['learning-rate']);

    const losses = [];
    let evalEvents = 0;
    let jobName = '';
    for await (const event of client.train({ checkpoint: checkpoint.name, dataset: dataset.name,
      config, display_name: 'node example' })) {
      jobName = event.job;
      printEvent(event);
      if (event.kind === 'step') losses.push(event.step.loss);
      if (event.kind === 'eval') evalEvents += 1;
    }

    // The stream ends after the final state change; the job resource is the record.
    const job = await client.getJob(jobName);
    const summary = {
      checkpoint: checkpoint.name,
      dataset: dataset.name,
      job: job.name,
      step_events: losses.length,
      total_steps: Number(job.total_steps),
      first_loss: losses.length ? finiteOrNull(losses[0]) : null,
      last_loss: losses.length ? finiteOrNull(losses[losses.length - 1]) : null,
      eval_events: evalEvents,
      final_state: job.state,
      output_checkpoint: job.output_checkpoint,
    };
    console.log(JSON.stringify(summary));
    return job.state === 'JOB_STATE_SUCCEEDED' ? 0 : 1;
  } finally {
    client.close();
  }
}

function printEvent(event) {
  switch (event.kind) {
    case 'step': {
      const s = event.step;
      console.log(`step ${s.step}/${s.total_steps} loss ${s.loss.toFixed(4)}`
        + (s.skipped ? ' (skipped)' : ''));
      break;
    }
    case 'eval':
      console.log(`eval step ${event.eval.step} loss ${event.eval.eval_loss.toFixed(4)}`);
      break;
    case 'worker_started': {
      const w = event.worker_started;
      console.log(`worker started on ${w.device} (${w.blas}): ${w.train_examples} train / `
        + `${w.validation_examples} validation examples, ${w.total_steps} steps`);
      break;
    }
    case 'checkpoint_saved': {
      const c = event.checkpoint_saved;
      console.log(`checkpoint saved at step ${c.step}: ${c.checkpoint}${c.final ? ' (final)' : ''}`);
      break;
    }
    case 'state_change': {
      const c = event.state_change;
      const error = c.error && c.error.reason ? ` [${c.error.reason}: ${c.error.message}]` : '';
      console.log(`${event.job} ${c.state}${c.reason ? ` (${c.reason})` : ''}${error}`);
      break;
    }
    default: // heartbeats only prove the stream is alive
  }
}

async function main() {
  let options;
  try {
    options = parseOptions(process.argv.slice(2));
  } catch (error) {
    console.error(`${error.message}\n${USAGE}`);
    return 2;
  }
  try {
    return await run(options);
  } catch (error) {
    // gRPC errors carry a numeric code; print its name as the other clients do.
    const code = error.code !== undefined ? `${grpc.status[error.code] ?? error.code}: ` : '';
    console.error(`error: ${code}${error.details || error.message}`);
    return 1;
  }
}

main().then((code) => { process.exitCode = code; });
