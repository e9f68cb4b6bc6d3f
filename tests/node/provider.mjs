// A real OpenID provider (npm oidc-provider, OpenID Certified) shaped like
// Microsoft Entra ID, for authgate's end-to-end tests:
//   issuer    https://127.0.0.1:<port>/<tenant>/v2.0
//   endpoints /<tenant>/oauth2/v2.0/{authorize,token,logout,backchannel},
//             /<tenant>/discovery/v2.0/keys
//   claims    oid, tid, ver, preferred_username, name, email, groups, roles
//   access tokens for this app's API (resource=api://…) are JWTs shaped as
//   Entra's: audience the client id, delegated permissions in `scp`;
//   app-only ones (client_credentials) say `idtyp: app` and carry app roles.
//   For resource=api://<client id> they are shaped as Entra's v1 access
//   tokens instead: iss https://sts.windows.net/<tenant>/, ver 1.0, the
//   user in upn and unique_name, the caller in appid.
//   A user's delegated token comes from CIBA (poll mode), the user's
//   approval standing in for them at once (login_hint = the login name).
//   Microsoft Graph's group look-up, under /graph (what oidc.graph_url
//   names): POST /graph/v1.0/users/{oid}/getMemberGroups with an app-only
//   token asked for with scope <origin>/graph/.default, which carries the
//   application permissions User.Read.All and GroupMember.Read.All unless
//   GRAPH_PERMISSIONS=none; GRAPH_THROTTLE=1 answers 429 (Retry-After:
//   30), GRAPH_THROTTLE=once its first look-up only (Retry-After: 1), and
//   again a look-up that comes before that second is up. "overage…"
//   users are in 250 groups there.
//   Step-up: an authorization request's `claims` parameter asking for
//   `acrs` (Entra's authentication contexts) gets them in the ID token, as
//   if the user passed the Conditional Access policy; "nomfa…" users never
//   do.
// Consent is granted by the "tenant admin" up front, as in Entra.
//
// Environment: PORT (0 = any), TENANT, CLIENT_ID, CLIENT_SECRET or
// CLIENT_AUTH=private_key_jwt with CLIENT_PUBLIC_KEY (PEM file),
// REDIRECT_URI, POST_LOGOUT_REDIRECT_URI, TLS_CERT, TLS_KEY (PEM files).
// Prints one JSON line {"issuer": …, "port": …, "kid": …} once it listens.
// Each start makes a new signing key, so restarting it rolls the keys.

import https from 'node:https';
import fs from 'node:fs';
import crypto from 'node:crypto';
import Provider from 'oidc-provider';
import { generateKeyPair, exportJWK, jwtVerify } from 'jose';

const env = process.env;
const tenant = env.TENANT;

