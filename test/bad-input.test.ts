/**
 * Hostile and broken peers against a real Server on 127.0.0.1, with raw `net`
 * sockets, while a well-behaved Client keeps exchanging qos messages with its
 * Connection. Each test checks the logged reason, the counter, that at most the
 * offending link is lost, and that the good client saw nothing.
 */
import test, { ExecutionContext } from 'ava';
import { createHook } from 'node:async_hooks';
import * as net from 'node:net';
import { Client, Connection, createLogger, LogRecord, Server, ServerOptions, TetherError, TetherErrorCode } from '../src';
import { eventually, within } from './helpers/wait';
import { prng } from './helpers/prng';

const TIMEOUT = 600;
const HOST = '127.0.0.1';

// ---- small helpers ------------------------------------------------------------------

const until = (cond: () => boolean, what: string, limit = 5000, step = 10) => eventually(cond, limit, what, step);

/** A hand-driven device: a raw socket that sends exactly what the test says. */
class RawPeer {
  /** Lines received from the server (without `\n`, latin1). */
  readonly lines: string[] = [];
  closed = false;
  closedAt = 0;
  readonly connectedAt = Date.now();
  error: Error | null = null;
  /** ACK every message line received, as a device would. */
  autoAck = true;
  readonly whenClosed: Promise<void>;
  /** How the server names this socket in its logs. */
  readonly remote: string;
  private tail = '';
  private ka: NodeJS.Timeout | null = null;

  private constructor(readonly socket: net.Socket) {
    this.remote = `tcp:${socket.localAddress}:${socket.localPort}`;
    socket.on('data', (d: Buffer) => {
      this.tail += d.toString('latin1');
      let nl: number;
      while ((nl = this.tail.indexOf('\n')) >= 0) {
        const line = this.tail.slice(0, nl);
        this.tail = this.tail.slice(nl + 1);
        this.lines.push(line);
        if (this.autoAck && line.length >= 3 && /^[0-9a-f]{2}/.test(line)) void this.send(line.slice(0, 2) + '\n');
      }
    });
    socket.on('error', (e) => (this.error = e));
    this.whenClosed = new Promise((resolve) =>
      socket.once('close', () => {
        this.closed = true;
        this.closedAt = Date.now();
        this.stopKeepalive();
        resolve();
      }),
    );
  }

  static connect(port: number): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: HOST, port });
      s.once('error', reject);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(new RawPeer(s));
      });
    });
  }

  /** Writes and resolves when handed to the kernel: true, or false if the socket failed. */
  send(data: string | Buffer): Promise<boolean> {
    if (this.closed || this.socket.destroyed) return Promise.resolve(false);
    return new Promise((resolve) => this.socket.write(data, (err) => resolve(!err)));
  }

  /** Sends a keepalive every timeout/4, like a healthy device. */
  keepalive(): void {
    this.ka ??= setInterval(() => void this.send('\n'), TIMEOUT / 4);
  }

  stopKeepalive(): void {
    if (this.ka) clearInterval(this.ka);
    this.ka = null;
  }

  /** Lines that are not keepalives. */
  get nonKeepalive(): string[] {
    return this.lines.filter((l) => l !== '');
  }

  destroy(): void {
    this.stopKeepalive();
    this.socket.destroy();
  }
}

interface Fixture {
  server: Server;
  records: LogRecord[];
  good: Client;
  goodConn: Connection;
  /** Log records with this msg (and matching fields). */
  logged(msg: string, fields?: Record<string, unknown>): LogRecord[];
  /** A raw socket, destroyed at teardown. */
  raw(): Promise<RawPeer>;
  /** Stops the good client's exchange and checks it went through untouched. */
  finishGood(): Promise<void>;
}

/**
 * A server with a collecting logger, plus a good client that keeps doing qos round
 * trips (client → server → client) with its Connection until finishGood().
 */
