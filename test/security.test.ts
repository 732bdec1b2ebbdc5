/**
 * Security against a real Server on loopback: secrets in the ID line, the
 * hijack the original protocol allows, per-address blocking after failed
 * attempts, TLS (with real openssl-made certificates) and client certificates,
 * and the connection and buffer limits. Every refusal is checked where a user
 * sees it: the socket closes, the log says why, the counter and /metrics move.
 */
import test, { ExecutionContext } from 'ava';
import * as fs from 'node:fs';
import * as https from 'node:https';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { Client, Connection, createLogger, Fleet, hashSecret, HttpApi, LogRecord, Server, ServerOptions, silentLogger, verifySecret } from '../src';
import { parseIdLine } from '../src/server';
import { resolveConfig } from '../src/config';
import { makePki, Pki } from './helpers/certs';
import { eventually, within } from './helpers/wait';

const TIMEOUT = 800;
const pem = (file: string) => fs.readFileSync(file);
const SECRET_A = 'lamp1-secret-0123456789';
const SECRET_B = 'lamp2-secret-9876543210';

async function start(t: ExecutionContext, opts: ServerOptions = {}): Promise<{ server: Server; logs: LogRecord[] }> {
  const logs: LogRecord[] = [];
  const server = await Server.listen({
    host: '127.0.0.1',
    port: 0,
    timeout: TIMEOUT,
    idLineTypes: true,
    logger: createLogger({ level: 'debug', sink: (r) => logs.push(r) }),
    ...opts,
  });
  t.teardown(() => server.close());
  return { server, logs };
}

function client(t: ExecutionContext, port: number, id: string, more: Partial<ConstructorParameters<typeof Client>[0]> = {}): Client {
  const c = new Client({ id, port, timeout: TIMEOUT, reconnectDelay: 100, retryMin: 50, retryMax: 200, logger: silentLogger, ...more });
  t.teardown(() => c.close());
  return c;
}

/** A raw socket from a chosen loopback source address; resolves with what the server sent before closing. */
function rawAttempt(port: number, send: string, localAddress = '127.0.0.1'): Promise<{ received: string; closed: boolean }> {
  return new Promise((resolve) => {
    let received = '';
    const s = net.connect({ port, host: '127.0.0.1', localAddress });
    s.on('connect', () => s.write(send));
    s.on('data', (d) => (received += d.toString('latin1')));
    s.on('error', () => {});
    s.on('close', () => resolve({ received, closed: true }));
    // A socket still open after a few timeouts was accepted; the caller does not want that here.
    setTimeout(() => {
      s.destroy();
      resolve({ received, closed: false });
    }, 6 * TIMEOUT).unref();
  });
}

const authed = (extra: Partial<NonNullable<ServerOptions['auth']>> = {}): ServerOptions => ({
  auth: { devices: { 'lamp-1': hashSecret(SECRET_A), 'lamp-2': hashSecret(SECRET_B, { scrypt: true }) }, ...extra },
});

// ---- the ID line --------------------------------------------------------------------

test('parseIdLine: id@secret##type##{json}; the secret never becomes part of the ID', (t) => {
  t.deepEqual(parseIdLine('lamp-1'), { id: 'lamp-1', secret: null });
  t.deepEqual(parseIdLine('lamp-1@s3cret-123'), { id: 'lamp-1', secret: 's3cret-123' });
  t.deepEqual(parseIdLine('lamp-1@s3cret-123##lamp##{"room":"hall"}'), { id: 'lamp-1', secret: 's3cret-123', type: 'lamp', meta: { room: 'hall' } });
  t.deepEqual(parseIdLine('lamp-1##lamp'), { id: 'lamp-1', secret: null, type: 'lamp' });
  t.like(parseIdLine('@secret'), { error: 'empty client ID before "@"' });
  t.like(parseIdLine('lamp@'), { error: 'empty secret after "@"' });
  // Without auth and idLineTypes, "@" and "##" are characters of the ID, as for the original server.
  const plain = { secrets: false, types: false };
  t.deepEqual(parseIdLine('dev@1', plain), { id: 'dev@1', secret: null });
  t.deepEqual(parseIdLine('a##b##{"x":1}', plain), { id: 'a##b##{"x":1}', secret: null });
  t.deepEqual(parseIdLine('dev@s3cret##lamp', { secrets: false, types: true }), { id: 'dev@s3cret', secret: null, type: 'lamp' });
});

