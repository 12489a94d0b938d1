#!/usr/bin/env node
// Load test for the dashboard API: drives a fixed, realistic mix of requests
// with autocannon (several small instances per endpoint, run in parallel), samples the
// API process's CPU% and RSS from /proc, and writes everything as JSON.
//
//   node loadtest.js --url http://127.0.0.1:3000 --connections 200 --duration 20 \
//     --out results.json --pid <api pid> [--warmup 5] [--timeout 10]
//
// Every option can also come from the environment: TARGET_URL, CONNECTIONS,
// DURATION, OUT, API_PID, WARMUP, TIMEOUT. Only loopback targets are accepted.
//
// The run lasts warmup + duration seconds; the figures cover only requests
// sent after the warm-up. Node (libuv >= 1.45) accepts one connection per
// event-loop iteration, so on a busy server the 200 connections trickle in
// over several seconds, and a cold cache fills up: the warm-up keeps that
// start-up transient out of the steady-state numbers. Whole-run counters from
// autocannon are reported too, under "wholeRun".
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { parseArgs } = require('node:util');
const autocannon = require('autocannon');
const { createRng } = require('./src/rng');

// The mix. `weight` is the share of connections given to an endpoint; each
// connection sends its next request as soon as the previous one is answered.
// Logins and writes are additionally capped in requests per second, since
// real users do them far less often than they read.
const MIX = [
  { name: 'orders', weight: 32, method: 'GET', path: '/api/orders?page={1..20}' },
  { name: 'search', weight: 22, method: 'GET', path: '/api/search?q={term}' },
  { name: 'metrics', weight: 6, method: 'GET', path: '/api/metrics/summary' },
  { name: 'users', weight: 30, method: 'GET', path: '/api/users/{1..5000}' },
  { name: 'login', weight: 3, method: 'POST', path: '/api/login', maxRate: 5 },
  { name: 'export', weight: 4, method: 'GET', path: '/api/export?format=csv' },
  { name: 'createOrder', weight: 3, method: 'POST', path: '/api/orders', maxRate: 5 },
];

// Words people actually type into the dashboard's search box.
const SEARCH_TERMS = ['timeout', 'payment failed', 'refund', 'login', 'cart', 'export', 'error',
  'password reset', 'session', 'checkout', 'rate limited', 'hopper'];
const SKUS = Array.from({ length: 64 }, (_, i) => `SKU-${String(i + 1).padStart(4, '0')}`);

const SAMPLE_INTERVAL_MS = 500;
const CHUNK_CONNECTIONS = 5; // connections per autocannon instance
const MAX_DURATION_SECONDS = 600;
const MAX_CONNECTIONS = 2000;

function fail(message) {
  console.error(`loadtest: ${message}`);
  process.exit(2);
}

