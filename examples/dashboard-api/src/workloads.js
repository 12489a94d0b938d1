// The CPU-heavy pieces of the dashboard, shared by the main thread (baseline
// variant) and the piscina worker threads (fixed variant) so both produce the
// same bytes. They are plain, named function declarations on purpose: a
// sampling profiler must be able to show them by name in a flame graph.
'use strict';

const crypto = require('node:crypto');
const zlib = require('node:zlib');
const { promisify } = require('node:util');

const pbkdf2Async = promisify(crypto.pbkdf2);

const PASSWORD_KEY_LENGTH = 64;
const PASSWORD_DIGEST = 'sha512';

// ---------------------------------------------------------------- passwords

function checkPasswordInput(password, saltHex, iterations) {
  if (typeof password !== 'string' || password.length === 0 || password.length > 1024) {
    throw new TypeError('password must be a non-empty string of at most 1024 characters');
  }
  if (typeof saltHex !== 'string' || !/^[0-9a-f]{16,128}$/.test(saltHex)) {
    throw new TypeError('salt must be a hex string');
  }
  if (!Number.isInteger(iterations) || iterations < 1) {
    throw new TypeError('iterations must be a positive integer');
  }
}

// Synchronous PBKDF2: blocks the calling thread for the whole derivation.
function hashPassword(password, saltHex, iterations) {
  checkPasswordInput(password, saltHex, iterations);
  const derived = crypto.pbkdf2Sync(password.normalize('NFKC'), Buffer.from(saltHex, 'hex'),
    iterations, PASSWORD_KEY_LENGTH, PASSWORD_DIGEST);
  return derived.toString('hex');
}

// Same derivation on the libuv thread pool; the event loop stays free.
async function hashPasswordAsync(password, saltHex, iterations) {
  checkPasswordInput(password, saltHex, iterations);
  const derived = await pbkdf2Async(password.normalize('NFKC'), Buffer.from(saltHex, 'hex'),
    iterations, PASSWORD_KEY_LENGTH, PASSWORD_DIGEST);
  return derived.toString('hex');
}

function hashesEqual(hexA, hexB) {
  const a = Buffer.from(hexA, 'hex');
  const b = Buffer.from(hexB, 'hex');
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

// ------------------------------------------------------------------ metrics

// The summary covers the trailing 90 days of the data (relative to the newest
// row, so seeded data always gives the same answer).
const METRICS_WINDOW_DAYS = 90;

function windowStart(db, table, days) {
  const latest = db.prepare(`SELECT MAX(created_at) FROM ${table}`).pluck().get();
  return latest ? new Date(Date.parse(latest) - days * 86400000).toISOString() : '';
}

function loadMetricsRows(db) {
  // Reloaded on every request and filtered by a full-table scan: the
  // inherited schema has no index on created_at.
  const since = windowStart(db, 'events', METRICS_WINDOW_DAYS);
  return {
    since,
    events: db.prepare('SELECT id, user_id, type, duration_ms, created_at FROM events WHERE created_at >= ?').all(since),
    orders: db.prepare('SELECT id, user_id, status, total_cents, created_at FROM orders WHERE created_at >= ?').all(since),
    users: db.prepare('SELECT id, username, role FROM users').all(),
  };
}

function compareNumbers(a, b) {
  return a - b;
}

// Nearest-rank percentiles over a sorted copy of the values.
function percentiles(values, ranks) {
  const sorted = values.slice().sort(compareNumbers);
  const out = {};
  for (const rank of ranks) {
    const key = `p${rank}`;
    if (sorted.length === 0) {
      out[key] = null;
      continue;
    }
    const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((rank / 100) * sorted.length) - 1));
    out[key] = sorted[index];
  }
  return out;
}

// Timestamps are stored as ISO-8601 UTC strings, so the day is the first ten
// characters and the hour the two after the 'T'.
function dayOf(isoTimestamp) {
  return isoTimestamp.slice(0, 10);
}

function hourOf(isoTimestamp) {
  return Number(isoTimestamp.slice(11, 13));
}

function emptyDay(date) {
  return { date, eventCount: 0, events: {}, orderCount: 0, revenueCents: 0, statuses: {}, orderTotals: [] };
}