test('hashes: sha256 and scrypt verify the right secret only; stored hashes differ per salt', async (t) => {
  const a = hashSecret(SECRET_A);
  const b = hashSecret(SECRET_A);
  t.not(a, b);
  t.true(await verifySecret(SECRET_A, a));
  t.false(await verifySecret(SECRET_B, a));
  const s = hashSecret(SECRET_A, { scrypt: true });
  t.regex(s, /^scrypt\$16384\$8\$1\$/);
  t.true(await verifySecret(SECRET_A, s));
  t.false(await verifySecret(SECRET_A + 'x', s));
  t.false(await verifySecret(SECRET_A, 'sha256$bad'));
  t.throws(() => hashSecret('short'), { message: /8 to 128 characters/ });
});

// ---- secrets -------------------------------------------------------------------------

test('auth: the right secret connects (sha256 and scrypt); wrong, missing and unknown are refused, logged and counted', async (t) => {
  const { server, logs } = await start(t, authed({ maxFailures: 100 }));
  const a = client(t, server.port, 'lamp-1', { secret: SECRET_A });
  const b = client(t, server.port, 'lamp-2##lamp##{"room":"hall"}', { secret: SECRET_B });
  await Promise.all([a.connect(), b.connect()]);
  const connB = await server.clientConn('lamp-2');
  t.is(connB.declaredType, 'lamp');
  await b.write('hello');
  t.is(await connB.readline(), 'hello\n');

  const wrong = await rawAttempt(server.port, `lamp-1@${SECRET_B}\n00hi\n`);
  const missing = await rawAttempt(server.port, 'lamp-2\n');
  const unknown = await rawAttempt(server.port, `stranger@${SECRET_A}\n`);
  for (const r of [wrong, missing, unknown]) {
    t.true(r.closed, 'the server closed the socket');
    t.is(r.received, '', 'nothing was ACKed or sent to the refused peer');
  }
  t.is(server.handshakes.authFailed, 3);
  t.is(server.limits.authFailed, 3);
  const why = logs.filter((r) => r.msg === 'authentication failed: socket closed').map((r) => r.why);
  t.deepEqual(why, ['wrong secret', 'no secret in the ID line (send id@secret)', 'no secret is configured for this ID (auth.devices)']);
  t.false(JSON.stringify(logs).includes(SECRET_B), 'secrets never reach the log');
  t.is(server.get('stranger'), undefined);
  t.true(a.isUp && b.isUp, 'the good devices were not disturbed');
});

test('auth: a stranger who knows the ID cannot take over a device that is down, nor read its queued messages', async (t) => {
  const { server } = await start(t, authed({ maxFailures: 100 }));
  const dev = client(t, server.port, 'lamp-1', { secret: SECRET_A });
  await dev.connect();
  const conn = await server.clientConn('lamp-1');
  dev.close(); // the device goes down
  await eventually(() => !conn.hasLink, 5000, 'the server to see the device down');
  const queued = conn.write('open the door', { accepted: true }); // qos, waits for the device
  await queued;

  // The original protocol would hand this socket the queued message.
  const hijack = await rawAttempt(server.port, 'lamp-1\n');
  const guess = await rawAttempt(server.port, 'lamp-1@not-the-secret\n');
  t.true(hijack.closed && guess.closed);
  t.false(hijack.received.includes('open the door'));
  t.false(guess.received.includes('open the door'));

  const back = client(t, server.port, 'lamp-1', { secret: SECRET_A });
  await back.connect();
  t.is(await back.readline(), 'open the door\n', 'the real device gets it');
  t.is(server.get('lamp-1'), conn, 'same Connection');
});

test('auth: an authenticated newcomer replaces nothing under the default duplicateId policy', async (t) => {
  const { server } = await start(t, authed());
  const dev = client(t, server.port, 'lamp-1', { secret: SECRET_A });
  await dev.connect();
  const conn = await server.clientConn('lamp-1');
  const linkBefore = conn.remote;
  const second = await rawAttempt(server.port, `lamp-1@${SECRET_A}\n`);
  t.true(second.closed);
  t.is(server.handshakes.duplicateId, 1);
  t.is(conn.remote, linkBefore, 'the first link stays');
  t.true(dev.isUp);
});

