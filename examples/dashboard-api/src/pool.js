// Creates the piscina worker-thread pool used by the fixed variant.
'use strict';

const os = require('node:os');
const path = require('node:path');
const Piscina = require('piscina');

function createWorkerPool(dbPath, threads = Math.max(1, os.availableParallelism())) {
  return new Piscina({
    filename: path.join(__dirname, 'worker.js'),
    workerData: { dbPath },
    // Keep the threads warm: starting a worker (and its DB connection) per
    // burst would put that cost back on the request path.
    minThreads: threads,
    maxThreads: threads,
    idleTimeout: 60_000,
  });
}

// Buffers come back from a worker as plain Uint8Arrays; re-wrap without copying.
function asBuffer(value) {
  return Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
}

module.exports = { createWorkerPool, asBuffer };
