/**
 * Conformance with PROTOCOL.md section 1, byte for byte: a raw socket plays the
 * device (or the server) and checks exactly what tether puts on the wire.
 */
import test, { ExecutionContext } from 'ava';
import * as net from 'node:net';
import { Client, Connection, createLogger, Server, ServerOptions, silentLogger } from '../src';
import { eventually, RawPeer } from './helpers/raw';

const TIMEOUT = 800;

async function startServer(t: ExecutionContext, opts: ServerOptions = {}): Promise<Server> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, logger: silentLogger, ...opts });
  t.teardown(() => server.close());
  return server;
}

async function device(t: ExecutionContext, server: Server, id: string, extra = ''): Promise<RawPeer> {
  const p = await RawPeer.hello(server.port, id, extra);
  t.teardown(() => p.close());
  return p;
}

test('the server answers an ID line with keepalives only, first one at once', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'dev');
  const first = await p.next(TIMEOUT, false);
  t.is(first.line, '');
  const ka = setInterval(() => p.send('\n'), TIMEOUT / 4);
  t.teardown(() => clearInterval(ka));
  await new Promise((r) => setTimeout(r, 2 * TIMEOUT));
  t.true(p.received.every((r) => r.line === ''), `only keepalives expected, got ${JSON.stringify(p.received)}`);
  t.is(server.get('dev')?.isUp, true);
});

test('keepalives come at least every timeout/4 (with slack for a busy machine)', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'ka');
  const start = Date.now();
  // Keep our side alive too, so the link stays up for the whole window.
  const ours = setInterval(() => p.send('\n'), TIMEOUT / 4);
  t.teardown(() => clearInterval(ours));
  await new Promise((r) => setTimeout(r, 3 * TIMEOUT));
  const times = p.received.filter((r) => r.line === '').map((r) => r.at);
  t.true(times.length >= 8, `expected ~12 keepalives in ${3 * TIMEOUT} ms, got ${times.length}`);
  const gaps = times.slice(1).map((x, i) => x - times[i]);
  const median = [...gaps].sort((a, b) => a - b)[Math.floor(gaps.length / 2)];
  t.true(times[0] - start < TIMEOUT / 2, 'first keepalive is immediate');
  // The cadence is timeout/4; a busy machine may delay one tick, but no gap may come
  // near `timeout`, which would make the peer declare a false outage.
  t.true(median >= TIMEOUT / 8 && median <= TIMEOUT / 2, `median gap ${median} ms should be near ${TIMEOUT / 4} ms (gaps ${gaps.join(',')})`);
  t.true(Math.max(...gaps) < 0.9 * TIMEOUT, `gaps ${gaps.join(',')} must stay well below the ${TIMEOUT} ms timeout`);
});

test('every message is ACKed, duplicates included; duplicates are not delivered', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'ack');
  const conn = await server.clientConn('ack');
  p.send('01first\n');
  t.is((await p.next()).line, '01');
  p.send('01first\n');
  t.is((await p.next()).line, '01', 'a duplicate is ACKed too');
  p.send('02second\n');
  t.is((await p.next()).line, '02');
  t.is(await conn.readline(), 'first\n');
  t.is(await conn.readline(), 'second\n');
  t.is(conn.buffered, 0);
  t.is(conn.counters.duplicatesDropped, 1);
  t.is(conn.counters.messagesIn, 2);
});

test('bytes after the ID line in the same packet are processed at once', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'eager', '05hi there\n');
  t.is((await p.next()).line, '05');
  const conn = await server.clientConn('eager');
  t.is(await conn.readline(), 'hi there\n');
});

test('mid 0 clears the duplicate ring (the peer restarted)', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'm0');
  const conn = await server.clientConn('m0');
  p.send('01a\n02b\n');
  await p.until((l) => l.includes('02'));
  p.send('00restart\n01a\n');
  await p.until((l) => l.filter((x) => x === '01').length === 2);
  const got = [await conn.readline(), await conn.readline(), await conn.readline(), await conn.readline()];
  t.deepEqual(got, ['a\n', 'b\n', 'restart\n', 'a\n']);
  t.is(conn.counters.duplicatesDropped, 0);
});

test('a message clears the ids half a ring away, so they become new again', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'ring');
  const conn = await server.clientConn('ring');
  // 5 is in ring byte 0; 133 is in byte 16, whose "half a ring away" byte is 0.
  p.send('05x\n05x\n85y\n05x\n');
  await p.until((l) => l.filter((x) => x === '05').length === 3 && l.includes('85'));
  t.deepEqual([await conn.readline(), await conn.readline(), await conn.readline()], ['x\n', 'y\n', 'x\n']);
  t.is(conn.counters.duplicatesDropped, 1);
});