test('auth: required false lets unlisted IDs in with a plain ID while listed IDs still need their secret', async (t) => {
  const { server } = await start(t, authed({ required: false }));
  const plain = client(t, server.port, 'sensor-9');
  await plain.connect();
  t.truthy(server.get('sensor-9'));
  const r = await rawAttempt(server.port, 'lamp-1\n');
  t.true(r.closed);
  t.is(server.handshakes.authFailed, 1);
});

test('auth: an address that keeps failing is blocked for blockFor, other addresses are not; the block lifts', async (t) => {
  const { server, logs } = await start(t, authed({ maxFailures: 3, blockFor: 1500 }));
  for (let i = 0; i < 3; i++) await rawAttempt(server.port, 'lamp-1@wrong-secret-xx\n', '127.0.0.2');
  await eventually(() => server.blockedAddresses === 1, 2000, 'the address to be blocked');
  t.true(logs.some((r) => r.msg === 'address blocked after repeated authentication failures' && r.address === '127.0.0.2'));

  // Even the right secret is refused from the blocked address, before any byte is read.
  const blocked = client(t, server.port, 'lamp-1', { secret: SECRET_A, retry: false, timeout: TIMEOUT });
  const viaBlocked = await rawAttempt(server.port, `lamp-1@${SECRET_A}\n`, '127.0.0.2');
  t.true(viaBlocked.closed);
  t.true(server.limits.addressBlocked >= 1);
  t.is(server.get('lamp-1'), undefined);
  blocked.close();

  // Another address is unaffected.
  const other = client(t, server.port, 'lamp-2', { secret: SECRET_B });
  await other.connect();

  // After blockFor the address may try again.
  await eventually(() => server.blockedAddresses === 0, 5000, 'the block to lift');
  const ok = new Promise<void>((resolve, reject) => {
    const s = net.connect({ port: server.port, host: '127.0.0.1', localAddress: '127.0.0.2' }, () => s.write(`lamp-1@${SECRET_A}\n`));
    s.on('error', reject);
    server.once('attach', (c: Connection) => {
      t.is(c.id, 'lamp-1');
      s.destroy();
      resolve();
    });
  });
  await ok;
});

test('auth off: IDs mean what they meant to the original server, "@" included (dev@1 and dev@2 are two devices)', async (t) => {
  const { server } = await start(t);
  const c = client(t, server.port, 'lamp-1', { secret: SECRET_A });
  await c.connect();
  t.truthy(server.get(`lamp-1@${SECRET_A}`), 'without auth the whole line is the ID, as with the original');
  t.falsy(server.get('lamp-1'));
  const plain = client(t, server.port, 'lamp-3');
  await plain.connect();
  t.truthy(server.get('lamp-3'));
});

// ---- TLS -----------------------------------------------------------------------------

let pki: Pki;
test.before(() => {
  pki = makePki();
});
test.after.always(() => pki?.remove());

test('tls: the Node client connects over TLS and exchanges qos messages; plain TCP to the TLS port is refused and counted', async (t) => {
  const { server, logs } = await start(t, { tls: { key: pki.serverKey, cert: pki.serverCert } });
  const c = client(t, server.port, 'tls-1', { tls: { ca: pem(pki.ca) } });
  await c.connect();
  const conn = await server.clientConn('tls-1');
  t.regex(conn.remote ?? '', /^tls:/);
  await c.write('over tls');
  t.is(await conn.readline(), 'over tls\n');
  await conn.write('back');
  t.is(await c.readline(), 'back\n');

  const r = await rawAttempt(server.port, 'plain-1\n');
  t.true(r.closed);
  await eventually(() => server.limits.tlsHandshake >= 1, 3000, 'the failed handshake to be counted');
  t.true(logs.some((x) => x.msg === 'TLS handshake failed: socket closed'));
  t.is(server.get('plain-1'), undefined);
});

test('tls: a client that does not trust the server certificate does not connect', async (t) => {
  const { server } = await start(t, { tls: { key: pki.serverKey, cert: pki.serverCert } });
  const c = client(t, server.port, 'tls-2', { tls: {}, retry: false });
  await t.throwsAsync(c.connect(), { message: /cannot connect .*(SELF_SIGNED|UNABLE_TO|unable to)/i });
});

