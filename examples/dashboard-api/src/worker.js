// piscina worker (fixed variant): runs the CPU-heavy workloads off the main
// thread against its own read-only connection to the same SQLite file.
'use strict';

const Database = require('better-sqlite3');
const { workerData } = require('piscina');
const { computeMetricsSummary, searchEventsJson, buildExport } = require('./workloads');

const db = new Database(workerData.dbPath, { readonly: true, fileMustExist: true });

// Task shape: { task: 'metrics' } | { task: 'search', query } | { task: 'export', template }.
// Results are the finished response bodies, so the main thread only copies them.
function runWorkerTask(message) {
  switch (message.task) {
    case 'metrics':
      return computeMetricsSummary(db);
    case 'search':
      return searchEventsJson(db, message.query);
    case 'export':
      return buildExport(db, message.template);
    default:
      throw new Error(`unknown task ${message.task}`);
  }
}

module.exports = runWorkerTask;