// Groups events and orders by day, type, status, role and user, then derives
// percentiles by sorting. All in JavaScript, on whichever thread calls it.
function aggregateMetrics(rows) {
  const { events, orders, users } = rows;
  const usersById = new Map();
  for (const user of users) usersById.set(user.id, user);

  const days = new Map();
  const types = new Map();
  const perUser = new Map();
  const hourly = new Array(24).fill(0);
  const statuses = {};
  const roles = {};
  const orderTotals = [];
  let revenueCents = 0;

  function userBucket(userId) {
    let bucket = perUser.get(userId);
    if (!bucket) {
      bucket = { orders: 0, revenueCents: 0, events: 0 };
      perUser.set(userId, bucket);
    }
    return bucket;
  }

  function dayBucket(date) {
    let bucket = days.get(date);
    if (!bucket) {
      bucket = emptyDay(date);
      days.set(date, bucket);
    }
    return bucket;
  }

  for (const event of events) {
    const day = dayBucket(dayOf(event.created_at));
    day.eventCount += 1;
    day.events[event.type] = (day.events[event.type] || 0) + 1;
    let type = types.get(event.type);
    if (!type) {
      type = { count: 0, totalDurationMs: 0, durations: [] };
      types.set(event.type, type);
    }
    type.count += 1;
    type.totalDurationMs += event.duration_ms;
    type.durations.push(event.duration_ms);
    hourly[hourOf(event.created_at)] += 1;
    userBucket(event.user_id).events += 1;
  }

  for (const order of orders) {
    const day = dayBucket(dayOf(order.created_at));
    day.orderCount += 1;
    day.statuses[order.status] = (day.statuses[order.status] || 0) + 1;
    statuses[order.status] = (statuses[order.status] || 0) + 1;
    orderTotals.push(order.total_cents);
    day.orderTotals.push(order.total_cents);
    const counted = order.status !== 'cancelled' && order.status !== 'refunded';
    const bucket = userBucket(order.user_id);
    bucket.orders += 1;
    if (counted) {
      day.revenueCents += order.total_cents;
      revenueCents += order.total_cents;
      bucket.revenueCents += order.total_cents;
      const role = usersById.get(order.user_id)?.role || 'unknown';
      roles[role] = (roles[role] || 0) + order.total_cents;
    }
  }

  const dayList = [...days.values()].sort((a, b) => (a.date < b.date ? -1 : a.date > b.date ? 1 : 0));
  const daily = dayList.map(function summarizeDay(day) {
    return {
      date: day.date,
      eventCount: day.eventCount,
      events: day.events,
      orderCount: day.orderCount,
      revenueCents: day.revenueCents,
      statuses: day.statuses,
      orderTotalCents: percentiles(day.orderTotals, [50, 90]),
    };
  });

  const eventTypes = [...types.entries()]
    .sort((a, b) => (a[0] < b[0] ? -1 : 1))
    .map(function summarizeType([name, type]) {
      return {
        type: name,
        count: type.count,
        meanDurationMs: Math.round((type.totalDurationMs / type.count) * 100) / 100,
        durationMs: percentiles(type.durations, [50, 90, 95, 99]),
      };
    });

  const topCustomers = [...perUser.entries()]
    .filter(([, bucket]) => bucket.orders > 0)
    .sort((a, b) => b[1].revenueCents - a[1].revenueCents || a[0] - b[0])
    .slice(0, 1000)
    .map(function summarizeCustomer([userId, bucket]) {
      const user = usersById.get(userId);
      return {
        userId,
        username: user ? user.username : null,
        role: user ? user.role : null,
        orders: bucket.orders,
        revenueCents: bucket.revenueCents,
        events: bucket.events,
      };
    });

  return {
    source: {
      eventsSince: rows.since,
      events: events.length,
      orders: orders.length,
      users: users.length,
      firstDay: dayList.length ? dayList[0].date : null,
      lastDay: dayList.length ? dayList[dayList.length - 1].date : null,
    },
    totals: {
      orders: orders.length,
      events: events.length,
      revenueCents,
      activeUsers: perUser.size,
    },
    orderTotalCents: percentiles(orderTotals, [50, 90, 95, 99]),
    statuses,
    revenueByRoleCents: roles,
    eventsByHourUtc: hourly,
    eventTypes,
    daily,
    topCustomers,
  };
}

// Pretty-printed, because the old frontend team liked reading it in devtools.
function serializeSummary(summary) {
  return JSON.stringify(summary, null, 2);
}

// The whole /api/metrics/summary computation; returns the response body.
function computeMetricsSummary(db) {
  return serializeSummary(aggregateMetrics(loadMetricsRows(db)));
}

// ------------------------------------------------------------------- search

const SEARCH_EVENT_WINDOW = 2000; // most recent events searched
const SEARCH_RESULT_LIMIT = 50;
const SEARCH_MAX_QUERY_LENGTH = 64;

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