const { publicKey, privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingKey = { ...(await exportJWK(privateKey)), kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };

// Users seen so far, by object id, for the Graph look-ups.
const users = new Map();

// Users the tests log in as; the login name typed into the form selects one.
function claimsFor(login) {
  const [name, domain = 'contoso.example'] = login.split('@');
    // "many…" users are in 150 groups (a session split across cookies),
  // "overage…" users in more than Entra lists (see below).
  const groupCount = name.startsWith('overage') ? 0 : name.startsWith('many') ? 150 : 2;
  const claims = {
    sub: crypto.createHash('sha256').update(`${env.CLIENT_ID}/${login}`).digest('base64url'),
    oid: crypto.createHash('md5').update(login).digest('hex').replace(/^(.{8})(.{4})(.{4})(.{4})(.{12})$/, '$1-$2-$3-$4-$5'),
    tid: tenant,
    ver: '2.0',
    name: `${name[0].toUpperCase()}${name.slice(1)} Example`,
    preferred_username: `${name}@${domain}`,
    email: `${name}@${domain}`,
    groups: Array.from({ length: groupCount }, (_, i) => `group-${name}-${i}`),
    roles: name === 'admin' ? ['Console.Admin'] : ['Console.User'],
  };
  users.set(claims.oid, name);
  if (name.startsWith('overage')) {
    // Entra's shape for users in more than 200 groups.
    claims._claim_names = { groups: 'src1' };
    claims._claim_sources = { src1: { endpoint: `https://graph.microsoft.com/v1.0/users/${claims.oid}/getMemberObjects` } };
  }
  return claims;
}

const server = https.createServer({
  cert: fs.readFileSync(env.TLS_CERT),
  key: fs.readFileSync(env.TLS_KEY),
});
await new Promise((resolve) => server.listen(Number(env.PORT || 0), '127.0.0.1', resolve));
const port = server.address().port;
const issuer = `https://127.0.0.1:${port}/${tenant}/v2.0`;
const graph = `https://127.0.0.1:${port}/graph`;
const v1Api = `api://${env.CLIENT_ID}`;
const graphRoles = env.GRAPH_PERMISSIONS === 'none' ? [] : ['User.Read.All', 'GroupMember.Read.All'];
// GRAPH_THROTTLE=once: until when look-ups are throttled (0: none yet).
let throttledUntil = 0;

// The app's credential: its secret, or (private_key_jwt) the public key
// of its certificate, as registered in Entra.
const clientAuth = env.CLIENT_AUTH || 'client_secret_basic';
const credential = env.CLIENT_PUBLIC_KEY
  ? { jwks: { keys: [{ ...crypto.createPublicKey(fs.readFileSync(env.CLIENT_PUBLIC_KEY)).export({ format: 'jwk' }), use: 'sig' }] } }
  : { client_secret: env.CLIENT_SECRET };

const provider = new Provider(issuer, {
  clients: [{
    client_id: env.CLIENT_ID,
    ...credential,
    redirect_uris: [env.REDIRECT_URI],
    post_logout_redirect_uris: env.POST_LOGOUT_REDIRECT_URI ? [env.POST_LOGOUT_REDIRECT_URI] : [],
    response_types: ['code'],
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials', 'urn:openid:params:grant-type:ciba'],
    backchannel_token_delivery_mode: 'poll',
    // BACKCHANNEL_LOGOUT_URI: the provider posts a logout token there when
    // the user signs out at the provider, and its ID tokens carry `sid`.
    ...(env.BACKCHANNEL_LOGOUT_URI
      ? { backchannel_logout_uri: env.BACKCHANNEL_LOGOUT_URI, backchannel_logout_session_required: true }
      : {}),
        token_endpoint_auth_method: clientAuth,
  }],
  jwks: { keys: [signingKey] },
  routes: {
    authorization: `/${tenant}/oauth2/v2.0/authorize`,
    token: `/${tenant}/oauth2/v2.0/token`,
    jwks: `/${tenant}/discovery/v2.0/keys`,
    end_session: `/${tenant}/oauth2/v2.0/logout`,
    userinfo: `/${tenant}/openid/userinfo`,
    backchannel_authentication: `/${tenant}/oauth2/v2.0/backchannel`,
  },
  scopes: ['openid', 'profile', 'email', 'offline_access'],
  claims: {
    openid: ['sub', 'oid', 'tid', 'ver', 'groups', 'roles', '_claim_names', '_claim_sources', 'acrs'],
    profile: ['name', 'preferred_username'],
    email: ['email'],
  },
  // Entra puts the profile claims in the ID token itself.
  conformIdTokenClaims: false,
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async (use, scope, requested) => {
      const claims = claimsFor(id);
      const asked = requested?.acrs;
      const acrs = asked?.values || (asked?.value ? [asked.value] : []);
      if (acrs.length && !id.startsWith('nomfa')) claims.acrs = acrs;
      return claims;
    },
  }),
  // Admin consent: every scope the client asks for is granted, once per
  // user and app as Entra's consent is (one grant per browser session, which
  // the provider's sign-out revokes as a whole).
  loadExistingGrant: async (ctx) => {
    const { clientId } = ctx.oidc.client;
    const existing = ctx.oidc.session.grantIdFor(clientId);
    const found = existing && await ctx.oidc.provider.Grant.find(existing);
    if (found && found.accountId === ctx.oidc.session.accountId) return found;
    const grant = new ctx.oidc.provider.Grant({ clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope('openid profile email offline_access');
    grant.addOIDCClaims(['acrs']);
    await grant.save();
    return grant;
  },
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Entra's codes and tokens do not die with its browser session. Bound to
  // it (oidc-provider's default without `prompt=consent`), a code is void
  // once another tab of the same browser finishes signing in first.
  expiresWithSession: async () => false,
  // The gateway under test listens on loopback, which oidc-provider's
  // guard against server-side request forgery refuses to call: this test
  // provider calls it (its back-channel logouts) all the same.
  fetch: (url, options) => {
    delete options.dispatcher;
    return fetch(url, options);
  },
  // ROTATE_REFRESH=1: every refresh returns a new refresh token and spends
  // the old one; one used twice revokes the grant (oidc-provider's replay
  // detection), as a provider that rotates refresh tokens would.
  rotateRefreshToken: () => env.ROTATE_REFRESH === '1',
  features: {
    devInteractions: { enabled: true },
    // Access tokens for this app's own API, as JWTs (what an API client
    // gets from Entra for api://<client id>/.default).
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Entra's `<resource>/.default` scope names the resource itself.
      defaultResource: async (ctx) => ((ctx.oidc.params.scope || '').split(' ').includes(`${graph}/.default`) ? graph : undefined),
      getResourceServerInfo: async (ctx, resource) => {
        if (resource === graph) return { scope: `${graph}/.default`, audience: graph, accessTokenFormat: 'jwt' };
        if (resource === v1Api) return { scope: 'api', audience: v1Api, accessTokenFormat: 'jwt' };
        return { scope: 'api', audience: env.CLIENT_ID, accessTokenFormat: 'jwt' };
      },
    },
    rpInitiatedLogout: { enabled: true },
    claimsParameter: { enabled: true },
    backchannelLogout: { enabled: true },
    ciba: {
      enabled: true,
      deliveryModes: ['poll'],
      processLoginHint: async (ctx, loginHint) => loginHint,
      verifyUserCode: async () => {},
      validateRequestContext: async () => {},
      // The user approves at once, as if on their phone.
      triggerAuthenticationDevice: async (ctx, request, account, client) => {
        const grant = new ctx.oidc.provider.Grant({ clientId: client.clientId, accountId: account.accountId });
        grant.addOIDCScope('openid');
        for (const resource of [request.resource].flat().filter(Boolean)) grant.addResourceScope(resource, 'api');
        await grant.save();
        await ctx.oidc.provider.backchannelResult(request, grant);
      },
    },
  },
  formats: {
    customizers: {
      // Entra's access token claims, not OAuth's.
      jwt: async (ctx, token, jwt) => {
        const { payload } = jwt;
        Object.assign(payload, { tid: tenant, ver: '2.0', azp: payload.client_id });
        if (token.accountId) {
          const user = claimsFor(token.accountId);
          Object.assign(payload, {
            scp: payload.scope, oid: user.oid, name: user.name,
            preferred_username: user.preferred_username, roles: user.roles,
          });
          if (user._claim_names) Object.assign(payload, { _claim_names: user._claim_names, _claim_sources: user._claim_sources });
        } else {
          const roles = payload.aud === graph ? graphRoles : ['Console.Automation'];
          Object.assign(payload, { idtyp: 'app', oid: payload.sub, roles });
        }
        delete payload.scope;
        if (payload.aud === v1Api) {
          Object.assign(payload, {
            iss: `https://sts.windows.net/${tenant}/`, ver: '1.0', appid: payload.client_id,
            upn: payload.preferred_username, unique_name: payload.preferred_username,
          });
          delete payload.preferred_username;
          delete payload.azp;
        }
      },
    },
  },
  ttl: { IdToken: Number(env.ID_TOKEN_TTL || 3600), AccessToken: 3600 },
});
provider.proxy = false;