async function setup(t: ExecutionContext, extra: Partial<ServerOptions> = {}): Promise<Fixture> {
  const records: LogRecord[] = [];
  const logger = createLogger({ level: 'debug', sink: (r) => records.push(r) });
  // maxStrikes 0: these peers misbehave from 127.0.0.1 on purpose, many times over, to exercise
  // each defence on its own; blocking the address after 10 strikes is tested in security.test.ts.
  const server = await Server.listen({ host: HOST, port: 0, timeout: TIMEOUT, settleDelay: 50, logger, maxStrikes: 0, ...extra });
  t.teardown(() => server.close());
  const good = new Client({ id: 'good', port: server.port, timeout: TIMEOUT, maxLineLength: extra.maxLineLength });
  t.teardown(() => good.close());
  await within(good.connect(), 5000, 'the good client to connect');
  const goodConn = await within(server.clientConn('good'), 5000, 'the good Connection');

  let stop = false;
  let rounds = 0;
  const exchange = (async () => {
    while (!stop) {
      const n = rounds;
      await good.write(`ping ${n}`);
      const heard = await goodConn.readline();
      if (heard !== `ping ${n}\n`) throw new Error(`server heard ${JSON.stringify(heard)}, expected ping ${n}`);
      await goodConn.write(`pong ${n}`);
      const back = await good.readline();
      if (back !== `pong ${n}\n`) throw new Error(`client heard ${JSON.stringify(back)}, expected pong ${n}`);
      rounds++;
    }
  })();
  exchange.catch(() => {}); // examined in finishGood()
  // One full round trip first, so the good link is settled (no start-up timers left).
  await within(Promise.race([until(() => rounds >= 1, 'the first good round trip'), exchange]), 6000, 'the first round trip');

  const raws: RawPeer[] = [];
  t.teardown(() => raws.forEach((r) => r.destroy()));

  return {
    server,
    records,
    good,
    goodConn,
    logged: (msg, fields = {}) =>
      records.filter((r) => r.msg === msg && Object.entries(fields).every(([k, v]) => r[k] === v)),
    raw: async () => {
      const r = await RawPeer.connect(server.port);
      raws.push(r);
      return r;
    },
    finishGood: async () => {
      // A couple more full round trips after the bad input, then stop.
      const target = rounds + 2;
      await within(
        Promise.race([until(() => rounds >= target, 'good client round trips', 5000), exchange]),
        6000,
        'the good client to keep exchanging',
      );
      stop = true;
      await within(exchange, 5000, 'the good exchange to stop');
      t.true(rounds >= 2, `good client made ${rounds} round trips`);
      t.true(goodConn.isUp && good.isUp, 'good link still up');
      for (const [side, c] of [
        ['server', goodConn.counters],
        ['client', good.counters],
      ] as const) {
        t.is(c.connects, 1, `${side}: good link never reconnected`);
        t.is(c.outages, 0, `${side}: good link never had an outage`);
        t.is(c.badLines + c.longLines + c.duplicatesDropped + c.shed, 0, `${side}: good link saw nothing odd`);
      }
      t.deepEqual(
        records.filter((r) => r.client === 'good' && r.level !== 'debug' && r.msg !== 'link up'),
        [],
        'nothing logged about the good client but its link coming up',
      );
    },
  };
}

/** Waits for `conn` to emit 'down'; resolves with the reason. */
function downOf(conn: Connection): Promise<string> {
  return new Promise((resolve) => conn.once('down', (reason: string) => resolve(reason)));
}

test.serial('no ID line within the deadline: closed after idTimeout, counted, logged', async (t) => {
  const f = await setup(t);
  const silent = await f.raw(); // sends nothing at all
  const partial = await f.raw(); // sends part of an ID, no newline
  await partial.send('half-an-i');
  await within(Promise.all([silent.whenClosed, partial.whenClosed]), 6 * TIMEOUT, 'the server to close both sockets');
  for (const r of [silent, partial]) {
    const waited = r.closedAt - r.connectedAt;
    t.true(waited >= TIMEOUT - 50, `closed after the deadline, not before (${waited} ms)`);
    t.true(waited < 5 * TIMEOUT, `closed within a generous bound (${waited} ms)`);
  }
  t.is(f.server.handshakes.idTimeout, 2);
  t.is(f.server.handshakes.accepted, 1, 'only the good client got through');
  t.is(f.server.pendingHandshakes, 0);
  const [a] = f.logged('no ID line in time: socket closed', { remote: silent.remote });
  const [b] = f.logged('no ID line in time: socket closed', { remote: partial.remote });
  t.truthy(a && b, 'one record per socket, naming its address');
  t.is(a.level, 'warn');
  t.is(a.idTimeout, TIMEOUT);
  t.is(a.received, 0);
  t.is(b.received, 'half-an-i'.length);
  t.deepEqual(f.server.connections().map((c) => c.id), ['good'], 'no Connection for them');
  t.deepEqual(silent.lines, [], 'nothing is sent before the ID line');
  await f.finishGood();
});

