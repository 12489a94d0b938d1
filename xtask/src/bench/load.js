// The bench's load: autocannon sends REQUESTS requests in all over
// CONNECTIONS connections to a loopback URL, and stops early after
// MAX_SECONDS. Prints one JSON object: responses, the time from the start
// to the last response, throughput over that time, latency percentiles in
// ms and failures.
//
//   node load.js AUTOCANNON_MODULE URL CONNECTIONS REQUESTS MAX_SECONDS
//
// autocannon's own report only notices the last response at its next
// one-second tick, which would round a run of a few seconds by up to a
// second; the times here come from its response events instead.
'use strict';

const [modulePath, url, connectionsText, requestsText, maxSecondsText] = process.argv.slice(2);
const autocannon = require(modulePath);

const host = new URL(url).hostname;
if (!/^127\.\d+\.\d+\.\d+$/.test(host) && host !== 'localhost' && host !== '[::1]') {
  console.error(`load.js: refusing ${host}: loopback targets only`);
  process.exit(2);
}

const latencies = [];
let lastResponseMs = null;
let timedOut = false;
const startMs = performance.now();

const instance = autocannon(
  { url, connections: Number(connectionsText), amount: Number(requestsText) },
  (err, result) => {
    clearTimeout(timer);
    if (err) {
      console.error(err);
      process.exit(1);
    }
    latencies.sort((a, b) => a - b);
    const percentile = (p) => latencies[Math.min(latencies.length - 1, Math.ceil((p / 100) * latencies.length) - 1)];
    const elapsedS = ((lastResponseMs ?? performance.now()) - startMs) / 1000;
    console.log(JSON.stringify({
      responses: latencies.length,
      elapsed_s: elapsedS,
      requests_per_s: latencies.length / elapsedS,
      latency_ms: { p50: percentile(50), p99: percentile(99), max: latencies[latencies.length - 1] },
      errors: result.errors,
      timeouts: result.timeouts,
      non2xx: result.non2xx,
      timed_out: timedOut,
    }));
  },
);
instance.on('response', (client, statusCode, resBytes, responseTimeMs) => {
  latencies.push(responseTimeMs);
  lastResponseMs = performance.now();
});

const timer = setTimeout(() => {
  timedOut = true;
  instance.stop();
}, Number(maxSecondsText) * 1000);
