// Builds the Express app and starts the HTTP server. One code base, two
// variants chosen by config.variant:
//   baseline - the inherited code: everything synchronous on the event loop;
//   fixed    - async PBKDF2, a piscina worker pool for CPU-heavy work, a
//              read-through cache, indexes, reused statements, batched queries.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const http = require('node:http');
const { monitorEventLoopDelay } = require('node:perf_hooks');
const express = require('express');

const { createDatabase, addForeignKeyIndexes, removeDatabaseFiles, buildProducts } = require('./db');
const {
  hashPassword, hashPasswordAsync, hashesEqual, computeMetricsSummary, searchEventsJson, buildExport,
  SEARCH_MAX_QUERY_LENGTH,
} = require('./workloads');
const {
  loadOrdersWithItems, loadOrdersPageBatched, prepareStatements, loadUserProfile, loadUserProfileFast, createOrder,
} = require('./queries');
const { createReadCache } = require('./cache');
const { createWorkerPool, asBuffer } = require('./pool');
const { issueToken } = require('./tokens');

const EXPORT_TEMPLATE_PATH = path.join(__dirname, '..', 'templates', 'export-header.txt');
const MAX_ORDER_ITEMS = 20;

// Cache lifetimes (fixed variant). Writes invalidate explicitly, so TTLs only
// bound how long data changed behind the app's back can stay visible.
const TTL_MS = { metrics: 30_000, search: 60_000, export: 30_000, ordersPage: 10_000, user: 60_000 };

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Express 4 does not catch rejected promises from handlers.
function asyncRoute(handler) {
  return function runAsyncRoute(req, res, next) {
    Promise.resolve(handler(req, res, next)).catch(next);
  };
}

// ------------------------------------------------------------- validation

function parsePositiveInt(value, name, { defaultValue, max = 1e9 } = {}) {
  if (value === undefined && defaultValue !== undefined) return defaultValue;
  const text = String(value);
  if (!/^[1-9][0-9]{0,9}$/.test(text) || Number(text) > max) {
    throw new HttpError(400, `${name} must be a positive integer`);
  }
  return Number(text);
}

function parseCredentials(body) {
  const { username, password } = body || {};
  if (typeof username !== 'string' || typeof password !== 'string' || !username || !password
      || username.length > 100 || password.length > 1024) {
    throw new HttpError(400, 'username and password are required strings');
  }
  return { username, password };
}

function parseSearchQuery(query) {
  const q = typeof query.q === 'string' ? query.q.trim() : '';
  if (q.length === 0 || q.length > SEARCH_MAX_QUERY_LENGTH) {
    throw new HttpError(400, `q is required (1-${SEARCH_MAX_QUERY_LENGTH} characters)`);
  }
  return q;
}

function parseExportFormat(query) {
  const format = query.format === undefined ? 'csv' : query.format;
  if (format !== 'csv') throw new HttpError(400, 'format must be csv');
  return format;
}

function parseNewOrder(body, productsBySku) {
  const { userId, items } = body || {};
  if (!Number.isInteger(userId) || userId < 1) throw new HttpError(400, 'userId must be a positive integer');
  if (!Array.isArray(items) || items.length === 0 || items.length > MAX_ORDER_ITEMS) {
    throw new HttpError(400, `items must be an array of 1-${MAX_ORDER_ITEMS} entries`);
  }
  return {
    userId,
    items: items.map((item) => {
      const product = productsBySku.get(item && item.sku);
      if (!product) throw new HttpError(400, `unknown sku ${item && item.sku}`);
      if (!Number.isInteger(item.quantity) || item.quantity < 1 || item.quantity > 100) {
        throw new HttpError(400, 'quantity must be an integer 1-100');
      }
      return { sku: product.sku, productName: product.name, quantity: item.quantity, unitPriceCents: product.priceCents };
    }),
  };
}

// ----------------------------------------------------------------- helpers

// Read on every request in the baseline: the template "might change".
function loadExportTemplate() {
  return fs.readFileSync(EXPORT_TEMPLATE_PATH, 'utf8');
}

function sendJsonText(res, status, text) {
  res.status(status).type('application/json').send(text);
}

function sendExport(res, gzipped) {
  res.set({
    'Content-Type': 'text/csv; charset=utf-8',
    'Content-Encoding': 'gzip',
    'Content-Disposition': 'attachment; filename="orders.csv"',
  });
  res.send(gzipped);
}

