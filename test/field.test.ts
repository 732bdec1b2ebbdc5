/**
 * Boards in the field keep working exactly as with the original server (issue
 * 13, item 4). Each board is a raw socket that behaves as the original
 * micropython-iot client does on the wire.
 */
import test, { ExecutionContext } from 'ava';
import * as net from 'node:net';
import { Client, Connection, Server, ServerOptions, silentLogger } from '../src';
import { withBootId } from '../src/client';
import { createLogger, formatPretty } from '../src/log';
import { eventually, RawPeer } from './helpers/raw';

const TIMEOUT = 1000;

async function start(t: ExecutionContext, opts: ServerOptions = {}): Promise<Server> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, settleDelay: 0, logger: silentLogger, ...opts });
  t.teardown(() => server.close());
  return server;
}

/** Every line the app reads from `id`, in order. */
function collect(server: Server, id: string): string[] {
  const got: string[] = [];
  void server.clientConn(id).then(async (conn) => {
    for await (const line of conn) got.push(line.trimEnd());
  });
  return got;
}

/** A board as the original client runs it: ID line, waits for the server's first line, then writes. */
async function board(t: ExecutionContext, server: Server, idLine: string): Promise<RawPeer> {
  const p = await RawPeer.hello(server.port, idLine);
  t.teardown(() => p.close());
  await p.next(TIMEOUT * 2, false); // the greeting keepalive
  return p;
}

test('deep-sleep boards: every wake (a reboot, so mid 0 again) delivers its reading, even when the value repeats', async (t) => {
  const server = await start(t);
  const got = collect(server, 'sensor');
  for (let wake = 0; wake < 3; wake++) {
    const p = await board(t, server, 'sensor');
    p.send('0021.5\n');
    t.is((await p.next()).line, '00', `wake ${wake}: ACKed`);
    p.close();
    await eventually(() => !server.get('sensor')!.isUp, 5000, 'link down');
  }
  await eventually(() => got.length === 3, 5000, 'three readings');
  t.deepEqual(got, ['21.5', '21.5', '21.5']);
});

test('a mid-0 resend on the same link (its ACK was lost) is still delivered once', async (t) => {
  const server = await start(t);
  const got = collect(server, 'dev');
  const p = await board(t, server, 'dev');
  p.send('00first\n');
  await p.next();
  p.send('01second\n');
  await p.next();
  p.send('00first\n'); // the board's retransmission timer, the ACK having been lost
  t.is((await p.next()).line, '00', 'ACKed again');
  p.send('02third\n');
  await p.next();
  await eventually(() => got.length === 3, 5000);
  t.deepEqual(got, ['first', 'second', 'third']);
});

test('a board announcing a boot id is protected across links too; a new boot id is a reboot', async (t) => {
  const server = await start(t, { idLineTypes: true });
  const got = collect(server, 'node');
  const link = async (boot: string) => board(t, server, `node####{"boot":"${boot}"}`);
  let p = await link('b1');
  p.send('00hello\n');
  await p.next();
  p.close();
  await eventually(() => !server.get('node')!.isUp, 5000);
  p = await link('b1'); // same boot: the resend of a message whose ACK was lost with the link
  p.send('00hello\n');
  t.is((await p.next()).line, '00');
  p.close();
  await eventually(() => !server.get('node')!.isUp, 5000);
  p = await link('b2'); // rebooted
  p.send('00hello\n');
  await p.next();
  await eventually(() => got.length === 2, 5000);
  t.deepEqual(got, ['hello', 'hello']);
});

test('IDs containing "@" or "##" mean what they meant to the original server unless auth / idLineTypes are on', async (t) => {
  const server = await start(t);
  for (const id of ['dev@1', 'dev@2', 'dev@', 'a##b', 'x@y##z']) {
    const p = await board(t, server, id);
    p.send('00hi\n');
    t.is((await p.next()).line, '00', `${id} is served`);
    t.truthy(server.get(id), `${JSON.stringify(id)} is its own client ID`);
    t.is(server.get(id)!.declaredType, undefined);
  }
  t.is(server.handshakes.duplicateId, 0, 'dev@1 and dev@2 do not collide');
  // With the features on, the same characters carry their meaning.
  const typed = await start(t, { idLineTypes: true });
  await board(t, typed, 'lamp-1##lamp');
  t.is(typed.get('lamp-1')?.declaredType, 'lamp');
});

test('health checks: bare connects and closes from one address are never a strike; a board there still connects', async (t) => {
  const server = await start(t, { maxStrikes: 3 });
  for (let i = 0; i < 25; i++) {
    await new Promise<void>((resolve) => {
      const s = net.connect({ port: server.port, host: '127.0.0.1' }, () => s.end());
      s.on('close', () => resolve());
      s.on('error', () => resolve());
    });
  }
  t.is(server.blockedAddresses, 0);
  const p = await board(t, server, 'after-probes');
  p.send('00ok\n');
  t.is((await p.next()).line, '00');
});