// Entra serves discovery under the issuer's path; its multi-tenant
// `/organizations/v2.0` document names the issuer template
// `https://<host>/{tenantid}/v2.0`, and tokens the user's own tenant.
const discovery = `/${tenant}/v2.0/.well-known/openid-configuration`;
const organizations = '/organizations/v2.0/.well-known/openid-configuration';
// Graph's answers, in its shapes.
async function graphRequest(req, res) {
  const send = (status, body, headers = {}) => {
    res.writeHead(status, { 'content-type': 'application/json', ...headers });
    res.end(JSON.stringify(body));
  };
  const failure = (code, message) => ({ error: { code, message } });
  const body = await new Promise((resolve) => {
    let data = '';
    req.on('data', (chunk) => { data += chunk; });
    req.on('end', () => resolve(data));
  });
  const match = req.url.match(/^\/graph\/v1\.0\/users\/([^/?]+)\/getMemberGroups$/);
  if (req.method !== 'POST' || !match) return send(404, failure('Request_ResourceNotFound', 'no such resource'));
  const throttled = (seconds) => send(429, failure('TooManyRequests', 'throttled'), { 'retry-after': String(seconds) });
  if (env.GRAPH_THROTTLE === '1') return throttled(30);
  if (env.GRAPH_THROTTLE === 'once') {
    if (throttledUntil === 0) throttledUntil = Date.now() + 1000;
    if (Date.now() < throttledUntil) return throttled(1);
  }
  let payload;
  try {
    ({ payload } = await jwtVerify((req.headers.authorization || '').replace(/^Bearer /, ''), publicKey, { issuer, audience: graph }));
  } catch {
    return send(401, failure('InvalidAuthenticationToken', 'Access token validation failure.'));
  }
  if (!['User.Read.All', 'GroupMember.Read.All'].every((role) => (payload.roles || []).includes(role))) {
    return send(403, failure('Authorization_RequestDenied', 'Insufficient privileges to complete the operation.'));
  }
  if (typeof JSON.parse(body || '{}').securityEnabledOnly !== 'boolean') {
    return send(400, failure('Request_BadRequest', 'securityEnabledOnly is required'));
  }
  const name = users.get(match[1]);
  if (!name) return send(404, failure('Request_ResourceNotFound', `Resource '${match[1]}' does not exist.`));
  const count = name.startsWith('overage') ? 250 : 2;
  return send(200, { value: Array.from({ length: count }, (_, i) => `group-${name}-${i}`) });
}

const callback = provider.callback();
server.on('request', (req, res) => {
  if (req.url.startsWith('/graph/')) {
    graphRequest(req, res);
    return;
  }
  if (req.url === discovery) req.url = '/.well-known/openid-configuration';
  if (req.url === organizations) {
    req.url = '/.well-known/openid-configuration';
    const end = res.end.bind(res);
    res.end = (body) => {
      const doc = JSON.parse(body.toString());
      doc.issuer = `https://127.0.0.1:${port}/{tenantid}/v2.0`;
      const templated = JSON.stringify(doc);
      res.setHeader('content-length', Buffer.byteLength(templated));
      return end(templated);
    };
  }
  callback(req, res);
});

process.stdout.write(`${JSON.stringify({ issuer, port, kid: signingKey.kid })}\n`);
process.on('SIGTERM', () => server.close(() => process.exit(0)));
