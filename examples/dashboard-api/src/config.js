// Reads the app's configuration from environment variables (with defaults).
'use strict';

const VARIANTS = ['baseline', 'fixed'];

// Cost knob for password hashing. 30k iterations of PBKDF2-SHA512 take roughly
// 30 ms on one core of the reference machine, which is the kind of "it was fine
// when we had ten users" setting inherited code tends to ship with.
const DEFAULT_PBKDF2_ITERATIONS = 30000;

function loadConfig(env = process.env) {
  const variant = (env.VARIANT || 'baseline').toLowerCase();
  if (!VARIANTS.includes(variant)) {
    throw new Error(`VARIANT must be one of ${VARIANTS.join(', ')} (got "${env.VARIANT}")`);
  }
  const port = env.PORT === undefined || env.PORT === '' ? 3000 : Number(env.PORT);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`PORT must be an integer 0-65535 (got "${env.PORT}")`);
  }
  const iterations = env.PBKDF2_ITERATIONS ? Number(env.PBKDF2_ITERATIONS) : DEFAULT_PBKDF2_ITERATIONS;
  if (!Number.isInteger(iterations) || iterations < 1) {
    throw new Error(`PBKDF2_ITERATIONS must be a positive integer (got "${env.PBKDF2_ITERATIONS}")`);
  }
  return {
    variant,
    port,
    host: '127.0.0.1', // internal tool: never listen on other interfaces
    redisUrl: env.REDIS_URL || null,
    pbkdf2Iterations: iterations,
    // Seed sizes; overridable so tests can run on smaller data if ever needed.
    seed: {
      users: Number(env.SEED_USERS || 5000),
      orders: Number(env.SEED_ORDERS || 20000),
      events: Number(env.SEED_EVENTS || 50000),
    },
  };
}

module.exports = { loadConfig, VARIANTS, DEFAULT_PBKDF2_ITERATIONS };
