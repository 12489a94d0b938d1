// Database reads and writes for the orders and users endpoints, in two
// flavours: the inherited N+1 code (baseline) and the batched code that uses
// statements prepared once (fixed). Both return identically shaped objects.
'use strict';

const ORDERS_PAGE_SIZE = 10;

function shapeOrder(order, user, items) {
  return {
    id: order.id,
    status: order.status,
    totalCents: order.total_cents,
    createdAt: order.created_at,
    user: user ? { id: user.id, username: user.username, email: user.email } : null,
    items: items.map(shapeItem),
  };
}

function shapeItem(item) {
  return {
    sku: item.sku,
    productName: item.product_name,
    quantity: item.quantity,
    unitPriceCents: item.unit_price_cents,
  };
}

function pageInfo(page, totalOrders) {
  return {
    page,
    pageSize: ORDERS_PAGE_SIZE,
    totalOrders,
    totalPages: Math.ceil(totalOrders / ORDERS_PAGE_SIZE),
  };
}

// Baseline: one query for the page, then two more per order, each prepared
// from scratch; with no index on order_items.order_id every one of those item
// queries scans the whole order_items table.
function loadOrdersWithItems(db, page) {
  const totalOrders = db.prepare('SELECT COUNT(*) FROM orders').pluck().get();
  const orders = db.prepare(
    'SELECT id, user_id, status, total_cents, created_at FROM orders ORDER BY id DESC LIMIT ? OFFSET ?',
  ).all(ORDERS_PAGE_SIZE, (page - 1) * ORDERS_PAGE_SIZE);
  const result = [];
  for (const order of orders) {
    const user = db.prepare('SELECT id, username, email FROM users WHERE id = ?').get(order.user_id);
    const items = db.prepare(
      'SELECT sku, product_name, quantity, unit_price_cents FROM order_items WHERE order_id = ? ORDER BY id',
    ).all(order.id);
    result.push(shapeOrder(order, user, items));
  }
  return { ...pageInfo(page, totalOrders), orders: result };
}

// Fixed: statements prepared once per connection, reused for every request.
function prepareStatements(db) {
  return {
    countOrders: db.prepare('SELECT COUNT(*) FROM orders').pluck(),
    ordersPage: db.prepare(`
      SELECT o.id, o.user_id, o.status, o.total_cents, o.created_at,
             u.id AS u_id, u.username AS u_username, u.email AS u_email
      FROM orders o LEFT JOIN users u ON u.id = o.user_id
      ORDER BY o.id DESC LIMIT ? OFFSET ?`),
    // One query for the items of the whole page; json_each turns the JSON
    // array parameter into a set, so the statement text never changes.
    itemsForOrders: db.prepare(`
      SELECT order_id, sku, product_name, quantity, unit_price_cents FROM order_items
      WHERE order_id IN (SELECT value FROM json_each(?)) ORDER BY id`),
    userById: db.prepare('SELECT id, username, email, full_name, role, created_at FROM users WHERE id = ?'),
    userByName: db.prepare(
      'SELECT id, username, role, password_salt, password_hash, password_iterations FROM users WHERE username = ?'),
    userOrderStats: db.prepare(`SELECT COUNT(*) AS orders,
      COALESCE(SUM(CASE WHEN status NOT IN ('cancelled', 'refunded') THEN total_cents ELSE 0 END), 0) AS revenue_cents
      FROM orders WHERE user_id = ?`),
    userEventCount: db.prepare('SELECT COUNT(*) FROM events WHERE user_id = ?').pluck(),
    userRecentOrders: db.prepare(
      'SELECT id, status, total_cents, created_at FROM orders WHERE user_id = ? ORDER BY id DESC LIMIT 5'),
    userRecentEvents: db.prepare(
      'SELECT id, type, message, created_at FROM events WHERE user_id = ? ORDER BY id DESC LIMIT 5'),
    insertOrder: db.prepare('INSERT INTO orders (user_id, status, total_cents, created_at) VALUES (?, ?, ?, ?)'),
    insertItem: db.prepare(`INSERT INTO order_items (order_id, sku, product_name, quantity, unit_price_cents)
      VALUES (?, ?, ?, ?, ?)`),
    orderById: db.prepare('SELECT id, user_id, status, total_cents, created_at FROM orders WHERE id = ?'),
    itemsForOrder: db.prepare(
      'SELECT sku, product_name, quantity, unit_price_cents FROM order_items WHERE order_id = ? ORDER BY id'),
  };
}