test.serial('a 10 MB ID line: closed as soon as it exceeds maxIdLength, never buffered', async (t) => {
  const f = await setup(t);
  const r = await f.raw();
  const total = 10 * 1024 * 1024;
  const chunk = Buffer.alloc(16 * 1024, 'A'.charCodeAt(0));
  let written = 0;
  await within(
    (async () => {
      while (written < total && !r.closed) {
        if (!(await r.send(chunk))) break;
        written += chunk.length;
        // The server runs in this same process: let its I/O run between chunks, as a
        // remote peer's would (a write completing at once never yields otherwise).
        await new Promise((resolve) => setImmediate(resolve));
      }
    })(),
    10000,
    'the writer to stop',
  );
  await within(r.whenClosed, 5000, 'the socket to close');
  t.log(`${written} bytes written before the server closed the socket`);
  t.true(written < 1024 * 1024, `closed long before 10 MB were written (${written} bytes written)`);
  t.is(f.server.handshakes.idTooLong, 1);
  t.is(f.server.pendingHandshakes, 0);
  const [rec] = f.logged('ID line too long: socket closed', { remote: r.remote });
  t.truthy(rec, 'logged with the socket address');
  t.is(rec.maxIdLength, 1024);
  // Rejected on the first read that crosses the limit: at most one socket read (64 KiB) beyond it.
  t.true((rec.received as number) > 1024 && (rec.received as number) <= 1024 + 64 * 1024, `received ${rec.received}`);
  t.deepEqual(f.server.connections().map((c) => c.id), ['good']);
  await f.finishGood();
});

test.serial('an ID line of exactly maxIdLength bytes is accepted, one more byte is not', async (t) => {
  const f = await setup(t, { maxIdLength: 64 });
  const ok = await f.raw();
  const okId = 'i'.repeat(64);
  // Sent in pieces, so the limit is checked across chunks.
  await ok.send(okId.slice(0, 30));
  await until(() => f.server.pendingHandshakes === 1, 'the partial ID to arrive');
  await ok.send(okId.slice(30) + '\n');
  const conn = await within(f.server.clientConn(okId), 5000, 'the Connection');
  t.true(conn.isUp);
  const tooLong = await f.raw();
  await tooLong.send('j'.repeat(40));
  await tooLong.send('j'.repeat(25) + '\n');
  await within(tooLong.whenClosed, 5000, 'the too-long ID to be closed');
  t.is(f.server.handshakes.idTooLong, 1);
  t.is(f.server.handshakes.accepted, 2);
  t.is(f.logged('ID line too long: socket closed', { remote: tooLong.remote }).length, 1);
  await f.finishGood();
});

test.serial('an empty or non-UTF-8 ID line: closed, counted as badId, logged', async (t) => {
  const f = await setup(t);
  const empty = await f.raw();
  const binary = await f.raw();
  await empty.send('\n');
  await binary.send(Buffer.from([0xff, 0xfe, 0xc3, 0x28, 0x0a, 0x30, 0x30, 0x0a]));
  await within(Promise.all([empty.whenClosed, binary.whenClosed]), 5000, 'both sockets to be closed');
  t.is(f.server.handshakes.badId, 2);
  t.is(f.server.pendingHandshakes, 0);
  for (const r of [empty, binary]) {
    const recs = f.logged('bad ID line (empty or not UTF-8): socket closed', { remote: r.remote });
    t.is(recs.length, 1);
    t.is(typeof recs[0].id, 'string', 'a printable preview of the ID');
    t.deepEqual(r.lines, [], 'nothing sent to it');
  }
  t.deepEqual(f.server.connections().map((c) => c.id), ['good']);
  await f.finishGood();
});

