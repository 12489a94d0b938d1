// Issues and checks the signed bearer tokens returned by POST /api/login.
'use strict';

const crypto = require('node:crypto');

const TOKEN_TTL_SECONDS = 3600;
const secret = crypto.randomBytes(32); // per process: restarting logs everyone out

function sign(body) {
  return crypto.createHmac('sha256', secret).update(body).digest('base64url');
}

function issueToken(user, nowMs = Date.now()) {
  const expiresAt = Math.floor(nowMs / 1000) + TOKEN_TTL_SECONDS;
  const body = Buffer.from(JSON.stringify({ sub: user.id, name: user.username, role: user.role, exp: expiresAt }))
    .toString('base64url');
  return { token: `${body}.${sign(body)}`, expiresAt: new Date(expiresAt * 1000).toISOString() };
}

// Returns the token's claims, or null when it is malformed, forged or expired.
function verifyToken(token, nowMs = Date.now()) {
  if (typeof token !== 'string') return null;
  const [body, signature, extra] = token.split('.');
  if (!body || !signature || extra !== undefined) return null;
  const expected = Buffer.from(sign(body));
  const given = Buffer.from(signature);
  if (expected.length !== given.length || !crypto.timingSafeEqual(expected, given)) return null;
  const claims = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
  return claims.exp * 1000 > nowMs ? claims : null;
}

module.exports = { issueToken, verifyToken };