test('tls: plain and TLS side by side on two ports (tls.port), with the limits shared', async (t) => {
  const { server } = await start(t, { tls: { key: pki.serverKey, cert: pki.serverCert, port: 0 } });
  t.not(server.port, server.tlsPort);
  const plain = client(t, server.port, 'old-board');
  const secure = client(t, server.tlsPort, 'new-board', { tls: { ca: pem(pki.ca) } });
  await Promise.all([plain.connect(), secure.connect()]);
  t.regex((await server.clientConn('old-board')).remote ?? '', /^tcp:/);
  t.regex((await server.clientConn('new-board')).remote ?? '', /^tls:/);
  t.is(server.openConnections, 2);
});

test('tls client certificates: required refuses links without one; a certificate proves its CN as the ID, without a secret', async (t) => {
  const lamp1 = pki.client('lamp-1');
  const rogue = pki.client('lamp-1', { untrusted: true });
  const { server } = await start(t, {
    tls: { key: pki.serverKey, cert: pki.serverCert, ca: pki.ca, clientCerts: 'required' },
    ...authed({ maxFailures: 100 }),
  });
  const tlsOpts = (cert?: { key: string; cert: string }) => ({ ca: pem(pki.ca), ...(cert ? { key: pem(cert.key), cert: pem(cert.cert) } : {}) });

  // No certificate, or one from a CA the server does not trust: the handshake fails,
  // even with the right secret in the ID line.
  const tlsAttempt = (opts: tls.ConnectionOptions, line: string) =>
    new Promise<string>((resolve) => {
      let got = '';
      const s = tls.connect({ host: '127.0.0.1', port: server.port, ...opts }, () => s.write(line));
      s.on('data', (d) => (got += d));
      s.on('error', () => {});
      s.on('close', () => resolve(got));
    });
  for (const cert of [undefined, rogue]) {
    t.is(await tlsAttempt(tlsOpts(cert), `lamp-1@${SECRET_A}\n00hi\n`), '', 'nothing ACKed');
  }
  await eventually(() => server.limits.tlsHandshake >= 2, 3000, 'both handshakes counted as failed');
  t.is(server.get('lamp-1'), undefined);

  // A good certificate for lamp-1 may claim lamp-1 with no secret at all...
  const good = client(t, server.port, 'lamp-1', { tls: tlsOpts(lamp1) });
  await good.connect();
  t.truthy(await server.clientConn('lamp-1'));
  // ...but not lamp-2, even with lamp-2's secret.
  const before = server.handshakes.authFailed;
  t.is(await tlsAttempt(tlsOpts(lamp1), `lamp-2@${SECRET_B}\n`), '');
  t.is(server.handshakes.authFailed, before + 1);
  t.is(server.get('lamp-2'), undefined);
});

/** The first bytes a real TLS client sends: its ClientHello, caught by a plain TCP listener. */
function captureClientHello(): Promise<Buffer> {
  return new Promise((resolve) => {
    const srv = net.createServer((s) =>
      s.once('data', (d: Buffer) => {
        resolve(d);
        s.destroy();
        srv.close();
      }),
    );
    srv.listen(0, '127.0.0.1', () => {
      const c = tls.connect({ host: '127.0.0.1', port: (srv.address() as net.AddressInfo).port, rejectUnauthorized: false });
      c.on('error', () => {});
    });
  });
}