function loadOrdersPageBatched(statements, page) {
  const totalOrders = statements.countOrders.get();
  const rows = statements.ordersPage.all(ORDERS_PAGE_SIZE, (page - 1) * ORDERS_PAGE_SIZE);
  const itemsByOrder = new Map(rows.map((row) => [row.id, []]));
  if (rows.length > 0) {
    for (const item of statements.itemsForOrders.all(JSON.stringify(rows.map((row) => row.id)))) {
      itemsByOrder.get(item.order_id).push(item);
    }
  }
  const orders = rows.map((row) => shapeOrder(row,
    row.u_id === null ? null : { id: row.u_id, username: row.u_username, email: row.u_email },
    itemsByOrder.get(row.id)));
  return { ...pageInfo(page, totalOrders), orders };
}

function shapeUserProfile(user, stats, eventCount, recentOrders, recentEvents) {
  return {
    id: user.id,
    username: user.username,
    email: user.email,
    fullName: user.full_name,
    role: user.role,
    createdAt: user.created_at,
    stats: { orders: stats.orders, revenueCents: stats.revenue_cents, events: eventCount },
    recentOrders: recentOrders.map((o) => ({ id: o.id, status: o.status, totalCents: o.total_cents, createdAt: o.created_at })),
    recentEvents: recentEvents.map((e) => ({ id: e.id, type: e.type, message: e.message, createdAt: e.created_at })),
  };
}

// Baseline: fresh statements each call; without indexes on orders.user_id and
// events.user_id the per-user queries scan whole tables.
function loadUserProfile(db, userId) {
  const user = db.prepare('SELECT id, username, email, full_name, role, created_at FROM users WHERE id = ?').get(userId);
  if (!user) return null;
  const stats = db.prepare(`SELECT COUNT(*) AS orders,
    COALESCE(SUM(CASE WHEN status NOT IN ('cancelled', 'refunded') THEN total_cents ELSE 0 END), 0) AS revenue_cents
    FROM orders WHERE user_id = ?`).get(userId);
  const eventCount = db.prepare('SELECT COUNT(*) FROM events WHERE user_id = ?').pluck().get(userId);
  const recentOrders = db.prepare(
    'SELECT id, status, total_cents, created_at FROM orders WHERE user_id = ? ORDER BY id DESC LIMIT 5').all(userId);
  const recentEvents = db.prepare(
    'SELECT id, type, message, created_at FROM events WHERE user_id = ? ORDER BY id DESC LIMIT 5').all(userId);
  return shapeUserProfile(user, stats, eventCount, recentOrders, recentEvents);
}

function loadUserProfileFast(statements, userId) {
  const user = statements.userById.get(userId);
  if (!user) return null;
  return shapeUserProfile(user,
    statements.userOrderStats.get(userId),
    statements.userEventCount.get(userId),
    statements.userRecentOrders.all(userId),
    statements.userRecentEvents.all(userId));
}

// Inserts an order and its items in one transaction; returns the new order in
// the same shape as the orders list. `input` is already validated.
function createOrder(db, statements, input, createdAt) {
  const write = db.transaction(() => {
    const total = input.items.reduce((sum, item) => sum + item.quantity * item.unitPriceCents, 0);
    const { lastInsertRowid } = statements.insertOrder.run(input.userId, 'pending', total, createdAt);
    for (const item of input.items) {
      statements.insertItem.run(lastInsertRowid, item.sku, item.productName, item.quantity, item.unitPriceCents);
    }
    return Number(lastInsertRowid);
  });
  const orderId = write();
  const order = statements.orderById.get(orderId);
  const user = statements.userById.get(order.user_id);
  return shapeOrder(order, user, statements.itemsForOrder.all(orderId));
}

module.exports = {
  ORDERS_PAGE_SIZE,
  loadOrdersWithItems,
  loadOrdersPageBatched,
  prepareStatements,
  loadUserProfile,
  loadUserProfileFast,
  createOrder,
};
