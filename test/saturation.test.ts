/**
 * Pipelined traffic at saturation on a clean loopback: devices that keep several
 * qos messages outstanding against the README's echo app, which awaits its own
 * qos write for every line it reads. Nothing may stall: every ACK comes long
 * before `timeout` (so nothing is retransmitted), nothing is refused, nothing is
 * delivered twice, nothing is left behind.
 *
 * The peers are written from the protocol description (helpers/pipeline-peer.ts),
 * not with tether's own client, as an independent implementation would be.
 */
import test from 'ava';
import { Server, silentLogger } from '../src';
import type { Connection } from '../src/connection';
import { PipelinePeer } from './helpers/pipeline-peer';
import { eventually } from './helpers/wait';

const TIMEOUT = 3000;

async function echoServer(t: import('ava').ExecutionContext, rxBuffer?: number): Promise<{ server: Server; conns: Connection[] }> {
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, settleDelay: 0, rxBuffer, logger: silentLogger });
  t.teardown(() => server.close());
  const conns: Connection[] = [];
  server.on('connection', (conn: Connection) => {
    conns.push(conn);
    // The README's echo app: one qos write per line read, awaited.
    void (async () => {
      for await (const line of conn) await conn.write(line, { qos: true, wait: false });
    })().catch(() => {});
  });
  return { server, conns };
}

async function run(t: import('ava').ExecutionContext, clients: number, window: number, count: number, rxBuffer?: number): Promise<void> {
  const { server, conns } = await echoServer(t, rxBuffer);
  const peers = await Promise.all(
    Array.from({ length: clients }, (_, i) => PipelinePeer.connect(server.port, `p${i}`, { window, timeout: TIMEOUT, count })),
  );
  t.teardown(() => peers.forEach((p) => p.close()));
  await Promise.all(peers.map((p) => p.finished));
  await eventually(() => peers.every((p) => p.stats.delivered >= count), 60_000, 'every echo delivered');
  await eventually(() => conns.every((c) => c.inFlight === 0), 10_000, 'every echo ACKed');

  const sum = (f: (p: PipelinePeer) => number) => peers.reduce((a, p) => a + f(p), 0);
  const ackMax = Math.max(...peers.map((p) => p.stats.ackMax));
  const serverRetransmits = conns.reduce((a, c) => a + c.counters.retransmits, 0);
  const shed = conns.reduce((a, c) => a + c.counters.shed, 0);
  t.log(`${clients} peers, window ${window}, ${count} each: ACK max ${ackMax} ms, peer retransmits ${sum((p) => p.stats.retransmits)}, server retransmits ${serverRetransmits}, shed ${shed}`);
  for (const p of peers) {
    t.deepEqual(p.inbox, Array.from({ length: count }, (_, n) => `${p.id}-${n}`), `${p.id}: every echo once`);
  }
  t.is(sum((p) => p.stats.deliveredTwice), 0, 'nothing delivered twice');
  t.is(sum((p) => p.stats.retransmits), 0, 'no ACK took as long as timeout: nothing retransmitted by the peers');
  t.is(serverRetransmits, 0, 'nothing retransmitted by the server');
  t.is(shed, 0, 'nothing refused');
  t.true(conns.every((c) => c.buffered === 0 && c.heldMessages === 0), 'nothing left behind');
}

test('one pipelining peer against a small receive buffer: the echo app never deadlocks on its own ACK', (t) => run(t, 1, 8, 400, 4));

test('10 peers with 8 outstanding each, default buffers', (t) => run(t, 10, 8, 300));

test('10 peers with 2 outstanding each, default buffers', (t) => run(t, 10, 2, 300));