test.serial('a newcomer with the ID of a connected client: closed, counted, logged with both addresses; the old link stays', async (t) => {
  const f = await setup(t);
  const r = await f.raw();
  await r.send('good\n\n00hijack\n');
  await within(r.whenClosed, 5000, 'the newcomer to be closed');
  t.is(f.server.handshakes.duplicateId, 1);
  const [rec] = f.logged('duplicate client ID: newcomer closed, the connected link stays', { id: 'good' });
  t.truthy(rec);
  t.is(rec.remote, r.remote);
  t.is(rec.connected, f.goodConn.remote);
  t.deepEqual(r.lines, [], 'not greeted');
  // finishGood() checks that the good Connection never received "hijack" (it reads ping lines only) and never went down.
  await f.finishGood();
  t.is(f.goodConn.buffered, 0);
});

test.serial('an ID not on the allow-list: closed, counted, logged', async (t) => {
  const f = await setup(t, { allow: ['good'] });
  const r = await f.raw();
  await r.send('intruder\n\n');
  await within(r.whenClosed, 5000, 'the intruder to be closed');
  t.is(f.server.handshakes.unknownId, 1);
  const [rec] = f.logged('unknown client ID rejected', { id: 'intruder' });
  t.truthy(rec);
  t.is(rec.remote, r.remote);
  t.is(f.server.get('intruder'), undefined);
  await f.finishGood();
});

test.serial('a line longer than maxLineLength after the ID: ACKed but not delivered (reported as oversize), counted, link stays up', async (t) => {
  const max = 512;
  const f = await setup(t, { maxLineLength: max });
  const r = await f.raw();
  await r.send('longline\n\n');
  r.keepalive();
  const conn = await within(f.server.clientConn('longline'), 5000, 'the Connection');
  const oversize: number[] = [];
  conn.on('oversize', (mid: number) => oversize.push(mid));
  await r.send('00first\n');
  t.is(await within(conn.readline(), 5000, 'first'), 'first\n');
  // The long line, streamed in pieces that each fit but together do not.
  const long = '01' + 'x'.repeat(5000);
  for (let at = 0; at < long.length; at += 400) await r.send(long.slice(at, at + 400));
  await r.send('\n');
  // Exactly at the limit still goes through.
  const edge = '02' + 'y'.repeat(max - 2);
  await r.send(edge + '\n03after\n');
  t.is(await within(conn.readline(), 5000, 'edge'), 'y'.repeat(max - 2) + '\n');
  t.is(await within(conn.readline(), 5000, 'after'), 'after\n', 'the line after the long one is delivered next');
  await until(() => r.nonKeepalive.includes('03'), 'the ACK of 03');
  t.deepEqual(r.nonKeepalive, ['00', '01', '02', '03'], 'the long message is ACKed too, so the sender goes on');
  t.deepEqual(oversize, [1], 'and reported to the app instead of delivered');
  t.is(conn.counters.longLines, 1);
  t.is(conn.counters.badLines, 0);
  t.is(conn.counters.messagesIn, 3);
  t.true(conn.isUp);
  t.is(conn.counters.outages, 0);
  const recs = f.logged('a line longer than maxLineLength was dropped', { client: 'longline' });
  t.is(recs.length, 1);
  t.is(recs[0].maxLineLength, max);
  t.is(recs[0].level, 'warn');
  t.false(r.closed);
  await f.finishGood();
});