test('a repeated first message (mid 0, ACK lost) is not delivered twice', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'lost0');
  const conn = await server.clientConn('lost0');
  p.send('00boot\n');
  await p.until((l) => l.includes('00'));
  // The device did not see the ACK and sends its first message again.
  p.send('00boot\n');
  await p.until((l) => l.filter((x) => x === '00').length === 2);
  // A real restart (different first message) is still recognised.
  p.send('00boot 2\n');
  await p.until((l) => l.filter((x) => x === '00').length === 3);
  t.is(await conn.readline(), 'boot\n');
  t.is(await conn.readline(), 'boot 2\n');
  t.is(conn.buffered, 0);
  t.is(conn.counters.duplicatesDropped, 1);
});

test('server messages wait for data from the device, then the settle delay', async (t) => {
  const settleDelay = 300;
  const server = await startServer(t, { settleDelay });
  const p = await device(t, server, 'settle');
  const conn = await server.clientConn('settle');
  const written = conn.write('hello');
  await new Promise((r) => setTimeout(r, TIMEOUT / 2));
  t.true(p.received.every((r) => r.line === ''), 'nothing but keepalives before the device speaks');
  const spoke = Date.now();
  p.send('\n');
  const msg = await p.next();
  t.is(msg.line, '00hello');
  t.true(msg.at - spoke >= settleDelay - 5, `message came ${msg.at - spoke} ms after the device spoke`);
  p.send('00\n');
  await written;
});

test('a qos message is resent with the same mid until ACKed', async (t) => {
  const server = await startServer(t, { settleDelay: 0 });
  const p = await device(t, server, 'resend', '\n');
  const conn = await server.clientConn('resend');
  const ka = setInterval(() => p.send('\n'), TIMEOUT / 4);
  t.teardown(() => clearInterval(ka));
  let acked = false;
  const w = conn.write('important').then(() => (acked = true));
  const first = await p.next();
  t.is(first.line, '00important');
  const second = await p.next(4 * TIMEOUT);
  t.is(second.line, '00important', 'same line, same mid');
  t.true(second.at - first.at >= TIMEOUT / 2, `resent after ${second.at - first.at} ms, not at once`);
  t.false(acked);
  p.send('00\n');
  await w;
  t.true(acked);
  t.true(conn.counters.retransmits >= 1);
});

test('a write without qos resolves without an ACK and is never resent', async (t) => {
  const server = await startServer(t, { settleDelay: 0 });
  const p = await device(t, server, 'noqos', '\n');
  const conn = await server.clientConn('noqos');
  const ka = setInterval(() => p.send('\n'), TIMEOUT / 4);
  t.teardown(() => clearInterval(ka));
  await conn.write('once', { qos: false });
  t.is((await p.next()).line, '00once');
  await new Promise((r) => setTimeout(r, 2 * TIMEOUT));
  t.deepEqual(p.untaken().filter((l) => l !== ''), []);
  t.is(conn.counters.retransmits, 0);
});

test('reattach after an outage keeps the id counter, and unACKed messages are resent', async (t) => {
  const server = await startServer(t, { settleDelay: 0 });
  const p1 = await device(t, server, 'back', '\n');
  const conn = await server.clientConn('back');
  const w0 = conn.write('zero');
  t.is((await p1.next()).line, '00zero');
  p1.send('00\n');
  await w0;
  const w1 = conn.write('one');
  t.is((await p1.next()).line, '01one');
  // The device vanishes without ACKing "one".
  const down = new Promise((r) => conn.once('down', r));
  p1.close();
  await down;
  t.false(conn.isUp);
  const p2 = await device(t, server, 'back', '\n');
  t.is((await p2.next()).line, '01one', 'the unACKed message, same mid, on the new link');
  p2.send('01\n');
  await w1;
  const w2 = conn.write('two');
  t.is((await p2.next()).line, '02two', 'the counter carried on (no restart mid 0)');
  p2.send('02\n');
  await w2;
  t.is(server.get('back'), conn, 'same Connection object');
  t.is(conn.counters.connects, 2);
  t.is(conn.counters.outages, 1);
});

test('silence for `timeout` is an outage: the server closes the socket', async (t) => {
  const server = await startServer(t);
  const p = await device(t, server, 'quiet');
  const conn = await server.clientConn('quiet');
  const reason = await new Promise<string>((r) => conn.once('down', r));
  t.regex(reason, /no data for \d+ ms/);
  await p.closed;
  t.true(p.closedAt! - p.received[0].at >= TIMEOUT - 50, "not before the timeout");
});

test('duplicate ID, default policy: the newcomer is closed, the connected link stays', async (t) => {
  const server = await startServer(t, { settleDelay: 0 });
  const a = await device(t, server, 'twin', '\n');
  const conn = await server.clientConn('twin');
  const b = await device(t, server, 'twin', '07from b\n');
  await b.closed;
  t.is(server.handshakes.duplicateId, 1);
  t.true(conn.isUp);
  a.send('01from a\n');
  t.is(await conn.readline(), 'from a\n', 'b never fed the Connection');
  t.is(conn.counters.messagesIn, 1);
});