// The inherited pattern: "any run of words, then the query". The nested
// quantifier in (\w+\s?)* makes V8 try every way of splitting the leading
// words before giving up on a non-matching line, i.e. exponential in the
// length of the text. Event messages and user names are short, which is the
// only thing that keeps this bounded. (It also cannot see past the first
// non-word character, so in an email only the part before the first '.' or
// '@' can match: one of the inherited bugs nobody has fixed yet.)
function buildSearchPattern(query) {
  return new RegExp('^(\\w+\\s?)*' + escapeRegExp(query), 'i');
}

// Returns the /api/search response object for `query`.
function searchEvents(db, query) {
  const pattern = buildSearchPattern(query);
  const events = db.prepare(
    'SELECT id, user_id, type, message, created_at FROM events ORDER BY id DESC LIMIT ?',
  ).all(SEARCH_EVENT_WINDOW);
  const users = db.prepare('SELECT id, username, email, full_name FROM users ORDER BY id').all();

  const matchedEvents = [];
  let eventMatches = 0;
  for (const event of events) {
    if (pattern.test(event.message)) {
      eventMatches += 1;
      if (matchedEvents.length < SEARCH_RESULT_LIMIT) {
        matchedEvents.push({
          id: event.id,
          userId: event.user_id,
          type: event.type,
          message: event.message,
          createdAt: event.created_at,
        });
      }
    }
  }

  const matchedUsers = [];
  let userMatches = 0;
  for (const user of users) {
    if (pattern.test(user.email) || pattern.test(user.full_name)) {
      userMatches += 1;
      if (matchedUsers.length < SEARCH_RESULT_LIMIT) {
        matchedUsers.push({ id: user.id, username: user.username, email: user.email, fullName: user.full_name });
      }
    }
  }

  return {
    query,
    scanned: { events: events.length, users: users.length },
    totalMatches: { events: eventMatches, users: userMatches },
    events: matchedEvents,
    users: matchedUsers,
  };
}

// Serialized form, as sent on the wire (and returned by the worker).
function searchEventsJson(db, query) {
  return JSON.stringify(searchEvents(db, query));
}

// ------------------------------------------------------------------- export

const EXPORT_WINDOW_DAYS = 90;

// Orders of the trailing window (relative to the newest order, so the seeded
// data gives the same file whatever today's date is).
function loadExportRows(db) {
  const since = windowStart(db, 'orders', EXPORT_WINDOW_DAYS);
  return db.prepare(`
    SELECT o.id, o.created_at, o.status, o.total_cents, u.username, u.email, u.full_name
    FROM orders o JOIN users u ON u.id = o.user_id
    WHERE o.created_at >= ?
    ORDER BY o.id`).all(since);
}

function csvField(value) {
  const text = value === null || value === undefined ? '' : String(value);
  return /[",\n\r]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function formatCents(cents) {
  const sign = cents < 0 ? '-' : '';
  const abs = Math.abs(cents);
  return `${sign}${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, '0')}`;
}

function renderTemplate(template, values) {
  return template.replace(/\{\{(\w+)\}\}/g, (match, name) => (name in values ? String(values[name]) : match));
}

// Builds the CSV text: template header, column names, one line per order.
function buildOrdersCsv(rows, template) {
  let csv = renderTemplate(template, {
    rowCount: rows.length,
    firstOrderId: rows.length ? rows[0].id : '-',
    lastOrderId: rows.length ? rows[rows.length - 1].id : '-',
  });
  csv += 'order_id,created_at,status,total_eur,username,email,customer_name\n';
  for (const row of rows) {
    const createdAt = new Date(row.created_at);
    csv += [
      row.id,
      createdAt.toISOString().replace('T', ' ').slice(0, 19),
      row.status,
      formatCents(row.total_cents),
      row.username,
      row.email,
      row.full_name,
    ].map(csvField).join(',') + '\n';
  }
  return csv;
}

// The whole /api/export?format=csv computation: a gzip-compressed CSV Buffer.
function buildExport(db, template) {
  const csv = buildOrdersCsv(loadExportRows(db), template);
  return zlib.gzipSync(csv, { level: 6 });
}

module.exports = {
  hashPassword,
  hashPasswordAsync,
  hashesEqual,
  loadMetricsRows,
  aggregateMetrics,
  serializeSummary,
  computeMetricsSummary,
  percentiles,
  buildSearchPattern,
  searchEvents,
  searchEventsJson,
  buildOrdersCsv,
  buildExport,
  SEARCH_MAX_QUERY_LENGTH,
};
