// Every route answers correctly in both variants (baseline and fixed).
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const zlib = require('node:zlib');
const { startApp, client } = require('./helpers');
const { verifyToken } = require('../src/tokens');
const { DEFAULT_PASSWORD, ADMIN_PASSWORD } = require('../src/db');

for (const variant of ['baseline', 'fixed']) {
  describe(`routes (${variant})`, () => {
    let app;
    let api;

    before(async () => {
      app = await startApp(variant);
      api = client(app.url);
    });
    after(() => app.close());

    it('GET /health reports the variant', async () => {
      const res = await api.get('/health');
      assert.equal(res.status, 200);
      assert.equal(res.json.status, 'ok');
      assert.equal(res.json.variant, variant);
      assert.equal(res.json.pid, process.pid);
    });

    it('POST /api/login returns a valid token for good credentials', async () => {
      const res = await api.post('/api/login', { username: 'user0042', password: DEFAULT_PASSWORD });
      assert.equal(res.status, 200);
      assert.deepEqual(res.json.user, { id: 42, username: 'user0042', role: res.json.user.role });
      const claims = verifyToken(res.json.token);
      assert.equal(claims.sub, 42);
      assert.ok(Date.parse(res.json.expiresAt) > Date.now());

      const admin = await api.post('/api/login', { username: 'admin', password: ADMIN_PASSWORD });
      assert.equal(admin.status, 200);
      assert.equal(admin.json.user.role, 'admin');
    });

    it('POST /api/login rejects bad credentials and bad input', async () => {
      assert.equal((await api.post('/api/login', { username: 'user0042', password: 'wrong' })).status, 401);
      assert.equal((await api.post('/api/login', { username: 'admin', password: DEFAULT_PASSWORD })).status, 401);
      assert.equal((await api.post('/api/login', { username: 'nobody', password: 'x' })).status, 401);
      assert.equal((await api.post('/api/login', { username: 'user0042' })).status, 400);
      assert.equal((await api.post('/api/login', { username: 1, password: 2 })).status, 400);
    });

    it('GET /api/metrics/summary aggregates the data', async () => {
      const res = await api.get('/api/metrics/summary');
      assert.equal(res.status, 200);
      assert.ok(res.raw.length > 150_000, `summary is ${res.raw.length} bytes`);
      const summary = res.json;
      assert.ok(summary.totals.orders > 4000 && summary.totals.events > 10000);
      assert.ok(summary.daily.length >= 90 && summary.daily.length <= 91, `${summary.daily.length} days`);
      assert.equal(summary.daily.reduce((sum, day) => sum + day.orderCount, 0), summary.totals.orders);
      assert.equal(summary.eventTypes.length, 8);
      for (const type of summary.eventTypes) {
        assert.ok(type.durationMs.p50 <= type.durationMs.p95 && type.durationMs.p95 <= type.durationMs.p99);
      }
      assert.equal(summary.topCustomers.length, 1000);
      for (let i = 1; i < summary.topCustomers.length; i++) {
        assert.ok(summary.topCustomers[i - 1].revenueCents >= summary.topCustomers[i].revenueCents);
      }
      assert.equal(summary.eventsByHourUtc.reduce((a, b) => a + b, 0), summary.totals.events);
    });

    it('GET /api/search finds events and users', async () => {
      const res = await api.get('/api/search?q=timeout');
      assert.equal(res.status, 200);
      assert.equal(res.json.query, 'timeout');
      assert.equal(res.json.scanned.events, 2000);
      assert.ok(res.json.totalMatches.events > 0);
      assert.ok(res.json.events.length > 0 && res.json.events.length <= 50);
      for (const event of res.json.events) assert.match(event.message, /timeout/i);

      const people = await api.get('/api/search?q=hopper');
      assert.ok(people.json.totalMatches.users > 0);
      for (const user of people.json.users) assert.match(`${user.email} ${user.fullName}`, /hopper/i);
    });

    it('GET /api/search validates q and treats it literally', async () => {
      assert.equal((await api.get('/api/search')).status, 400);
      assert.equal((await api.get(`/api/search?q=${'x'.repeat(65)}`)).status, 400);
      const res = await api.get(`/api/search?q=${encodeURIComponent('a+(b')}`);
      assert.equal(res.status, 200);
      assert.equal(res.json.totalMatches.events, 0);
    });

    it('GET /api/export?format=csv returns a gzipped CSV', async () => {
      const res = await api.get('/api/export?format=csv');
      assert.equal(res.status, 200);
      assert.equal(res.headers['content-encoding'], 'gzip');
      assert.match(res.headers['content-type'], /^text\/csv/);
      const lines = zlib.gunzipSync(res.raw).toString('utf8').trimEnd().split('\n');
      const rowCount = Number(lines[1].match(/rows: (\d+)/)[1]);
      assert.ok(rowCount > 4000);
      const header = lines.indexOf('order_id,created_at,status,total_eur,username,email,customer_name');
      assert.equal(header, 3);
      assert.equal(lines.length - header - 1, rowCount);
      assert.match(lines[header + 1], /^\d+,2026-\d\d-\d\d \d\d:\d\d:\d\d,\w+,\d+\.\d\d,user\d{4},/);
      assert.equal((await api.get('/api/export?format=xml')).status, 400);
    });

    it('GET /api/orders pages through orders with users and items', async () => {
      const res = await api.get('/api/orders?page=2');
      assert.equal(res.status, 200);
      const { page, pageSize, totalOrders, totalPages, orders } = res.json;
      assert.equal(page, 2);
      assert.equal(pageSize, 10);
      assert.ok(totalOrders >= 20000);
      assert.equal(totalPages, Math.ceil(totalOrders / 10));
      assert.equal(orders.length, 10);
      for (let i = 1; i < orders.length; i++) assert.ok(orders[i - 1].id > orders[i].id);
      for (const order of orders) {
        assert.ok(order.user && order.user.username);
        assert.ok(order.items.length >= 1);
        const sum = order.items.reduce((total, item) => total + item.quantity * item.unitPriceCents, 0);
        assert.equal(sum, order.totalCents);
      }
      assert.equal((await api.get('/api/orders')).json.page, 1);
      assert.deepEqual((await api.get('/api/orders?page=999999')).json.orders, []);
      assert.equal((await api.get('/api/orders?page=0')).status, 400);
      assert.equal((await api.get('/api/orders?page=abc')).status, 400);
    });

    it('POST /api/orders creates an order that the next reads show', async () => {
      const res = await api.post('/api/orders', { userId: 7, items: [{ sku: 'SKU-0003', quantity: 2 }, { sku: 'SKU-0010', quantity: 1 }] });
      assert.equal(res.status, 201);
      const order = res.json;
      assert.equal(order.status, 'pending');
      assert.equal(order.user.id, 7);
      assert.equal(order.items.length, 2);
      assert.equal(order.totalCents, order.items.reduce((t, item) => t + item.quantity * item.unitPriceCents, 0));

      const first = (await api.get('/api/orders?page=1')).json.orders[0];
      assert.deepEqual(first, order);
      const user = (await api.get('/api/users/7')).json;
      assert.equal(user.recentOrders[0].id, order.id);
    });

    it('POST /api/orders validates its input', async () => {
      assert.equal((await api.post('/api/orders', { userId: 7, items: [] })).status, 400);
      assert.equal((await api.post('/api/orders', { userId: 7, items: [{ sku: 'NOPE', quantity: 1 }] })).status, 400);
      assert.equal((await api.post('/api/orders', { userId: 7, items: [{ sku: 'SKU-0001', quantity: 0 }] })).status, 400);
      assert.equal((await api.post('/api/orders', { userId: 999999, items: [{ sku: 'SKU-0001', quantity: 1 }] })).status, 400);
      assert.equal((await api.post('/api/orders', { items: [{ sku: 'SKU-0001', quantity: 1 }] })).status, 400);
    });

    it('GET /api/users/:id returns a profile, 404 or 400', async () => {
      const res = await api.get('/api/users/9');
      assert.equal(res.status, 200);
      assert.equal(res.json.id, 9);
      assert.equal(res.json.username, 'user0009');
      assert.ok(res.json.stats.orders >= res.json.recentOrders.length);
      assert.ok(res.json.recentEvents.length <= 5);
      assert.equal((await api.get('/api/users/999999')).status, 404);
      assert.equal((await api.get('/api/users/abc')).status, 400);
    });

    it('unknown routes are 404', async () => {
      assert.equal((await api.get('/api/nope')).status, 404);
    });
  });
}
