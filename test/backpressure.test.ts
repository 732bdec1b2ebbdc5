/**
 * Backpressure both ways, bounded: an app that stops reading makes the server
 * withhold ACKs, then stop reading the device's socket; a writer that outruns
 * its device waits.
 */
import test from 'ava';
import { once } from 'node:events';
import { Client, Server, silentLogger } from '../src';
import { midHex } from '../src/protocol';
import { eventually, RawPeer } from './helpers/raw';

const TIMEOUT = 600;

test('an app that stops reading makes the server stop reading the socket; it resumes without loss', async (t) => {
  const rxBuffer = 32;
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, rxBuffer, logger: silentLogger });
  t.teardown(() => server.close());
  const dev = await RawPeer.hello(server.port, 'flood', '\n');
  t.teardown(() => dev.close());
  const conn = await server.clientConn('flood');

  // The device floods messages without waiting for ACKs, as fast as TCP lets it.
  const N = 150_000;
  const pad = '-'.repeat(90);
  const lineBytes = 2 + 6 + pad.length + 1;
  let sent = 0;
  let mid = 0;
  const writer = (async () => {
    while (sent < N) {
      let chunk = '';
      for (let k = 0; k < 400 && sent < N; k++, sent++) {
        chunk += midHex(mid) + String(sent).padStart(6, '0') + pad + '\n';
        mid = mid === 255 ? 1 : mid + 1;
      }
      if (!dev.socket.write(chunk)) await once(dev.socket, 'drain');
    }
  })();

  // Wait until the server has stopped reading: bytesIn stands still while the device has more to send.
  let last = -1;
  let still = 0;
  await eventually(
    () => {
      const now = conn.counters.bytesIn;
      still = now === last ? still + 1 : 0;
      last = now;
      return still >= 30; // 300 ms without a byte read
    },
    30_000,
    'the server stops reading',
  );
  t.true(sent < N, 'the device is held back by TCP flow control');
  t.true(conn.counters.bytesIn < (N * lineBytes) / 2, `server read ${conn.counters.bytesIn} of ${N * lineBytes} bytes`);
  // Bounded exactly: rxBuffer lines taken, rxHold more held un-ACKed, the rest left in the socket.
  t.is(conn.buffered, rxBuffer, `buffered ${conn.buffered} lines`);
  t.true(conn.heldMessages <= 32, `held ${conn.heldMessages}`);
  t.true(conn.isUp, 'a paused link is not an outage');
  t.log(`stalled with ${conn.buffered} lines buffered, ${conn.counters.bytesIn} bytes read, device held ${N - sent} messages back`);

  // The app reads again: everything arrives, once, in order.
  for (let i = 0; i < N; i++) {
    const line = await conn.readline();
    if (Number(line.slice(0, 6)) !== i) return t.fail(`line ${i} was ${JSON.stringify(line.slice(0, 12))}`);
  }
  await writer;
  t.is(conn.counters.messagesIn, N);
  t.is(conn.counters.duplicatesDropped, 0);
});

test('a writer that outruns a device that does not read waits instead of queueing without bound', async (t) => {
  const maxQueuedWrites = 16;
  const server = await Server.listen({
    host: '127.0.0.1',
    port: 0,
    timeout: TIMEOUT,
    settleDelay: 0,
    maxQueuedWrites,
    logger: silentLogger,
  });
  t.teardown(() => server.close());
  const client = new Client({ id: 'slow', port: server.port, timeout: TIMEOUT, rxBuffer: 8 });
  t.teardown(() => client.close());
  await client.connect();
  const conn = await server.clientConn('slow');

  let resolved = 0;
  const N = 400;
  const writes = Array.from({ length: N }, (_, i) => conn.write(`m${i}`).then(() => resolved++));
  // The device's app reads nothing: its buffer fills, it stops reading, ACKs stop.
  await eventually(() => client.buffered >= 8, 10_000, 'device buffer fills');
  await new Promise((r) => setTimeout(r, 2 * TIMEOUT));
  t.true(resolved < N, 'writes wait for the device');
  t.true(conn.queuedWrites <= maxQueuedWrites + 1, `queued ${conn.queuedWrites}`);
  t.true(conn.inFlight <= 1, 'wait: true keeps one message in flight');
  t.true(conn.isUp && client.isUp, 'no false outage while the device is busy');

  for (let i = 0; i < N; i++) t.is(await client.readline(), `m${i}\n`);
  await Promise.all(writes);
  t.is(resolved, N);
});

test('a pipelining device is paced by withheld ACKs: an app that awaits its own write while not reading gets its ACK, nothing is refused', async (t) => {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: 2000, settleDelay: 0, rxBuffer: 8, logger: silentLogger });
  t.teardown(() => server.close());
  const client = new Client({ id: 'piper', port: server.port, timeout: 2000, window: 8 });
  t.teardown(() => client.close());
  await client.connect();
  const conn = await server.clientConn('piper');

  const N = 200;
  const deviceWrites = Array.from({ length: N }, (_, i) => client.write(String(i), { wait: false }));
  deviceWrites.forEach((w) => w.catch(() => {}));
  await eventually(() => conn.buffered === 8 && conn.heldMessages === 8, 10_000, 'buffer full, the window held un-ACKed');
  t.is(conn.buffered, 8, 'the buffer bound holds exactly');
  // The app writes before reading: the device's ACK is read although 8 lines wait unread.
  await conn.write('are you there?');
  t.is(await client.readline(), 'are you there?\n');
  t.is(conn.counters.shed, 0, 'nothing refused: the device was paced by ACKs it had not got yet');

  for (let i = 0; i < N; i++) t.is(await conn.readline(), `${i}\n`);
  await Promise.all(deviceWrites);
  t.is(conn.counters.duplicatesDropped, 0);
});

test('an app that awaits its own write while not reading does not deadlock even past the hold (shedding)', async (t) => {
  const server = await Server.listen({
    host: '127.0.0.1',
    port: 0,
    timeout: TIMEOUT,
    settleDelay: 0,
    rxBuffer: 8,
    rxHold: 2,
    logger: silentLogger,
  });
  t.teardown(() => server.close());
  const client = new Client({ id: 'chatty', port: server.port, timeout: TIMEOUT, window: 8 });
  t.teardown(() => client.close());
  await client.connect();
  const conn = await server.clientConn('chatty');

  const N = 200;
  const deviceWrites = Array.from({ length: N }, (_, i) => client.write(String(i), { wait: false }));
  deviceWrites.forEach((w) => w.catch(() => {}));
  await eventually(() => conn.buffered >= 8, 10_000, 'server buffer fills');
  // The app writes before reading; the device's ACK sits behind unread lines.
  await conn.write('are you there?');
  t.true(conn.counters.shed > 0, 'lines beyond the buffer were refused without ACK');
  t.is(await client.readline(), 'are you there?\n');

  const got = new Set<number>();
  while (got.size < N) {
    const n = Number(await conn.readline());
    t.false(got.has(n), `duplicate ${n}`);
    got.add(n);
  }
  await Promise.all(deviceWrites);
  t.log(`shed ${conn.counters.shed}, device retransmits ${client.counters.retransmits}`);
});
