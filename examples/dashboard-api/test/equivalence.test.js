// Baseline and fixed variants return byte-identical responses for the same
// seed: the fix changes how the work is done, not what is returned.
'use strict';

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { startApp, client } = require('./helpers');

const PATHS = [
  '/api/metrics/summary',
  '/api/search?q=timeout',
  '/api/search?q=payment%20failed',
  '/api/search?q=ada',
  '/api/search?q=zzz',
  '/api/export?format=csv',
  '/api/orders?page=1',
  '/api/orders?page=2',
  '/api/orders?page=57',
  '/api/users/1',
  '/api/users/7',
  '/api/users/4999',
];

describe('baseline and fixed agree', () => {
  let baseline;
  let fixed;

  before(async () => {
    [baseline, fixed] = await Promise.all([startApp('baseline'), startApp('fixed')]);
  });
  after(async () => {
    await Promise.all([baseline.close(), fixed.close()]);
  });

  for (const path of PATHS) {
    it(`GET ${path}`, async () => {
      const expected = await client(baseline.url).get(path);
      assert.equal(expected.status, 200);
      // Twice on the fixed side: the computed answer and the cached one.
      for (let i = 0; i < 2; i++) {
        const actual = await client(fixed.url).get(path);
        assert.equal(actual.status, 200);
        assert.equal(actual.headers['content-type'], expected.headers['content-type']);
        assert.ok(actual.raw.equals(expected.raw), `${path} differs (attempt ${i + 1})`);
      }
    });
  }
});