test('tls: stalled handshakes (silent, half a ClientHello, a byte now and then) are closed at the deadline; a real device from that address then connects', async (t) => {
  // Long enough that all 256 stalls are surely open at once on a loaded machine (they must hold every slot).
  const ID_TIMEOUT = 4000;
  const FROM = '127.0.0.9';
  const PER_ADDRESS = 256; // the default maxConnectionsPerAddress: the stalls take every slot of FROM
  const { server, logs } = await start(t, { tls: { key: pki.serverKey, cert: pki.serverCert }, idTimeout: ID_TIMEOUT });
  const hello = await captureClientHello();
  t.true(hello.length > 100 && hello[0] === 0x16, 'a real ClientHello (a TLS handshake record)');

  const stalls = Array.from({ length: PER_ADDRESS }, (_, i) => {
    // Taken before connecting: the server's deadline starts later, when it accepts the socket.
    const openedAt = Date.now();
    const s = net.connect({ host: '127.0.0.1', port: server.port, localAddress: FROM });
    s.on('error', () => {});
    const r = { kind: ['silent', 'half', 'trickle'][i % 3], openedAt, closedAt: 0, closed: new Promise<void>((res) => s.once('close', () => res())) };
    let trickle: NodeJS.Timeout | undefined;
    s.once('connect', () => {
      if (r.kind === 'half') s.write(hello.subarray(0, hello.length >> 1));
      if (r.kind === 'trickle') {
        let n = 0; // one byte of the ClientHello every 100 ms: never idle, never done
        trickle = setInterval(() => s.writable && n < hello.length - 1 && s.write(hello.subarray(n, ++n)), 100);
      }
    });
    s.once('close', () => {
      r.closedAt = Date.now();
      clearInterval(trickle);
    });
    t.teardown(() => s.destroy());
    return r;
  });
  await eventually(() => server.openConnections === PER_ADDRESS, 10_000, 'every stalled socket to be admitted');
  // While they hold the slots, that address gets no more (the promise that broke: for good).
  const refused = await rawAttempt(server.port, '', FROM);
  t.true(refused.closed);
  t.true(server.limits.maxConnectionsPerAddress >= 1);

  await within(Promise.all(stalls.map((s) => s.closed)), ID_TIMEOUT + 15_000, 'the server to close every stalled handshake');
  for (const s of stalls) {
    t.true(s.closedAt - s.openedAt >= ID_TIMEOUT - 5, `a ${s.kind} socket lived its ${ID_TIMEOUT} ms (closed after ${s.closedAt - s.openedAt} ms)`);
  }
  await eventually(() => server.openConnections === 0, 5000, 'every slot to be free');
  t.true(server.limits.tlsHandshake >= PER_ADDRESS, `each stall counted once as tlsHandshake (${server.limits.tlsHandshake})`);
  t.true(logs.some((r) => r.msg === 'TLS handshake failed: socket closed' && /no TLS handshake within 4000 ms/.test(String(r.error))));

  // A real TLS device from the same address connects, and the deadline does not touch a finished handshake.
  // tls.connect passes socket options such as localAddress on to net.connect (its typings omit them).
  const c = client(t, server.port, 'tls-after-stalls', { tls: { ca: pem(pki.ca), localAddress: FROM } as tls.ConnectionOptions });
  await c.connect();
  const conn = await server.clientConn('tls-after-stalls');
  const hits = server.limits.tlsHandshake;
  await new Promise((r) => setTimeout(r, ID_TIMEOUT + 300)); // past the deadline of its own handshake
  await c.write('still here');
  t.is(await conn.readline(), 'still here\n');
  t.is(c.counters.outages, 0);
  t.is(conn.counters.outages, 0);
  t.is(server.limits.tlsHandshake, hits);
});

// ---- limits --------------------------------------------------------------------------

test('limits: maxConnections and maxConnectionsPerAddress refuse the extra sockets at once, count them, and free up on close', async (t) => {
  const { server, logs } = await start(t, { maxConnections: 4, maxConnectionsPerAddress: 2 });
  const a = client(t, server.port, 'a');
  const b = client(t, server.port, 'b');
  await Promise.all([a.connect(), b.connect()]);
  const third = await rawAttempt(server.port, 'c\n');
  t.true(third.closed);
  t.is(server.limits.maxConnectionsPerAddress, 1);
  t.true(logs.some((r) => r.msg === 'connection refused: too many connections from one address' && r.address === '127.0.0.1'));

  const fromOther: net.Socket[] = [];
  for (const local of ['127.0.0.2', '127.0.0.3']) {
    const s = net.connect({ port: server.port, host: '127.0.0.1', localAddress: local });
    s.on('error', () => {});
    s.write(`dev-${local}\n`);
    fromOther.push(s);
  }
  t.teardown(() => fromOther.forEach((s) => s.destroy()));
  await eventually(() => server.openConnections === 4, 3000, 'four sockets open');
  const fifth = await rawAttempt(server.port, 'e\n', '127.0.0.4');
  t.true(fifth.closed);
  t.is(server.limits.maxConnections, 1);

  b.close();
  await eventually(() => server.openConnections === 3, 3000, 'a slot to free up');
  const again = client(t, server.port, 'c');
  await again.connect();
  t.true(again.isUp);
});