function parseOptions(argv, env) {
  const { values } = parseArgs({
    args: argv,
    options: {
      url: { type: 'string' },
      connections: { type: 'string' },
      duration: { type: 'string' },
      out: { type: 'string' },
      pid: { type: 'string' },
      timeout: { type: 'string' },
      warmup: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  });
  if (values.help) {
    console.log('usage: node loadtest.js [--url http://127.0.0.1:3000] [--connections 200] [--duration 20]\n'
      + '                         [--out results.json] [--pid API_PID] [--warmup 5] [--timeout 10]');
    process.exit(0);
  }
  const url = values.url || env.TARGET_URL || 'http://127.0.0.1:3000';
  const connections = toInt(values.connections || env.CONNECTIONS || '200', 'connections', 1, MAX_CONNECTIONS);
  const duration = toInt(values.duration || env.DURATION || '20', 'duration', 1, MAX_DURATION_SECONDS);
  const timeout = toInt(values.timeout || env.TIMEOUT || '10', 'timeout', 1, 120);
  const warmup = toInt(values.warmup || env.WARMUP || '5', 'warmup', 0, 120);
  const pidText = values.pid || env.API_PID;
  const pid = pidText ? toInt(pidText, 'pid', 1, 2 ** 22) : null;
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  const out = values.out || env.OUT || `loadtest-${stamp}.json`;
  return { url: checkLoopback(url), connections, duration, warmup, timeout, pid, out };
}

function toInt(text, name, min, max) {
  const value = Number(text);
  if (!Number.isInteger(value) || value < min || value > max) fail(`${name} must be an integer ${min}-${max}`);
  return value;
}

// This tool must never be pointed at anything but this machine.
function checkLoopback(text) {
  let url;
  try {
    url = new URL(text);
  } catch {
    fail(`invalid URL ${text}`);
  }
  if (url.protocol !== 'http:') fail('only http:// URLs are supported');
  const host = url.hostname;
  const ipv4 = host.match(/^127\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/);
  const loopback = host === 'localhost' || host === '[::1]'
    || (ipv4 !== null && ipv4.slice(1).every((octet) => Number(octet) <= 255));
  if (!loopback) fail(`refusing to load-test ${host}: only loopback targets (127.0.0.0/8, localhost, [::1]) are allowed`);
  return `${url.protocol}//${url.host}`;
}


// Splits `total` in proportion to `weights` (largest remainder method).
function splitByWeight(total, weights) {
  const weightSum = weights.reduce((a, b) => a + b, 0);
  const exact = weights.map((weight) => (total * weight) / weightSum);
  const counts = exact.map(Math.floor);
  let left = total - counts.reduce((a, b) => a + b, 0);
  const order = exact.map((value, i) => [value - Math.floor(value), i]).sort((a, b) => b[0] - a[0]);
  for (let k = 0; left > 0; k = (k + 1) % order.length, left--) counts[order[k][1]] += 1;
  return counts;
}

// Connections per endpoint. A rate-capped endpoint never gets more
// connections than its cap (autocannon would silently drop the extra ones);
// the spare connections go to the uncapped endpoints, so the total is exact.
function allocateConnections(total, mix) {
  if (total < mix.length) fail(`need at least ${mix.length} connections (one per endpoint)`);
  const counts = splitByWeight(total - mix.length, mix.map((entry) => entry.weight)).map((n) => n + 1);
  let spare = 0;
  mix.forEach((entry, i) => {
    if (entry.maxRate && counts[i] > entry.maxRate) {
      spare += counts[i] - entry.maxRate;
      counts[i] = entry.maxRate;
    }
  });
  const uncapped = mix.map((entry, i) => (entry.maxRate ? -1 : i)).filter((i) => i >= 0);
  splitByWeight(spare, uncapped.map((i) => mix[i].weight)).forEach((extra, k) => {
    counts[uncapped[k]] += extra;
  });
  return counts;
}

// Returns autocannon's setupRequest for an endpoint: fills in the varying part
// of each request (page number, search term, user id, request body).
function requestBuilder(name, rng) {
  const int = (min, max) => min + Math.floor(rng() * (max - min + 1));
  const json = { 'content-type': 'application/json' };
  switch (name) {
    case 'orders':
      return (req) => ({ ...req, path: `/api/orders?page=${int(1, 20)}` });
    case 'search':
      return (req) => ({ ...req, path: `/api/search?q=${encodeURIComponent(SEARCH_TERMS[int(0, SEARCH_TERMS.length - 1)])}` });
    case 'users':
      return (req) => ({ ...req, path: `/api/users/${int(1, 5000)}` });
    case 'login':
      return (req) => ({
        ...req,
        headers: json,
        body: JSON.stringify({ username: `user${String(int(2, 5000)).padStart(4, '0')}`, password: 'changeme' }),
      });
    case 'createOrder':
      return (req) => ({
        ...req,
        headers: json,
        body: JSON.stringify({
          userId: int(2, 5000),
          items: Array.from({ length: int(1, 3) }, () => ({ sku: SKUS[int(0, SKUS.length - 1)], quantity: int(1, 3) })),
        }),
      });
    default:
      return (req) => req;
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return round(sorted[index]);
}

function round(value, digits = 2) {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

function latencyStats(latencies) {
  const sorted = Float64Array.from(latencies).sort();
  const sum = sorted.reduce((a, b) => a + b, 0);
  return {
    p50: percentile(sorted, 50),
    p95: percentile(sorted, 95),
    p99: percentile(sorted, 99),
    max: sorted.length ? round(sorted[sorted.length - 1]) : null,
    mean: sorted.length ? round(sum / sorted.length) : null,
  };
}

// ----------------------------------------------------------- /proc sampling

function clockTicksPerSecond() {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
}

function readProcess(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  // The command name (field 2) may contain spaces: parse after its ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const rss = status.match(/^VmRSS:\s+(\d+)\s+kB/m);
  return {
    cpuTicks: Number(fields[11]) + Number(fields[12]), // utime + stime (fields 14, 15)
    threads: Number(fields[17]), // field 20
    rssKiB: rss ? Number(rss[1]) : null,
  };
}

// Samples every SAMPLE_INTERVAL_MS; CPU% is of one core, so a process using
// two cores fully shows 200%.
function startProcessSampler(pid, clock) {
  const ticksPerSecond = clockTicksPerSecond();
  const samples = [];
  let previous = { ...readProcess(pid), at: clock.now() };
  const timer = setInterval(() => {
    let current;
    try {
      current = { ...readProcess(pid), at: clock.now() };
    } catch {
      return; // the process went away; keep what we have
    }
    const seconds = (current.at - previous.at) / 1000;
    samples.push({
      tSeconds: round(current.at / 1000),
      warmup: current.at <= clock.warmupEndMs,
      cpuPercent: round(((current.cpuTicks - previous.cpuTicks) / ticksPerSecond / seconds) * 100, 1),
      rssMiB: current.rssKiB === null ? null : round(current.rssKiB / 1024, 1),
      threads: current.threads,
    });
    previous = current;
  }, SAMPLE_INTERVAL_MS);
  return function stop() {
    clearInterval(timer);
    const measured = samples.filter((sample) => !sample.warmup);
    const cpu = measured.map((sample) => sample.cpuPercent);
    const rss = measured.map((sample) => sample.rssMiB).filter((value) => value !== null);
    const avg = (list) => (list.length ? round(list.reduce((a, b) => a + b, 0) / list.length, 1) : null);
    return {
      pid,
      sampleIntervalMs: SAMPLE_INTERVAL_MS,
      clockTicksPerSecond: ticksPerSecond,
      cpuPercent: { avg: avg(cpu), max: cpu.length ? Math.max(...cpu) : null },
      rssMiB: { avg: avg(rss), max: rss.length ? Math.max(...rss) : null },
      samples,
    };
  };
}

// ------------------------------------------------------------------- run

async function fetchHealth(url) {
  try {
    const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(5000) });
    return res.ok ? await res.json() : null;
  } catch {
    return null;
  }
}

// The connections of an endpoint are spread over several small autocannon
// instances, started round-robin across endpoints. A saturated Node server
// accepts one new connection per event-loop iteration, so connections opened
// last may wait for seconds (or never get in); interleaving spreads that
// penalty evenly instead of starving whichever endpoint was started last.
function planChunks(mix, connections) {
  return mix.map((entry, i) => {
    // A rate-capped endpoint has at most maxRate connections: one instance
    // keeps its overall rate exact.
    if (entry.maxRate) return [connections[i]];
    const chunks = [];
    for (let left = connections[i]; left > 0; left -= CHUNK_CONNECTIONS) chunks.push(Math.min(CHUNK_CONNECTIONS, left));
    return chunks;
  });
}

// Runs one autocannon instance. Into `measured` it adds the latency and status
// code of every request sent after the warm-up, and the errors and timeouts
// that happen after it (so a request stuck since the start still counts as a
// timeout). Resolves to autocannon's own result for the whole run.
function runChunk(url, entry, connections, options, rng, clock, measured) {
  const instance = autocannon({
    url,
    title: entry.name,
    connections,
    duration: options.warmup + options.duration,
    timeout: options.timeout,
    ...(entry.maxRate ? { overallRate: entry.maxRate } : {}),
    requests: [{ method: entry.method, path: entry.path.replace(/\{.*\}/, '1'), setupRequest: requestBuilder(entry.name, rng) }],
  });
  instance.on('response', (client, statusCode, resBytes, responseTime) => {
    if (clock.now() - responseTime < clock.warmupEndMs) return;
    measured.latencies.push(responseTime);
    measured.statusCodes[statusCode] = (measured.statusCodes[statusCode] || 0) + 1;
  });
  instance.on('reqError', (err) => {
    if (clock.now() < clock.warmupEndMs) return;
    measured.errors += 1; // autocannon counts timeouts as errors too
    if (err && err.message === 'request timed out') measured.timeouts += 1;
  });
  return instance;
}

function endpointStats(measured, seconds) {
  const non2xx = Object.entries(measured.statusCodes)
    .filter(([code]) => code < 200 || code > 299)
    .reduce((sum, [, count]) => sum + count, 0);
  return {
    requests: measured.latencies.length,
    requestsPerSecond: round(measured.latencies.length / seconds),
    latencyMs: latencyStats(measured.latencies),
    errors: measured.errors,
    timeouts: measured.timeouts,
    non2xx,
    statusCodes: measured.statusCodes,
  };
}

// `measured[i]` and `results[i]` (autocannon results of its instances) belong to MIX[i].
function summarize(measured, results, measuredSeconds) {
  const endpoints = {};
  const all = { latencies: [], statusCodes: {}, errors: 0, timeouts: 0 };
  const wholeRun = { requests: 0, errors: 0, timeouts: 0, non2xx: 0, bytesRead: 0, endpoints: {} };
  MIX.forEach((entry, i) => {
    const counts = { requests: 0, errors: 0, timeouts: 0, non2xx: 0, bytesRead: 0 };
    let connections = 0;
    for (const result of results[i]) {
      connections += result.connections;
      counts.requests += result.requests.total;
      counts.errors += result.errors;
      counts.timeouts += result.timeouts;
      counts.non2xx += result.non2xx;
      counts.bytesRead += result.throughput.total;
    }
    endpoints[entry.name] = {
      method: entry.method,
      path: entry.path,
      connections,
      maxRatePerSecond: entry.maxRate || null,
      ...endpointStats(measured[i], measuredSeconds),
    };
    for (const latency of measured[i].latencies) all.latencies.push(latency);
    for (const [code, count] of Object.entries(measured[i].statusCodes)) {
      all.statusCodes[code] = (all.statusCodes[code] || 0) + count;
    }
    all.errors += measured[i].errors;
    all.timeouts += measured[i].timeouts;
    wholeRun.endpoints[entry.name] = counts;
    for (const key of Object.keys(counts)) wholeRun[key] += counts[key];
  });
  return { totals: endpointStats(all, measuredSeconds), endpoints, wholeRun };
}

function printSummary(report) {
  const { totals, endpoints } = report;
  const pad = (value, width) => String(value ?? '-').padStart(width);
  console.log(`\n${report.target.url} variant=${report.target.variant ?? '?'} connections=${report.config.connections} `
    + `duration=${report.config.durationSeconds}s (after ${report.config.warmupSeconds}s warm-up)`);
  console.log(`${'endpoint'.padEnd(12)}${pad('conns', 6)}${pad('req/s', 9)}${pad('p50 ms', 10)}${pad('p95 ms', 10)}`
    + `${pad('p99 ms', 10)}${pad('errors', 8)}${pad('timeouts', 10)}${pad('non2xx', 8)}`);
  const rows = [...Object.entries(endpoints), ['TOTAL', { ...totals, connections: report.config.connections }]];
  for (const [name, stats] of rows) {
    console.log(`${name.padEnd(12)}${pad(stats.connections, 6)}${pad(stats.requestsPerSecond, 9)}`
      + `${pad(stats.latencyMs.p50, 10)}${pad(stats.latencyMs.p95, 10)}${pad(stats.latencyMs.p99, 10)}`
      + `${pad(stats.errors, 8)}${pad(stats.timeouts, 10)}${pad(stats.non2xx, 8)}`);
  }
  if (report.process) {
    console.log(`API process ${report.process.pid}: CPU avg ${report.process.cpuPercent.avg}% `
      + `max ${report.process.cpuPercent.max}% (100% = one core), `
      + `RSS avg ${report.process.rssMiB.avg} MiB max ${report.process.rssMiB.max} MiB`);
  }
  console.log(`results written to ${report.outputPath}`);
}

async function main() {
  const options = parseOptions(process.argv.slice(2), process.env);
  const healthBefore = await fetchHealth(options.url);
  if (!healthBefore) fail(`no healthy API at ${options.url}/health`);
  if (options.pid !== null && !fs.existsSync(`/proc/${options.pid}/stat`)) fail(`no process ${options.pid}`);

  const connections = allocateConnections(options.connections, MIX);
  const rng = createRng(42);
  const origin = performance.now();
  const clock = { now: () => performance.now() - origin, warmupEndMs: options.warmup * 1000 };
  const stopSampler = options.pid !== null ? startProcessSampler(options.pid, clock) : null;
  const startedAt = new Date();
  console.log(`load testing ${options.url} (variant=${healthBefore.variant}) with ${options.connections} `
    + `connections for ${options.warmup}s warm-up + ${options.duration}s ...`);

  const plans = planChunks(MIX, connections);
  const measured = MIX.map(() => ({ latencies: [], statusCodes: {}, errors: 0, timeouts: 0 }));
  const instances = MIX.map(() => []);
  for (let round = 0; round < Math.max(...plans.map((chunks) => chunks.length)); round++) {
    MIX.forEach((entry, i) => {
      if (round < plans[i].length) {
        instances[i].push(runChunk(options.url, entry, plans[i][round], options, rng, clock, measured[i]));
      }
    });
  }
  const results = await Promise.all(instances.map((list) => Promise.all(list)));

  const elapsedMs = clock.now();
  const measuredSeconds = Math.max(0.001, (elapsedMs - clock.warmupEndMs) / 1000);
  const processStats = stopSampler ? stopSampler() : null;
  const healthAfter = await fetchHealth(options.url);
  const report = {
    schemaVersion: 1,
    startedAt: startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    elapsedSeconds: round(elapsedMs / 1000),
    measuredSeconds: round(measuredSeconds),
    outputPath: path.resolve(options.out),
    target: { url: options.url, variant: healthBefore.variant, pid: options.pid ?? healthBefore.pid ?? null },
    config: {
      connections: options.connections,
      durationSeconds: options.duration,
      warmupSeconds: options.warmup,
      timeoutSeconds: options.timeout,
      mix: MIX.map((entry, i) => ({
        name: entry.name, method: entry.method, path: entry.path, weight: entry.weight,
        connections: connections[i], maxRatePerSecond: entry.maxRate || null,
      })),
    },
    ...summarize(measured, results, measuredSeconds),
    process: processStats,
    healthAfter,
  };
  fs.writeFileSync(options.out, JSON.stringify(report, null, 2) + '\n');
  printSummary(report);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
