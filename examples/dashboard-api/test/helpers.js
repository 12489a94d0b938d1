// Shared test helpers: start the app in-process on an ephemeral port and make
// raw HTTP requests against it (raw, so gzip bodies can be compared byte for byte).
'use strict';

const http = require('node:http');
const { loadConfig } = require('../src/config');
const { startServer } = require('../src/app');

async function startApp(variant, env = {}) {
  const config = loadConfig({ VARIANT: variant, PORT: '0', ...env });
  return startServer(config);
}

function request(baseUrl, method, path, body) {
  const payload = body === undefined ? null : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = http.request(new URL(path, baseUrl), {
      method,
      agent: false,
      headers: payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {},
    }, (res) => {
      const chunks = [];
      res.on('data', (chunk) => chunks.push(chunk));
      res.on('end', () => {
        const raw = Buffer.concat(chunks);
        const isJson = (res.headers['content-type'] || '').startsWith('application/json');
        resolve({ status: res.statusCode, headers: res.headers, raw, json: isJson ? JSON.parse(raw) : undefined });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.setTimeout(30_000, () => req.destroy(new Error(`timeout: ${method} ${path}`)));
    req.end(payload);
  });
}

function client(baseUrl) {
  return {
    get: (path) => request(baseUrl, 'GET', path),
    post: (path, body) => request(baseUrl, 'POST', path, body),
  };
}

module.exports = { startApp, request, client };