test('limits: a device that sends but never reads is dropped at maxSendBuffer; the server and other devices carry on', async (t) => {
  const { server, logs } = await start(t, { maxSendBuffer: 64 * 1024, timeout: 5000 });
  const good = client(t, server.port, 'good', { timeout: 5000 });
  await good.connect();
  // Every repeat of message 01 is ACKed ("01\n") and not delivered: the ACKs pile up
  // toward a socket that is never read, until the cap drops the link.
  const s = net.connect({ port: server.port, host: '127.0.0.1' });
  s.on('error', () => {});
  s.pause(); // never read
  const chunk = Buffer.from('01x\n'.repeat(64 * 1024));
  let closed = false;
  s.on('close', () => (closed = true));
  s.write('flood\n');
  let sent = 0;
  while (!closed && sent < 2000) {
    if (!s.write(chunk)) await new Promise((r) => s.once('drain', r).once('close', r));
    sent++;
  }
  await eventually(() => server.limits.maxSendBuffer === 1, 20_000, 'the send buffer cap to drop the link');
  t.true(logs.some((r) => r.msg === 'device not reading: link dropped' && r.limit === 'maxSendBuffer'));
  await eventually(() => !server.get('flood')!.hasLink, 5000, 'the flood link to be gone');
  s.destroy();
  await good.write('still here');
  t.is(await (await server.clientConn('good')).readline(), 'still here\n');
});

test('metrics: limit hits, open connections and blocked addresses are exported', async (t) => {
  const { server } = await start(t, authed({ maxFailures: 1, blockFor: 60_000 }));
  await rawAttempt(server.port, 'lamp-1@wrong-secret-xx\n', '127.0.0.5');
  await rawAttempt(server.port, 'lamp-1\n', '127.0.0.5');
  const api = new HttpApi({ server, fleet: new Fleet(server), host: '127.0.0.1', port: 0, logger: silentLogger });
  await api.listen();
  t.teardown(() => api.close());
  const text = await (await fetch(`http://127.0.0.1:${api.port}/metrics`)).text();
  t.regex(text, /tether_limit_hits_total\{limit="authFailed"\} 1/);
  t.regex(text, /tether_limit_hits_total\{limit="addressBlocked"\} 1/);
  t.regex(text, /tether_blocked_addresses 1/);
  t.regex(text, /tether_handshakes_rejected_total\{reason="authFailed"\} 1/);
  t.regex(text, /tether_open_connections 0/);
});

// ---- config ----------------------------------------------------------------------------

test('config: tls and auth sections are validated with messages that say what to write; paths resolve against the config file', (t) => {
  const cfg = resolveConfig({ tls: { key: 'k.pem', cert: 'c.pem' }, auth: { devices: { a: hashSecret(SECRET_A) } } }, 'local.json', '/etc/tether');
  t.is(cfg.tls?.key, '/etc/tether/k.pem');
  t.is(cfg.maxConnections, 10_000);
  t.is(cfg.maxConnectionsPerAddress, 256);
  t.throws(() => resolveConfig({ auth: { devices: { a: 'plaintext' } } }), { message: /tether secret <id>/ });
  t.throws(() => resolveConfig({ tls: { cert: 'c.pem' } }), { message: /"tls" must be an object with "key"/ });
  t.throws(() => resolveConfig({ tls: { key: 'k', cert: 'c', clientCerts: 'yes' } }), { message: /"off", "optional", "required"/ });
  t.throws(() => resolveConfig({ maxConnections: 0 }), { message: /maxConnections/ });
});

test('config: a TLS file that cannot be read is a clear error at startup', async (t) => {
  await t.throwsAsync(Server.listen({ host: '127.0.0.1', port: 0, logger: silentLogger, tls: { key: '/nonexistent/key.pem', cert: pki.serverCert } }), {
    message: /tls\.key: cannot read \/nonexistent\/key\.pem \(ENOENT\): check the path/,
  });
});

// ---- the HTTP API ------------------------------------------------------------------------

