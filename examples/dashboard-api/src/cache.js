// Read-through cache for the fixed variant: an in-process LRU with TTL
// (lru-cache), or Redis when REDIS_URL is set. Concurrent misses on one key
// share a single computation, and writes invalidate by key prefix.
'use strict';

const { LRUCache } = require('lru-cache');

const REDIS_NAMESPACE = 'dashboard-api:';

class MemoryStore {
  constructor() {
    this.kind = 'lru';
    this.lru = new LRUCache({
      max: 2000,
      maxSize: 128 * 1024 * 1024,
      sizeCalculation: (value) => Math.max(1, value.length),
      ttl: 30_000,
    });
  }

  async get(key) {
    return this.lru.get(key);
  }

  async set(key, value, ttlMs) {
    this.lru.set(key, value, { ttl: ttlMs });
  }

  async deleteKeys(keys) {
    for (const key of keys) this.lru.delete(key);
  }

  async deletePrefixes(prefixes) {
    for (const key of [...this.lru.keys()]) {
      if (prefixes.some((prefix) => key.startsWith(prefix))) this.lru.delete(key);
    }
  }

  async close() {
    this.lru.clear();
  }
}

// Values are strings or Buffers; Redis stores them as strings tagged by type.
class RedisStore {
  constructor(client) {
    this.kind = 'redis';
    this.client = client;
  }

  static async connect(url) {
    const { createClient } = require('redis');
    const client = createClient({ url });
    client.on('error', (err) => console.error(`redis: ${err.message}`));
    await client.connect();
    return new RedisStore(client);
  }

  async get(key) {
    const raw = await this.client.get(REDIS_NAMESPACE + key);
    if (raw === null || raw === undefined) return undefined;
    return raw[0] === 'b' ? Buffer.from(raw.slice(1), 'base64') : raw.slice(1);
  }

  async set(key, value, ttlMs) {
    const raw = Buffer.isBuffer(value) ? 'b' + value.toString('base64') : 's' + value;
    await this.client.set(REDIS_NAMESPACE + key, raw, { expiration: { type: 'PX', value: ttlMs } });
  }

  async deleteKeys(keys) {
    if (keys.length > 0) await this.client.del(keys.map((key) => REDIS_NAMESPACE + key));
  }

  async deletePrefixes(prefixes) {
    for (const prefix of prefixes) {
      const match = REDIS_NAMESPACE + prefix.replace(/[*?[\]\\]/g, '\\$&') + '*';
      for await (const keys of this.client.scanIterator({ MATCH: match, COUNT: 500 })) {
        if (keys.length > 0) await this.client.del(keys);
      }
    }
  }

  async close() {
    await this.client.quit();
  }
}

class ReadCache {
  constructor(store) {
    this.store = store;
    this.kind = store.kind;
    this.inflight = new Map();
    // Bumped by every invalidation. A computation that started before a write
    // must not be stored after it, or the next read would see stale data.
    this.generation = 0;
    this.stats = { hits: 0, misses: 0, shared: 0 };
  }

  async getOrCompute(key, ttlMs, compute) {
    const cached = await this.store.get(key);
    if (cached !== undefined) {
      this.stats.hits += 1;
      return cached;
    }
    const pending = this.inflight.get(key);
    if (pending) {
      this.stats.shared += 1;
      return pending;
    }
    this.stats.misses += 1;
    const generation = this.generation;
    const promise = (async () => {
      const value = await compute();
      if (this.generation === generation) await this.store.set(key, value, ttlMs);
      return value;
    })();
    this.inflight.set(key, promise);
    const forget = () => {
      if (this.inflight.get(key) === promise) this.inflight.delete(key);
    };
    promise.then(forget, forget);
    return promise;
  }

  // Drops exact keys and every key starting with one of the prefixes.
  async invalidate({ keys = [], prefixes = [] }) {
    this.generation += 1;
    for (const key of [...this.inflight.keys()]) {
      if (keys.includes(key) || prefixes.some((prefix) => key.startsWith(prefix))) this.inflight.delete(key);
    }
    await this.store.deleteKeys(keys);
    await this.store.deletePrefixes(prefixes);
  }

  async close() {
    await this.store.close();
  }
}

async function createReadCache(redisUrl) {
  const store = redisUrl ? await RedisStore.connect(redisUrl) : new MemoryStore();
  return new ReadCache(store);
}

module.exports = { createReadCache, ReadCache, MemoryStore };