test.serial('junk, invalid UTF-8, non-hex ACKs and ids: dropped, counted, not ACKed, link stays up', async (t) => {
  const f = await setup(t);
  const r = await f.raw();
  await r.send('junk\n\n');
  r.keepalive();
  const conn = await within(f.server.clientConn('junk'), 5000, 'the Connection');

  const rnd = prng(0x7e7e7e);
  const noise = Buffer.alloc(300);
  for (let i = 0; i < noise.length; i++) {
    let b = Math.floor(rnd() * 256);
    if (b === 0x0a) b = 0x0b;
    noise[i] = b;
  }
  noise[0] = 0xfe; // not a hex digit, whatever the PRNG says
  const bad: Array<[Buffer, RegExp]> = [
    [Buffer.from([0x00, 0xff, 0x13, 0x80, 0xfe, 0x7f, 0x01]), /not hex/],
    [noise, /not hex/],
    [Buffer.concat([Buffer.from('01'), Buffer.from([0xc3, 0x28, 0xff])]), /UTF-8/],
    [Buffer.concat([Buffer.from('02ab'), Buffer.from([0xc0, 0xaf])]), /UTF-8/],
    [Buffer.concat([Buffer.from('03'), Buffer.from([0xed, 0xa0, 0x80])]), /UTF-8/],
    [Buffer.from('zz'), /not hex/],
    [Buffer.from('g1hello'), /not hex/],
    [Buffer.from('1ghello'), /not hex/],
    [Buffer.from('x'), /one-character/],
  ];
  // All in one write...
  await r.send(Buffer.concat(bad.flatMap(([b]) => [b, Buffer.from('\n')])));
  // ...then a good message, which must be delivered and ACKed.
  await r.send('00fine\n');
  t.is(await within(conn.readline(), 5000, 'fine'), 'fine\n');
  await until(() => r.nonKeepalive.length >= 1, 'the ACK of 00');
  // One more bad line split over two writes, then another good message.
  await r.send('q');
  await r.send('q1 split junk\n01again\n');
  t.is(await within(conn.readline(), 5000, 'again'), 'again\n');
  await until(() => r.nonKeepalive.length >= 2, 'the ACK of 01');

  t.deepEqual(r.nonKeepalive, ['00', '01'], 'only the good messages were ACKed');
  t.is(conn.counters.badLines, bad.length + 1);
  t.is(conn.counters.messagesIn, 2);
  t.is(conn.counters.acksOut, 2);
  t.is(conn.buffered, 0, 'nothing else was delivered');
  const recs = f.logged('dropped a bad line', { client: 'junk' });
  t.is(recs.length, bad.length + 1);
  bad.forEach(([, why], i) => {
    t.regex(String(recs[i].reason), why, `reason for bad line #${i}`);
    t.is(recs[i].remote, r.remote);
    t.is(recs[i].level, 'warn');
    t.is(typeof recs[i].line, 'string', 'a preview of the line is logged');
  });
  t.true((recs[1].line as string).length < 100, 'the preview is bounded');
  t.true(conn.isUp);
  t.is(conn.counters.outages, 0);
  t.false(r.closed);
  await f.finishGood();
});

test.serial('a socket that goes silent without closing is detected as an outage', async (t) => {
  const f = await setup(t);
  let conn: Connection | undefined;
  const down = new Promise<{ reason: string; at: number }>((resolve) =>
    f.server.on('connection', (c: Connection) => {
      if (c.id !== 'silent') return;
      conn = c;
      void downOf(c).then((reason) => resolve({ reason, at: Date.now() }));
    }),
  );
  const r = await f.raw();
  await r.send('silent\n\n'); // the ID and one keepalive, then nothing, socket left open
  const lastSent = Date.now();
  const { reason, at } = await within(down, 5 * TIMEOUT, "the Connection's 'down'");
  t.regex(reason, /timeout/);
  t.true(at - lastSent < 5 * TIMEOUT, `outage after ${at - lastSent} ms`);
  t.true(at - lastSent >= TIMEOUT - 50, 'not before the timeout');
  t.truthy(conn);
  t.false(conn!.isUp);
  t.is(conn!.counters.outages, 1);
  const [rec] = f.logged('link down', { client: 'silent' });
  t.truthy(rec);
  t.is(rec.reason, reason);
  t.is(rec.remote, r.remote);
  // The server closed its end of the silent socket.
  await within(r.whenClosed, 5000, 'the server to close the silent socket');
  t.true(r.lines.length >= 1 && r.lines.every((l) => l === ''), 'the server sent only keepalives');
  await f.finishGood();
});

