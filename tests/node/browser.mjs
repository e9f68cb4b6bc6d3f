// Drives a real headless Chromium (Debian's, through playwright-core) for
// authgate's end-to-end tests. Reads {"origin": …, "steps": [...]} as JSON
// on stdin, runs the steps in one browser context (one cookie jar, as one
// person's browser), prints a JSON array with one result per step.
//
// Steps:
//   {"goto": url}                    → {status, url, text}
//   {"login": user}                  fill the provider's login form on the
//                                    current page, wait to be back on origin
//                                    → {status, url, text}
//   {"tabs": [url, …], "user": u}    open each url in its own tab at once,
//                                    then sign in on each → [{status, url, text}]
//   {"websocket": url, "send": msg}  → {messages: [first two messages]}
//   {"sign_out": true | path}        the gateway's sign-out button (on the
//                                    page at path, else /oauth2/sign_out),
//                                    then the provider's logout confirmation
//                                    → {status, url, text}
//   {"provider_sign_out": url}       the provider's own sign-out (its
//                                    end_session URL) and its confirmation,
//                                    as when the user signs out elsewhere
//                                    → {status, url, text}
//   {"cancel": true}                 the provider's "Cancel" link on its
//                                    login page → {status, url, text}
//   {"replay_callback": true}        load the last sign-in callback URL
//                                    again (a replayed code and state)
//                                    → {status, url, text}
//   {"cookies": true}                → [{name, value, secure, httpOnly, sameSite}]

import { chromium } from 'playwright-core';

const input = JSON.parse(await new Promise((resolve) => {
  let data = '';
  process.stdin.on('data', (chunk) => { data += chunk; });
  process.stdin.on('end', () => resolve(data));
}));
const origin = input.origin;
const TIMEOUT = 20000;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const context = await browser.newContext({ ignoreHTTPSErrors: true });
context.setDefaultTimeout(TIMEOUT);

// The last top-level document each page received, to read its body.
function track(page) {
  const state = { last: null };
  page.on('response', (response) => {
    if (response.request().isNavigationRequest() && response.frame() === page.mainFrame()) {
      state.last = response;
    }
  });
  return state;
}

async function snapshot(page, tracked) {
  const response = tracked.last;
  let text = '';
  try { text = response ? await response.text() : await page.content(); } catch { text = await page.content(); }
  return { status: response ? response.status() : 0, url: page.url(), text };
}

async function signIn(page, tracked, user) {
  await page.waitForSelector('input[name="login"]');
  await page.fill('input[name="login"]', user);
  await page.fill('input[name="password"]', 'any password');
  await Promise.all([
    page.waitForURL((url) => url.toString().startsWith(origin), { waitUntil: 'load' }),
    page.click('button[type="submit"]'),
  ]);
  return snapshot(page, tracked);
}

const page = await context.newPage();
const tracked = track(page);
let lastCallback = null;
context.on('request', (request) => {
  if (request.url().startsWith(`${origin}/api/oidc/callback`)) lastCallback = request.url();
});
const results = [];
try {
  for (const step of input.steps) {
    if (step.goto) {
      await page.goto(step.goto, { waitUntil: 'load' });
      results.push(await snapshot(page, tracked));
    } else if (step.login) {
      results.push(await signIn(page, tracked, step.login));
    } else if (step.tabs) {
      const tabs = await Promise.all(step.tabs.map(async (url) => {
        const tab = await context.newPage();
        const t = track(tab);
        await tab.goto(url, { waitUntil: 'load' });
        return { tab, t };
      }));
      // Every tab has been sent to the provider before any finishes.
      results.push(await Promise.all(tabs.map(({ tab, t }) => signIn(tab, t, step.user))));
    } else if (step.websocket) {
      results.push(await page.evaluate(({ url, send }) => new Promise((resolve, reject) => {
        const ws = new WebSocket(url);
        const messages = [];
        ws.onopen = () => ws.send(send);
        ws.onmessage = (event) => {
          messages.push(event.data);
          if (messages.length === 2) { ws.close(); resolve({ messages }); }
        };
        ws.onerror = () => reject(new Error(`websocket ${url} failed`));
        setTimeout(() => resolve({ messages }), 10000);
      }), { url: step.websocket, send: step.send }));
    } else if (step.sign_out) {
      const at = typeof step.sign_out === 'string' ? step.sign_out : '/oauth2/sign_out';
      await page.goto(`${origin}${at}`, { waitUntil: 'load' });
      await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
      // The provider asks to confirm, then returns to the gateway.
      if (!page.url().startsWith(origin)) {
        await Promise.all([
          page.waitForURL((url) => url.toString().startsWith(origin), { waitUntil: 'load' }),
          page.click('button[name="logout"]'),
        ]);
      }
      results.push(await snapshot(page, tracked));
    } else if (step.provider_sign_out) {
      await page.goto(step.provider_sign_out, { waitUntil: 'load' });
      await Promise.all([page.waitForNavigation({ waitUntil: 'load' }), page.click('button[name="logout"]')]);
      results.push(await snapshot(page, tracked));
    } else if (step.cancel) {
      await Promise.all([
        page.waitForURL((url) => url.toString().startsWith(origin), { waitUntil: 'load' }),
        page.click('a[href*="abort"]'),
      ]);
      results.push(await snapshot(page, tracked));
        } else if (step.replay_callback) {
      await page.goto(lastCallback, { waitUntil: 'load' });
      results.push(await snapshot(page, tracked));
    } else if (step.cookies) {
      results.push((await context.cookies()).map(({ name, value, secure, httpOnly, sameSite }) => ({ name, value, secure, httpOnly, sameSite })));
    } else {
      throw new Error(`unknown step ${JSON.stringify(step)}`);
    }
  }
  process.stdout.write(JSON.stringify(results));
} catch (error) {
  process.stdout.write(JSON.stringify({ error: String(error), results, url: page.url(), page: await page.content() }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