test('a line over the length limit is ACKed, reported to the app as oversize, and the board goes on; no strike', async (t) => {
  const server = await start(t, { maxLineLength: 100, maxStrikes: 3 });
  const oversize: number[] = [];
  server.on('connection', (c: Connection) => c.on('oversize', (mid: number) => oversize.push(mid)));
  const got = collect(server, 'big');
  const p = await board(t, server, 'big');
  for (let i = 1; i <= 10; i++) {
    const mid = i.toString(16).padStart(2, '0');
    p.send(`${mid}${'x'.repeat(500)}\n`);
    t.is((await p.next()).line, mid, `over-long message ${i} ACKed: the board's write completes`);
  }
  p.send('0bsmall\n');
  t.is((await p.next()).line, '0b');
  await eventually(() => got.length === 1, 5000);
  t.deepEqual(got, ['small'], 'the over-long lines never reach the app as lines');
  t.is(oversize.length, 10, 'the app is told of each');
  t.is(server.get('big')!.counters.longLines, 10);
  t.is(server.blockedAddresses, 0, 'the address is not blocked for it');
  t.true(server.get('big')!.isUp);
});

test('a paused link never causes a spurious retransmission: the ACK of a server message is read although the app is not reading', async (t) => {
  const server = await start(t, { rxBuffer: 2, rxHold: 1 });
  const p = await board(t, server, 'busy');
  const conn = server.get('busy')!;
  // The board sends without waiting (qos off), more than buffer and hold take: the server stops reading.
  let burst = '';
  for (let i = 1; i <= 60; i++) burst += `${i.toString(16).padStart(2, '0')}reading ${i}\n`;
  p.send(burst);
  await eventually(() => conn.buffered === 2 && conn.heldMessages === 1, 5000, 'buffer and hold full');
  // The app sends a command; the board ACKs it at once, behind its unread readings.
  const cmd = conn.write('relay on');
  cmd.catch(() => {});
  let line = await p.next();
  while (line.line.length === 2) line = await p.next(); // ACKs of its readings
  t.is(line.line, '00relay on');
  p.send('00\n');
  await cmd;
  // Keep the board's side alive a while longer than timeout and watch for a resend.
  const ka = setInterval(() => p.send('\n'), TIMEOUT / 4);
  t.teardown(() => clearInterval(ka));
  await new Promise((r) => setTimeout(r, TIMEOUT * 2));
  t.is(conn.counters.retransmits, 0, 'the command was sent once');
  t.false(p.untaken().some((l) => l === '00relay on'), 'the board never saw it twice');
});

test("tether's Node client can announce a boot id; the server reads it when idLineTypes is on", async (t) => {
  const server = await start(t, { idLineTypes: true });
  const c = new Client({ id: 'linux-board##gw', port: server.port, timeout: TIMEOUT, announceBoot: true });
  t.teardown(() => c.close());
  await c.connect();
  const conn = await server.clientConn('linux-board');
  t.is(conn.declaredType, 'gw');
  t.regex(String(conn.meta.boot), /^[\w-]{10}$/);
  t.is(withBootId('a', 'B'), 'a####{"boot":"B"}');
  t.is(withBootId('a##t##{"room":"hall"}', 'B'), 'a##t##{"room":"hall","boot":"B"}');
});

test('ID policy: look-alikes are one device (NFC), control and direction characters are refused, escapes never reach the log raw', async (t) => {
  const logs: string[] = [];
  const server = await start(t, { logger: createLogger({ level: 'info', sink: (r) => logs.push(formatPretty(r)) }) });
  const nfc = 'caf\u00e9';
  const nfd = 'cafe\u0301';
  let p = await board(t, server, nfd);
  p.send('00hi\n');
  await p.next();
  t.truthy(server.get(nfc), 'the decomposed form is stored as NFC');
  t.is(server.get(nfd), server.get(nfc), 'either spelling finds it');
  for (const id of ['dev\r', 'dev\u0000', 'evil\u202etxt.exe', '   ', 'red\u001b[31m']) {
    const r = await RawPeer.hello(server.port, id);
    t.teardown(() => r.close());
    await r.closed;
    t.is(server.get(id), undefined, `${JSON.stringify(id)} refused`);
  }
  p = await board(t, server, 'plain-after');
  t.truthy(server.get('plain-after'));
  // eslint-disable-next-line no-control-regex -- looking for a raw escape character is the point
  t.false(logs.some((l) => /[\u001b\u202e]/.test(l)), 'no raw escape or direction mark in the log');
  t.true(logs.some((l) => l.includes('U+000D')), 'the refusal says which character');
});
