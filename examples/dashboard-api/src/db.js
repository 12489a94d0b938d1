// Opens the SQLite database (a temp file, so worker threads can open it too)
// and fills it with deterministic seed data: users, orders + items, events.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const Database = require('better-sqlite3');
const { createRng } = require('./rng');
const { hashPassword } = require('./workloads');

// Seeded data spans this window; nothing depends on the wall clock, so the
// same seed gives byte-identical API responses in both variants.
const DATA_START = Date.parse('2026-01-01T00:00:00Z');
const DATA_END = Date.parse('2026-11-30T23:59:59Z');

// Every imported account starts with this password (the old system's import
// script set it and a shared salt; see README). The admin account has its own.
const DEFAULT_PASSWORD = 'changeme';
const ADMIN_PASSWORD = 'admin-secret';

// Schema as inherited: primary keys only, no indexes on the foreign keys.
const SCHEMA = `
CREATE TABLE users (
  id INTEGER PRIMARY KEY,
  username TEXT NOT NULL UNIQUE,
  email TEXT NOT NULL,
  full_name TEXT NOT NULL,
  role TEXT NOT NULL,
  password_salt TEXT NOT NULL,
  password_hash TEXT NOT NULL,
  password_iterations INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE orders (
  id INTEGER PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users(id),
  status TEXT NOT NULL,
  total_cents INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE TABLE order_items (
  id INTEGER PRIMARY KEY,
  order_id INTEGER NOT NULL REFERENCES orders(id),
  sku TEXT NOT NULL,
  product_name TEXT NOT NULL,
  quantity INTEGER NOT NULL,
  unit_price_cents INTEGER NOT NULL
);
CREATE TABLE events (
  id INTEGER PRIMARY KEY,
  user_id INTEGER NOT NULL REFERENCES users(id),
  type TEXT NOT NULL,
  message TEXT NOT NULL,
  duration_ms INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
`;

// What the fixed variant adds after the investigation (see README).
const FIX_INDEXES = `
CREATE INDEX IF NOT EXISTS idx_orders_user_id ON orders(user_id);
CREATE INDEX IF NOT EXISTS idx_order_items_order_id ON order_items(order_id);
CREATE INDEX IF NOT EXISTS idx_events_user_id ON events(user_id);
CREATE INDEX IF NOT EXISTS idx_events_created_at ON events(created_at);
`;

const FIRST_NAMES = ['ada', 'alan', 'grace', 'linus', 'ken', 'barbara', 'edsger', 'margaret', 'donald',
  'frances', 'john', 'radia', 'dennis', 'sophie', 'tim', 'karen', 'niklaus', 'hedy', 'guido', 'anita'];
const LAST_NAMES = ['lovelace', 'turing', 'hopper', 'torvalds', 'thompson', 'liskov', 'dijkstra',
  'hamilton', 'knuth', 'allen', 'backus', 'perlman', 'ritchie', 'wilson', 'lee', 'jones', 'wirth',
  'lamarr', 'rossum', 'borg'];
const ROLES = ['viewer', 'viewer', 'viewer', 'analyst', 'analyst', 'manager'];
const ORDER_STATUSES = ['pending', 'paid', 'paid', 'shipped', 'shipped', 'shipped', 'delivered',
  'delivered', 'delivered', 'delivered', 'refunded', 'cancelled'];
const PRODUCT_ADJECTIVES = ['basic', 'pro', 'ultra', 'mini', 'classic', 'smart', 'eco', 'turbo'];
const PRODUCT_NOUNS = ['widget', 'gadget', 'sensor', 'cable', 'adapter', 'monitor', 'keyboard', 'router'];

// Event messages are short phrases of words only. Their length matters: the
// legacy search regex backtracks exponentially in it, so keep them short.
const EVENT_TEMPLATES = {
  login: ['user logged in', 'login failed', 'token renewed'],
  page_view: ['viewed orders', 'viewed metrics', 'opened profile'],
  checkout: ['checkout started', 'cart abandoned', 'cart updated'],
  payment: ['payment captured', 'payment failed', 'refund issued'],
  export: ['export requested', 'export ready'],
  api_error: ['api timeout', 'upstream error', 'rate limited'],
  search: ['search run', 'filter saved'],
  admin: ['role changed', 'password reset', 'session expired'],
};
const EVENT_TYPES = Object.keys(EVENT_TEMPLATES);


function pick(rng, list) {
  return list[Math.floor(rng() * list.length)];
}

function buildProducts() {
  const products = [];
  let n = 0;
  for (const adjective of PRODUCT_ADJECTIVES) {
    for (const noun of PRODUCT_NOUNS) {
      n += 1;
      products.push({
        sku: `SKU-${String(n).padStart(4, '0')}`,
        name: `${adjective} ${noun}`,
        priceCents: 499 + ((n * 7919) % 25000),
      });
    }
  }
  return products;
}

function tempDbPath() {
  const name = `dashboard-api-${process.pid}-${crypto.randomBytes(4).toString('hex')}.sqlite`;
  return path.join(os.tmpdir(), name);
}