test.serial('connect/close 1,000 times: server stays up, no pending handshakes, no leaked timers or sockets', async (t) => {
  // A long ID deadline: a handshake the server failed to clean up would then stay
  // visible (pending, with a live timer) instead of healing itself after idTimeout.
  const f = await setup(t, { idTimeout: 60_000 });
  // Devices from the loop may deliver messages; read them so nothing piles up.
  f.server.on('connection', (c: Connection) => {
    if (c.id.startsWith('loop')) void (async () => { for await (const _ of c); })();
  });
  const resources = () => {
    const n = { Timeout: 0, TCPSocketWrap: 0, TCPServerWrap: 0 };
    for (const r of process.getActiveResourcesInfo()) if (r in n) n[r as keyof typeof n]++;
    return n;
  };
  const before = resources();
  // getActiveResourcesInfo() leaves out unref'd timers (each link's keepalive tick is
  // one), so also track every timer created during the storm until it is cleared or fires.
  const live = new Map<number, string>();
  let tracking = true;
  const hook = createHook({
    init(id, type) {
      if (tracking && type === 'Timeout') live.set(id, new Error('timer created here').stack ?? '');
    },
    destroy(id) {
      live.delete(id);
    },
  });
  hook.enable();
  t.teardown(() => hook.disable());

  const once = async (i: number): Promise<void> => {
    const s = net.connect({ host: HOST, port: f.server.port });
    s.on('error', () => {}); // RSTs are expected
    s.resume(); // read (and discard) whatever the server sends, so EOF is seen
    const closed = new Promise<void>((resolve) => s.once('close', () => resolve()));
    await new Promise<void>((resolve) => {
      s.once('connect', () => resolve());
      s.once('close', () => resolve());
    });
    const id = `loop-${i % 7}`;
    switch (i % 5) {
      case 0: // nothing at all
        s.destroy();
        break;
      case 1: // part of an ID, then a clean close
        s.end('loop-part');
        break;
      case 2: // a full ID, then a clean close
        s.end(`${id}\n`);
        break;
      case 3: // ID, keepalive and a message, then an abrupt close
        s.write(`${id}\n\n00hi ${i}\n`, () => s.destroy());
        break;
      case 4: // ID, wait for the server's keepalive, then close
        s.write(`${id}\n`);
        await new Promise<void>((resolve) => {
          s.once('data', () => resolve());
          s.once('close', () => resolve());
        });
        s.destroy();
        break;
    }
    await closed;
  };
  const N = 1000;
  const workers = 10;
  await within(
    Promise.all(
      Array.from({ length: workers }, async (_, w) => {
        for (let i = w; i < N; i += workers) await once(i);
      }),
    ),
    20000,
    'the connect/close loop',
  );
  tracking = false; // the polls below make timers of their own

  await until(() => f.server.pendingHandshakes === 0, 'pendingHandshakes to return to 0');
  const loopConns = () => f.server.connections().filter((c) => c.id.startsWith('loop'));
  await until(() => loopConns().every((c) => c.state === 'down' && c.remote === undefined), 'every loop link to be dropped');
  const h = f.server.handshakes;
  await until(() => h.accepted + h.closedEarly + h.duplicateId === N + 1, 'every handshake to be accounted for');
  let after = resources();
  await until(
    () => {
      after = resources();
      return after.Timeout <= before.Timeout && after.TCPSocketWrap <= before.TCPSocketWrap && after.TCPServerWrap === before.TCPServerWrap;
    },
    'timers and sockets to return to their baseline',
    5000,
    20,
  ).catch((e: Error) => t.fail(`${e.message}: before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`));
  t.log(`handshakes ${JSON.stringify(h)}; resources before ${JSON.stringify(before)} after ${JSON.stringify(after)}`);
  await until(() => live.size === 0, 'every timer created during the storm to be gone', 5000, 20).catch((e: Error) =>
    t.fail(`${e.message}: ${live.size} left, e.g.\n${[...live.values()][0]}`),
  );
  hook.disable();

  t.is(h.idTooLong + h.badId + h.unknownId + h.idTimeout, 0);
  t.true(h.closedEarly >= (2 * N) / 5, 'sockets sending nothing or a partial ID closed early');
  t.is(f.logged('link closed before its ID line').length, h.closedEarly, 'each early close logged');
  // Logged, throttled (a peer could cause one per connect): at least once, at most once each.
  const dupLogs = f.logged('duplicate client ID: newcomer closed, the connected link stays').length;
  t.true(h.duplicateId === 0 || (dupLogs >= 1 && dupLogs <= h.duplicateId), `${dupLogs} records for ${h.duplicateId} duplicates`);
  t.is(loopConns().length, 7, 'one Connection per loop ID');
  t.is(f.server.pendingHandshakes, 0);
  // The server still takes a new client normally.
  const late = new Client({ id: 'late', port: f.server.port, timeout: TIMEOUT });
  t.teardown(() => late.close());
  await within(late.connect(), 5000, 'a new client after the storm');
  const lateConn = await within(f.server.clientConn('late'), 5000, 'its Connection');
  await within(late.write('still here'), 5000, 'the late write');
  t.is(await within(lateConn.readline(), 5000, 'its line'), 'still here\n');
  await f.finishGood();
});

