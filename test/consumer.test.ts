/**
 * Consumer mode (`setConsumer`, what the MQTT bridge uses) on a real server,
 * driven by a raw socket that sends exact bytes: the ACK waits for the
 * consumer's confirmation, retransmissions meanwhile are neither ACKed nor
 * handed on twice, a refusal or a failure leaves the message to be resent, and
 * ACKs go out in arrival order.
 */
import test, { ExecutionContext } from 'ava';
import { Connection, Server, silentLogger } from '../src';
import { eventually, RawPeer } from './helpers/raw';

interface Handed {
  line: string;
  mid: number;
  resolve(): void;
  reject(e: Error): void;
}

async function setup(t: ExecutionContext, refuse: () => boolean = () => false) {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: 5000, settleDelay: 0, logger: silentLogger });
  t.teardown(() => server.close());
  const handed: Handed[] = [];
  server.on('connection', (c: Connection) =>
    c.setConsumer((line, mid) => {
      if (refuse()) return null;
      return new Promise<void>((resolve, reject) => handed.push({ line, mid, resolve, reject }));
    }),
  );
  const peer = await RawPeer.hello(server.port, 'dev');
  t.teardown(() => peer.close());
  const conn = await server.clientConn('dev');
  const acks = () => peer.received.map((r) => r.line).filter((l) => l !== '');
  return { server, conn, peer, handed, acks };
}

test('the ACK waits for the consumer; a retransmission meanwhile is neither ACKed nor handed on again', async (t) => {
  const { conn, peer, handed, acks } = await setup(t);
  peer.send('05hello\n');
  await eventually(() => handed.length === 1, 5000, 'the line handed on');
  t.deepEqual([handed[0].line, handed[0].mid], ['hello\n', 5]);
  peer.send('05hello\n'); // the device resends: no ACK yet, not handed twice
  await eventually(() => conn.counters.duplicatesDropped === 1, 5000, 'the resend seen');
  t.deepEqual(acks(), [], 'nothing ACKed before the consumer confirms');
  t.is(handed.length, 1);
  handed[0].resolve();
  await peer.until((l) => l.includes('05'));
  t.deepEqual(acks(), ['05']);
  peer.send('05hello\n'); // a resend after the ACK (the ACK was lost): ACKed again, not handed on
  await peer.until((l) => l.filter((x) => x === '05').length === 2);
  t.is(handed.length, 1);
  t.is(conn.buffered, 0, 'nothing goes to readline() in consumer mode');
});

test('ACKs go out in arrival order even when confirmations come out of order', async (t) => {
  const { peer, handed, acks } = await setup(t);
  peer.send('01a\n02b\n03c\n');
  await eventually(() => handed.length === 3, 5000, 'three lines handed on');
  handed[2].resolve();
  handed[1].resolve();
  await new Promise((r) => setImmediate(r));
  t.deepEqual(acks(), [], 'nothing before the first is confirmed');
  handed[0].resolve();
  await peer.until((l) => l.filter((x) => x !== '').length === 3);
  t.deepEqual(acks(), ['01', '02', '03']);
});

test('a refused or failed hand-over is not ACKed, and the resend is handed on as new', async (t) => {
  let refusing = true;
  const { conn, peer, handed, acks } = await setup(t, () => refusing);
  peer.send('07x\n');
  await eventually(() => conn.counters.shed === 1, 5000, 'the refusal counted');
  t.is(handed.length, 0);
  refusing = false;
  peer.send('07x\n'); // the device resends after its timeout
  await eventually(() => handed.length === 1, 5000, 'handed on this time');
  peer.send('08y\n');
  await eventually(() => handed.length === 2, 5000, 'the next one handed on');
  handed[1].resolve(); // confirmed, but waiting behind 07 (arrival order)
  await new Promise((r) => setImmediate(r));
  t.deepEqual(acks(), []);
  handed[0].reject(new Error('broker gone'));
  await peer.until((l) => l.includes('08'));
  t.deepEqual(acks(), ['08'], 'the failed one was not ACKed; the next one is not held behind it');
  peer.send('07x\n');
  await eventually(() => handed.length === 3, 5000, 'the failed one handed on again when resent');
  handed[2].resolve();
  await peer.until((l) => l.includes('07'));
  t.deepEqual(acks(), ['08', '07']);
});

test('a board that reboots while its lines are still being handed on: its new lines are handed on too, and it never gets ACKs meant for its previous run', async (t) => {
  const { server, handed } = await setup(t);
  const first = await RawPeer.hello(server.port, 'board');
  t.teardown(() => first.close());
  first.send('00boot1-A\n01boot1-B\n');
  await eventually(() => handed.length === 2, 5000, 'both handed on');
  first.close(); // reboot: a new process, a new link, mid 0 again
  await eventually(() => !server.get('board')!.isUp, 10_000, 'old link gone');
  const second = await RawPeer.hello(server.port, 'board');
  t.teardown(() => second.close());
  second.send('00boot2-C\n01boot2-D\n');
  await eventually(() => handed.length === 4, 5000, 'the new run handed on as well');
  t.deepEqual(handed.map((h) => h.line.trim()), ['boot1-A', 'boot1-B', 'boot2-C', 'boot2-D']);
  for (const h of handed) h.resolve(); // the broker confirms everything, the old run's first
  await eventually(() => second.received.filter((r) => r.line !== '').length === 2, 5000, 'the new run ACKed');
  t.deepEqual(second.received.map((r) => r.line).filter((l) => l !== ''), ['00', '01'], "exactly the new run's two ACKs");
  t.is(server.get('board')!.counters.duplicatesDropped, 0);
});

test('a deep-sleep board whose previous reading is still being handed on: the same reading after the reboot is handed on again', async (t) => {
  const { server, handed } = await setup(t);
  const first = await RawPeer.hello(server.port, 'sensor');
  t.teardown(() => first.close());
  first.send('00temp=21\n');
  await eventually(() => handed.length === 1, 5000);
  first.close();
  await eventually(() => !server.get('sensor')!.isUp, 10_000);
  const second = await RawPeer.hello(server.port, 'sensor');
  t.teardown(() => second.close());
  second.send('00temp=21\n');
  await eventually(() => handed.length === 2, 5000, 'the second wake handed on');
  t.deepEqual(handed.map((h) => h.line.trim()), ['temp=21', 'temp=21'], 'one reading per wake');
  for (const h of handed) h.resolve();
  await eventually(() => second.received.some((r) => r.line === '00'), 5000, 'the second wake ACKed');
  t.is(second.received.filter((r) => r.line === '00').length, 1, 'once: the first wake\'s ACK is not sent to it');
});
