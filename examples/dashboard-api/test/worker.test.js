// The piscina worker returns exactly what the synchronous functions return
// when run on the main thread against the same database.
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { createDatabase, removeDatabaseFiles } = require('../src/db');
const { computeMetricsSummary, searchEventsJson, buildExport } = require('../src/workloads');
const { createWorkerPool, asBuffer } = require('../src/pool');

describe('worker pool matches the synchronous code', () => {
  let db;
  let dbPath;
  let pool;
  const template = fs.readFileSync(path.join(__dirname, '..', 'templates', 'export-header.txt'), 'utf8');

  before(() => {
    ({ db, dbPath } = createDatabase({ seed: { users: 5000, orders: 20000, events: 50000 }, pbkdf2Iterations: 1000 }));
    pool = createWorkerPool(dbPath, 2);
  });
  after(async () => {
    await pool.destroy();
    db.close();
    removeDatabaseFiles(dbPath);
  });

  it('metrics summary', async () => {
    assert.equal(await pool.run({ task: 'metrics' }), computeMetricsSummary(db));
  });

  it('search', async () => {
    for (const query of ['timeout', 'cart', 'grace', 'no such thing']) {
      assert.equal(await pool.run({ task: 'search', query }), searchEventsJson(db, query));
    }
  });

  it('export', async () => {
    const fromWorker = asBuffer(await pool.run({ task: 'export', template }));
    assert.ok(Buffer.isBuffer(fromWorker));
    assert.ok(fromWorker.equals(buildExport(db, template)));
  });

  it('sees writes made on the main thread', async () => {
    const before = JSON.parse(await pool.run({ task: 'metrics' })).totals.orders;
    db.prepare("INSERT INTO orders (user_id, status, total_cents, created_at) VALUES (5, 'paid', 100, '2026-11-30T23:59:59.000Z')").run();
    const after = JSON.parse(await pool.run({ task: 'metrics' })).totals.orders;
    assert.equal(after, before + 1);
  });

  it('rejects unknown tasks', async () => {
    await assert.rejects(pool.run({ task: 'nope' }), /unknown task/);
  });
});
