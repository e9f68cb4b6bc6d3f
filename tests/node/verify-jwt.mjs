// Verifies a JWT as an upstream would, with jose (not the library that
// signed it). Input on stdin: {"token", "jwks", "issuer", "audience"};
// prints {"header", "payload"}, or {"error"} with jose's error code.

import { createLocalJWKSet, jwtVerify } from 'jose';

const input = JSON.parse(await new Promise((resolve) => {
  let data = '';
  process.stdin.on('data', (chunk) => { data += chunk; });
  process.stdin.on('end', () => resolve(data));
}));
try {
  const { payload, protectedHeader } = await jwtVerify(input.token, createLocalJWKSet(input.jwks), {
    issuer: input.issuer,
    audience: input.audience,
    algorithms: ['ES256'],
  });
  process.stdout.write(JSON.stringify({ header: protectedHeader, payload }));
} catch (error) {
  process.stdout.write(JSON.stringify({ error: error.code || String(error) }));
}