test('http: HTTPS with the configured certificate; a POST without the token is refused, logged and counted', async (t) => {
  const { server, logs } = await start(t);
  const api = new HttpApi({
    server,
    fleet: new Fleet(server),
    host: '127.0.0.1',
    port: 0,
    token: 'api-token-123',
    tls: { key: pki.serverKey, cert: pki.serverCert },
    logger: createLogger({ level: 'debug', sink: (r) => logs.push(r) }),
  });
  await api.listen();
  t.teardown(() => api.close());
  t.regex(api.url, /^https:\/\/127\.0\.0\.1:\d+\/$/);
  const request = (method: string, path: string, headers: Record<string, string> = {}, body?: string) =>
    new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = https.request({ host: '127.0.0.1', port: api.port, method, path, headers, ca: pem(pki.ca) }, (res) => {
        let data = '';
        res.on('data', (d) => (data += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: data }));
      });
      req.on('error', reject);
      req.end(body);
    });
  const list = await request('GET', '/api/devices');
  t.is(list.status, 200);
  const post = await request('POST', '/api/broadcast', { 'content-type': 'application/json' }, '{"line":"x"}');
  t.is(post.status, 401);
  t.regex(post.body, /Authorization: Bearer/);
  t.is(server.limits.httpToken, 1);
  t.true(logs.some((r) => r.msg === 'HTTP request refused: missing or wrong token'));
  const ok = await request('POST', '/api/broadcast', { 'content-type': 'application/json', authorization: 'Bearer api-token-123' }, '{"line":"x"}');
  t.is(ok.status, 200);
  // Plain HTTP to the HTTPS port gets nowhere.
  await t.throwsAsync(fetch(`http://127.0.0.1:${api.port}/api/devices`));
});

test('http: an API configured to listen beyond loopback without a token logs a warning that says how to fix it', async (t) => {
  const { server, logs } = await start(t);
  // Configured only, never bound: the tests listen on loopback alone.
  const api = new HttpApi({ server, fleet: new Fleet(server), host: '0.0.0.0', port: 0, logger: createLogger({ level: 'debug', sink: (r) => logs.push(r) }) });
  t.teardown(() => api.close());
  const w = logs.find((r) => r.msg.startsWith('the HTTP API will listen beyond this machine without a token'));
  t.truthy(w);
  t.regex(String(w?.hint), /token/);
});

// ---- strikes and device count ------------------------------------------------------------

test('strikes: an address that keeps breaking the protocol is blocked (even for a good ID); other addresses carry on', async (t) => {
  const { server, logs } = await start(t, { maxStrikes: 4, blockFor: 60_000, idTimeout: 300 });
  // Four different violations from 127.0.0.7: no ID line in time, an over-long ID line,
  // closing in the middle of an ID line, and junk lines after a plain ID. (A bare connect and
  // close, or an over-long message line, is no violation: health checks and big readings.)
  await rawAttempt(server.port, 'slow-id-without-newline', '127.0.0.7');
  await rawAttempt(server.port, 'x'.repeat(5000), '127.0.0.7');
  await new Promise<void>((resolve) => {
    const s = net.connect({ port: server.port, host: '127.0.0.1', localAddress: '127.0.0.7' }, () => s.end('half-an-id'));
    s.on('error', () => {});
    s.on('close', () => resolve());
  });
  await eventually(() => server.handshakes.closedEarly >= 1, 3000, 'the early close to be seen');
  t.is(server.blockedAddresses, 0, 'three strikes: not blocked yet');
  const s = net.connect({ port: server.port, host: '127.0.0.1', localAddress: '127.0.0.7' });
  s.on('error', () => {});
  s.write('liner\n' + 'zz junk\n');
  await eventually(() => server.blockedAddresses === 1, 5000, 'the fourth strike to block the address');
  t.true(logs.some((r) => r.msg === 'address blocked after repeated protocol violations' && r.address === '127.0.0.7'));
  t.is(server.limits.strikes, 1);
  s.destroy();

  const refused = await rawAttempt(server.port, 'good-id\n', '127.0.0.7');
  t.true(refused.closed);
  t.is(server.get('good-id'), undefined, 'refused before its ID line was read');
  t.true(server.limits.addressBlocked >= 1);
  const other = client(t, server.port, 'good-id');
  await other.connect();
  t.truthy(server.get('good-id'), 'the same ID from another address is served');
});

test('maxDevices: a flood of new IDs cannot grow the server without bound', async (t) => {
  const { server, logs } = await start(t, { maxDevices: 3, maxStrikes: 0 });
  const devs = ['d1', 'd2', 'd3'].map((id) => client(t, server.port, id));
  await Promise.all(devs.map((d) => d.connect()));
  const fourth = await rawAttempt(server.port, 'd4\n');
  t.true(fourth.closed);
  t.is(server.get('d4'), undefined);
  t.is(server.limits.maxDevices, 1);
  t.true(logs.some((r) => r.msg === 'new client ID refused: maxDevices reached'));
  // A known ID still reconnects.
  devs[0].disconnect();
  await eventually(() => devs[0].connects >= 2, 5000, 'd1 back');
  t.is(server.connections().length, 3);
});