// Unknown users still pay for a hash, so response time does not reveal
// which usernames exist.
function dummyCredentials(iterations) {
  return { password_salt: '00'.repeat(16), password_hash: '00'.repeat(64), password_iterations: iterations };
}

function loginResponse(user) {
  const { token, expiresAt } = issueToken(user);
  return { token, expiresAt, user: { id: user.id, username: user.username, role: user.role } };
}

// ------------------------------------------------------------------- app

function createApp(ctx) {
  const { config, db, statements, cache, pool, productsBySku, eventLoopDelay } = ctx;
  const fixed = config.variant === 'fixed';
  const dummy = dummyCredentials(config.pbkdf2Iterations);
  const app = express();
  app.disable('x-powered-by');
  app.use(express.json({ limit: '64kb' }));

  // ---- baseline handlers: all work happens synchronously on the event loop.

  function handleLoginBaseline(req, res) {
    const { username, password } = parseCredentials(req.body);
    const user = db.prepare(
      'SELECT id, username, role, password_salt, password_hash, password_iterations FROM users WHERE username = ?',
    ).get(username);
    const record = user || dummy;
    const hash = hashPassword(password, record.password_salt, record.password_iterations);
    if (!user || !hashesEqual(hash, user.password_hash)) throw new HttpError(401, 'invalid credentials');
    res.json(loginResponse(user));
  }

  function handleMetricsBaseline(req, res) {
    sendJsonText(res, 200, computeMetricsSummary(db));
  }

  function handleSearchBaseline(req, res) {
    sendJsonText(res, 200, searchEventsJson(db, parseSearchQuery(req.query)));
  }

  function handleExportBaseline(req, res) {
    parseExportFormat(req.query);
    sendExport(res, buildExport(db, loadExportTemplate()));
  }

  function handleOrdersBaseline(req, res) {
    const page = parsePositiveInt(req.query.page, 'page', { defaultValue: 1, max: 1e6 });
    res.json(loadOrdersWithItems(db, page));
  }

  function handleUserBaseline(req, res) {
    const profile = loadUserProfile(db, parsePositiveInt(req.params.id, 'id'));
    if (!profile) throw new HttpError(404, 'user not found');
    res.json(profile);
  }

  // ---- fixed handlers: CPU work off the loop, reads cached, queries batched.

  async function handleLoginFixed(req, res) {
    const { username, password } = parseCredentials(req.body);
    const user = statements.userByName.get(username);
    const record = user || dummy;
    const hash = await hashPasswordAsync(password, record.password_salt, record.password_iterations);
    if (!user || !hashesEqual(hash, user.password_hash)) throw new HttpError(401, 'invalid credentials');
    res.json(loginResponse(user));
  }

  async function handleMetricsFixed(req, res) {
    const body = await cache.getOrCompute('metrics:summary', TTL_MS.metrics,
      () => pool.run({ task: 'metrics' }));
    sendJsonText(res, 200, body);
  }

  async function handleSearchFixed(req, res) {
    const q = parseSearchQuery(req.query);
    const body = await cache.getOrCompute(`search:${q}`, TTL_MS.search,
      () => pool.run({ task: 'search', query: q }));
    sendJsonText(res, 200, body);
  }

  async function handleExportFixed(req, res) {
    parseExportFormat(req.query);
    const body = await cache.getOrCompute('export:csv', TTL_MS.export,
      async () => asBuffer(await pool.run({ task: 'export', template: ctx.exportTemplate })));
    sendExport(res, body);
  }

  async function handleOrdersFixed(req, res) {
    const page = parsePositiveInt(req.query.page, 'page', { defaultValue: 1, max: 1e6 });
    const body = await cache.getOrCompute(`orders:page:${page}`, TTL_MS.ordersPage,
      async () => JSON.stringify(loadOrdersPageBatched(statements, page)));
    sendJsonText(res, 200, body);
  }

  async function handleUserFixed(req, res) {
    const id = parsePositiveInt(req.params.id, 'id');
    const body = await cache.getOrCompute(`user:${id}`, TTL_MS.user,
      async () => JSON.stringify(loadUserProfileFast(statements, id)));
    if (body === 'null') throw new HttpError(404, 'user not found');
    sendJsonText(res, 200, body);
  }

  // ---- shared handlers

  async function handleCreateOrder(req, res) {
    const input = parseNewOrder(req.body, productsBySku);
    if (!statements.userById.get(input.userId)) throw new HttpError(400, 'unknown userId');
    const order = createOrder(db, statements, input, new Date().toISOString());
    if (fixed) {
      // Before answering, so the very next read sees the write. Search only
      // covers events and users, which an order does not change.
      await cache.invalidate({
        keys: ['metrics:summary', 'export:csv', `user:${input.userId}`],
        prefixes: ['orders:page:'],
      });
    }
    res.status(201).json(order);
  }

  function handleHealth(req, res) {
    const ms = (ns) => Math.round(ns / 1e4) / 100;
    res.json({
      status: 'ok',
      variant: config.variant,
      pid: process.pid,
      uptimeSeconds: Math.round(process.uptime()),
      eventLoopDelayMs: {
        p50: ms(eventLoopDelay.percentile(50)),
        p99: ms(eventLoopDelay.percentile(99)),
        max: ms(eventLoopDelay.max),
      },
      cache: cache ? { kind: cache.kind, ...cache.stats } : null,
      workers: pool ? { threads: pool.threads.length, queueSize: pool.queueSize, completed: pool.completed } : null,
    });
  }

  const route = (baseline, improved) => asyncRoute(fixed ? improved : baseline);
  app.get('/health', handleHealth);
  app.post('/api/login', route(handleLoginBaseline, handleLoginFixed));
  app.get('/api/metrics/summary', route(handleMetricsBaseline, handleMetricsFixed));
  app.get('/api/search', route(handleSearchBaseline, handleSearchFixed));
  app.get('/api/export', route(handleExportBaseline, handleExportFixed));
  app.get('/api/orders', route(handleOrdersBaseline, handleOrdersFixed));
  app.post('/api/orders', asyncRoute(handleCreateOrder));
  app.get('/api/users/:id', route(handleUserBaseline, handleUserFixed));

  app.use(function handleNotFound(req, res) {
    res.status(404).json({ error: 'not found' });
  });
  // eslint-disable-next-line no-unused-vars
  app.use(function handleError(err, req, res, next) {
    const status = err.status || err.statusCode || 500;
    if (status >= 500) console.error(err);
    res.status(status).json({ error: status >= 500 ? 'internal error' : err.message });
  });
  return app;
}

