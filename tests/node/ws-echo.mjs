// WebSocket echo peers for scripts/bench (npm ws).
//
//   node ws-echo.mjs server PORT
//     Plain ws:// echo server on 127.0.0.1:PORT: every message goes back
//     as it came, on any path. Prints {"port": …} once it listens.
//
//   node ws-echo.mjs client URL CONNECTIONS SECONDS
//     Opens CONNECTIONS WebSockets to URL (wss:// verified against the PEM
//     file in env CA, with env COOKIE sent as the Cookie header when set),
//     waits until all are open, then on each one loops: send a 64-byte
//     message, wait for its echo (checked byte for byte), send the next.
//     One round trip = one message out and its echo back. Counts the round
//     trips completed within SECONDS after all were open and prints
//     {"connections", "seconds", "round_trips", "per_second", "errors"}.

import fs from 'node:fs';
import { WebSocket, WebSocketServer } from 'ws';

const [mode, ...args] = process.argv.slice(2);

if (mode === 'server') {
  // No compression either side: the proxies, not zlib, are measured.
  const server = new WebSocketServer({ host: '127.0.0.1', port: Number(args[0]), perMessageDeflate: false });
  server.on('connection', (ws) => ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary })));
  server.on('listening', () => process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`));
  process.on('SIGTERM', () => process.exit(0));
} else if (mode === 'client') {
  const [url, connections, seconds] = [args[0], Number(args[1]), Number(args[2])];
  const options = { perMessageDeflate: false, headers: {} };
  if (process.env.CA) options.ca = fs.readFileSync(process.env.CA);
  if (process.env.COOKIE) options.headers.Cookie = process.env.COOKIE;
  const message = 'x'.repeat(64);
  let errors = 0;
  let roundTrips = 0;
  let running = false;

  const sockets = await Promise.all(Array.from({ length: connections }, () => new Promise((resolve, reject) => {
    const ws = new WebSocket(url, options);
    ws.once('open', () => resolve(ws));
    ws.once('unexpected-response', (req, res) => reject(new Error(`${url}: HTTP ${res.statusCode} instead of an upgrade`)));
    ws.once('error', reject);
  })));

  for (const ws of sockets) {
    ws.on('error', () => { errors += 1; });
    ws.on('message', (data) => {
      if (!running) return;
      if (data.toString() !== message) errors += 1;
      else roundTrips += 1;
      ws.send(message);
    });
  }
  const start = process.hrtime.bigint();
  running = true;
  for (const ws of sockets) ws.send(message);
  await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  running = false;
  const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  for (const ws of sockets) ws.terminate();
  process.stdout.write(`${JSON.stringify({ connections, seconds: elapsed, round_trips: roundTrips, per_second: roundTrips / elapsed, errors })}\n`);
} else {
  process.stderr.write('usage: ws-echo.mjs server PORT | client URL CONNECTIONS SECONDS\n');
  process.exit(2);
}