test.serial('writing an empty payload or one with a newline inside: rejected, nothing sent', async (t) => {
  const f = await setup(t, { maxLineLength: 100 });
  const r = await f.raw();
  await r.send('payload\n\n');
  r.keepalive();
  const conn = await within(f.server.clientConn('payload'), 5000, 'the Connection');
  const cases: Array<[string, TetherErrorCode]> = [
    ['', 'ERR_EMPTY_PAYLOAD'],
    ['\n', 'ERR_EMPTY_PAYLOAD'],
    ['a\nb', 'ERR_NEWLINE_IN_PAYLOAD'],
    ['\nb', 'ERR_NEWLINE_IN_PAYLOAD'],
    ['ab\n\n', 'ERR_NEWLINE_IN_PAYLOAD'],
    ['x'.repeat(99), 'ERR_LINE_TOO_LONG'],
  ];
  for (const [payload, code] of cases) {
    for (const opts of [{}, { qos: false }, { wait: false }]) {
      const e = await t.throwsAsync(conn.write(payload, opts), { instanceOf: TetherError });
      t.is(e?.code, code, `${JSON.stringify(payload)} ${JSON.stringify(opts)}`);
    }
  }
  t.is(conn.counters.messagesOut, 0);
  t.is(conn.inFlight, 0);
  // A single trailing newline is stripped: this goes out as "00ok" and is ACKed.
  await within(conn.write('ok\n'), 5000, 'the valid write');
  t.deepEqual(r.nonKeepalive, ['00ok'], 'the rejected writes sent nothing and used no message id');
  t.is(conn.counters.messagesOut, 1);
  t.true(conn.isUp);

  // The same on the device side, with a Node Client.
  const dev = new Client({ id: 'payload-dev', port: f.server.port, timeout: TIMEOUT });
  t.teardown(() => dev.close());
  await within(dev.connect(), 5000, 'the device client');
  const devConn = await within(f.server.clientConn('payload-dev'), 5000, 'its Connection');
  for (const [payload, code] of cases.slice(0, 5)) {
    const e = await t.throwsAsync(dev.write(payload), { instanceOf: TetherError });
    t.is(e?.code, code);
  }
  t.is(dev.counters.messagesOut, 0);
  await within(dev.write('hi\n'), 5000, 'the device write');
  t.is(await within(devConn.readline(), 5000, 'its line'), 'hi\n');
  t.is(devConn.counters.messagesIn, 1, 'only the valid write arrived');
  t.is(devConn.counters.badLines + devConn.counters.acksIn, 0, 'no ACK-shaped line arrived from the rejected empty writes');
  await f.finishGood();
});