// Seeds the database, wires the variant's pieces together and listens.
// Resolves to { url, port, server, context, close }.
async function startServer(config) {
  const { db, dbPath } = createDatabase({ seed: config.seed, pbkdf2Iterations: config.pbkdf2Iterations });
  const ctx = {
    config,
    db,
    dbPath,
    productsBySku: new Map(buildProducts().map((product) => [product.sku, product])),
    eventLoopDelay: monitorEventLoopDelay({ resolution: 10 }),
    cache: null,
    pool: null,
    exportTemplate: null,
  };
  ctx.eventLoopDelay.enable();
  try {
    if (config.variant === 'fixed') {
      addForeignKeyIndexes(db);
      ctx.exportTemplate = loadExportTemplate(); // once, not per request
      ctx.pool = createWorkerPool(dbPath);
      ctx.cache = await createReadCache(config.redisUrl);
      // A previous process may have left entries for a different database.
      await ctx.cache.invalidate({ prefixes: [''] });
    }
    ctx.statements = prepareStatements(db);
  } catch (err) {
    await closeContext(ctx);
    throw err;
  }

  const server = http.createServer(createApp(ctx));
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, resolve);
  });
  const { port } = server.address();

  let closing = null;
  function close() {
    closing ||= (async () => {
      await new Promise((resolve) => {
        server.close(resolve);
        server.closeAllConnections();
      });
      await closeContext(ctx);
    })();
    return closing;
  }

  return { url: `http://${config.host}:${port}`, port, server, context: ctx, close };
}

async function closeContext(ctx) {
  ctx.eventLoopDelay.disable();
  if (ctx.pool) await ctx.pool.destroy();
  if (ctx.cache) await ctx.cache.close();
  ctx.db.close();
  removeDatabaseFiles(ctx.dbPath);
}

module.exports = { createApp, startServer };