// Creates a fresh database file, applies the schema and seeds it.
function createDatabase({ seed, pbkdf2Iterations, dbPath = tempDbPath() }) {
  const db = new Database(dbPath);
  // WAL lets worker threads read while the main thread writes.
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = OFF'); // throwaway demo data, no durability needed
  db.exec(SCHEMA);
  seedDatabase(db, seed, pbkdf2Iterations);
  return { db, dbPath };
}

function seedDatabase(db, sizes, pbkdf2Iterations) {
  const rng = createRng(20261203);
  const products = buildProducts();
  const span = DATA_END - DATA_START;

  // Password hashing is deliberately expensive, so hash once per distinct
  // (password, salt) pair rather than once per user: seeding stays fast while
  // every login still pays the full cost.
  const sharedSalt = crypto.createHash('sha256').update('legacy-import-salt').digest('hex').slice(0, 32);
  const sharedHash = hashPassword(DEFAULT_PASSWORD, sharedSalt, pbkdf2Iterations);
  const adminSalt = crypto.createHash('sha256').update('admin-salt').digest('hex').slice(0, 32);
  const adminHash = hashPassword(ADMIN_PASSWORD, adminSalt, pbkdf2Iterations);

  const insertUser = db.prepare(`INSERT INTO users
    (id, username, email, full_name, role, password_salt, password_hash, password_iterations, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`);
  const insertOrder = db.prepare('INSERT INTO orders (id, user_id, status, total_cents, created_at) VALUES (?, ?, ?, ?, ?)');
  const insertItem = db.prepare(`INSERT INTO order_items (order_id, sku, product_name, quantity, unit_price_cents)
    VALUES (?, ?, ?, ?, ?)`);
  const insertEvent = db.prepare(`INSERT INTO events (id, user_id, type, message, duration_ms, created_at)
    VALUES (?, ?, ?, ?, ?, ?)`);

  const seedAll = db.transaction(() => {
    for (let id = 1; id <= sizes.users; id++) {
      const first = pick(rng, FIRST_NAMES);
      const last = pick(rng, LAST_NAMES);
      const createdAt = new Date(DATA_START + Math.floor(rng() * span * 0.5)).toISOString();
      if (id === 1) {
        insertUser.run(id, 'admin', 'admin@example.com', 'Dashboard Admin', 'admin',
          adminSalt, adminHash, pbkdf2Iterations, createdAt);
      } else {
        insertUser.run(id, `user${String(id).padStart(4, '0')}`, `${first}.${last}${id}@example.com`,
          `${first[0].toUpperCase()}${first.slice(1)} ${last[0].toUpperCase()}${last.slice(1)}`,
          pick(rng, ROLES), sharedSalt, sharedHash, pbkdf2Iterations, createdAt);
      }
    }

    for (let id = 1; id <= sizes.orders; id++) {
      // Skewed towards low user ids so "top customers" is a meaningful list.
      const userId = 1 + Math.floor(rng() * rng() * sizes.users);
      const createdAt = new Date(DATA_START + Math.floor(((id - 1 + rng()) / sizes.orders) * span)).toISOString();
      const itemCount = 1 + Math.floor(rng() * 3);
      let total = 0;
      const items = [];
      for (let i = 0; i < itemCount; i++) {
        const product = pick(rng, products);
        const quantity = 1 + Math.floor(rng() * 4);
        total += quantity * product.priceCents;
        items.push([product.sku, product.name, quantity, product.priceCents]);
      }
      insertOrder.run(id, userId, pick(rng, ORDER_STATUSES), total, createdAt);
      for (const item of items) insertItem.run(id, ...item);
    }

    for (let id = 1; id <= sizes.events; id++) {
      const type = pick(rng, EVENT_TYPES);
      const createdAt = new Date(DATA_START + Math.floor(((id - 1 + rng()) / sizes.events) * span)).toISOString();
      // Long-tailed durations, so percentiles differ from the mean.
      const duration = Math.round(5 + 40 * Math.exp(rng() * 4) * rng());
      insertEvent.run(id, 1 + Math.floor(rng() * sizes.users), type, pick(rng, EVENT_TEMPLATES[type]), duration, createdAt);
    }
  });
  seedAll();
  db.pragma('synchronous = NORMAL');
}

function addForeignKeyIndexes(db) {
  db.exec(FIX_INDEXES);
  db.exec('ANALYZE');
}

function removeDatabaseFiles(dbPath) {
  for (const suffix of ['', '-wal', '-shm']) {
    try {
      fs.unlinkSync(dbPath + suffix);
    } catch (err) {
      if (err.code !== 'ENOENT') throw err;
    }
  }
}

module.exports = {
  createDatabase,
  addForeignKeyIndexes,
  removeDatabaseFiles,
  buildProducts,
  createRng,
  DEFAULT_PASSWORD,
  ADMIN_PASSWORD,
  EVENT_TYPES,
};