test('duplicate ID, replace-old policy: the old link is dropped, the newcomer feeds the Connection', async (t) => {
  const server = await startServer(t, { settleDelay: 0, duplicateId: 'replace-old' });
  const a = await device(t, server, 'twin', '\n');
  const conn = await server.clientConn('twin');
  const b = await device(t, server, 'twin', '07from b\n');
  await a.closed;
  t.is(await conn.readline(), 'from b\n');
  t.is(conn.counters.connects, 2);
  a.send('01late\n'); // socket is closed: nothing reaches the Connection
  await new Promise((r) => setTimeout(r, 100));
  t.is(conn.buffered, 0);
  t.true(conn.isUp);
  b.close();
});

test('an allow-list rejects unknown IDs and logs them', async (t) => {
  const logs: string[] = [];
  const server = await startServer(t, {
    allow: ['known'],
    logger: createLogger({ level: 'warn', sink: (r) => logs.push(`${r.msg} ${r.id}`) }),
  });
  const stranger = await device(t, server, 'stranger');
  await stranger.closed;
  t.is(server.get('stranger'), undefined);
  t.is(server.handshakes.unknownId, 1);
  t.true(logs.some((l) => l.startsWith('unknown client ID rejected stranger')));
  const ok = await device(t, server, 'known');
  t.is((await ok.next(TIMEOUT, false)).line, '');
});

// ---- the Node client against a raw server --------------------------------

async function rawServer(t: ExecutionContext): Promise<{ port: number; next: () => Promise<RawPeer> }> {
  const queue: RawPeer[] = [];
  const waiters: Array<(p: RawPeer) => void> = [];
  const srv = net.createServer((s) => {
    const p = RawPeer.wrap(s);
    const w = waiters.shift();
    if (w) w(p);
    else queue.push(p);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  t.teardown(() => new Promise<void>((r) => srv.close(() => r())));
  return {
    port: (srv.address() as net.AddressInfo).port,
    next: () => new Promise((r) => (queue.length ? r(queue.shift()!) : waiters.push(r))),
  };
}

test('client: sends its ID line, then nothing until the server speaks; numbers messages from 00', async (t) => {
  const srv = await rawServer(t);
  const c = new Client({ id: 'board-7', port: srv.port, timeout: TIMEOUT });
  t.teardown(() => c.close());
  void c.connect();
  const s = await srv.next();
  t.is((await s.next(TIMEOUT, false)).line, 'board-7');
  const w = c.write('early');
  await new Promise((r) => setTimeout(r, TIMEOUT / 2));
  t.deepEqual(s.untaken(), [], 'silent until the first line from the server');
  s.send('\n');
  t.is((await s.next()).line, '00early');
  s.send('00\n');
  await w;
  const w2 = c.write('next');
  t.is((await s.next()).line, '01next');
  s.send('2aserver says\n');
  t.is((await s.next()).line, '2a', 'the client ACKs');
  t.is(await c.readline(), 'server says\n');
  s.send('01\n');
  await w2;
});

test('client: resends after a lost ACK and after reconnecting, with the same mid', async (t) => {
  const srv = await rawServer(t);
  const c = new Client({ id: 'r', port: srv.port, timeout: TIMEOUT, reconnectDelay: 100 });
  t.teardown(() => c.close());
  void c.connect();
  const s1 = await srv.next();
  await s1.next(TIMEOUT, false); // ID line
  const ka = setInterval(() => s1.send('\n'), TIMEOUT / 4);
  t.teardown(() => clearInterval(ka));
  s1.send('\n');
  const w = c.write('payload');
  t.is((await s1.next()).line, '00payload');
  t.is((await s1.next(3 * TIMEOUT)).line, '00payload', 'resent after a timeout without ACK');
  clearInterval(ka);
  s1.close();
  const s2 = await srv.next();
  t.is((await s2.next(5 * TIMEOUT, false)).line, 'r', 'reconnects with its ID line');
  s2.send('\n');
  t.is((await s2.next()).line, '00payload', 'resent on the new link');
  s2.send('00\n');
  await w;
  t.is(c.connects, 2);
  await eventually(() => c.counters.retransmits >= 2);
});

test('client: silence from the server is an outage; it reconnects', async (t) => {
  const srv = await rawServer(t);
  const c = new Client({ id: 'q', port: srv.port, timeout: TIMEOUT, reconnectDelay: 50 });
  t.teardown(() => c.close());
  void c.connect();
  const s1 = await srv.next();
  s1.send('\n');
  await c.ready();
  const down = await new Promise<string>((r) => c.once('down', r));
  t.regex(down, /no data/);
  const s2 = await srv.next();
  t.is((await s2.next(TIMEOUT, false)).line, 'q');
  await s1.closed;
});

test('a Connection is a singleton per client ID for the life of the server', async (t) => {
  const server = await startServer(t);
  const seen: Connection[] = [];
  server.on('connection', (c: Connection) => seen.push(c));
  for (let i = 0; i < 3; i++) {
    const p = await device(t, server, 'same');
    await p.next(TIMEOUT, false);
    p.close();
    await eventually(() => !server.get('same')!.isUp);
  }
  t.is(seen.length, 1);
  t.is(server.get('same')!.counters.connects, 3);
});
