/**
 * The qos demo under fire: 20 Node devices and their server halves swap 500
 * numbered qos messages each way through a ChaosProxy that cuts, blackholes,
 * delays and splits links (at least 50 faults). Every message must arrive exactly
 * once and in order, each way, for every device.
 *
 * Seeded: TETHER_SEED=<n> replays a run's fault schedule (the timing of the
 * machine still varies); every failure message names the seed.
 */
import test from 'ava';
import { execFile } from 'node:child_process';
import * as path from 'node:path';
import { ChaosProxy, FAULT_KINDS } from '../src/chaos';
import { Client, Server, silentLogger } from '../src';
import type { Endpoint } from '../src/endpoint';
import { Exchange, startExchange } from '../qos/qos';
import { parseQos, QosStats } from '../qos/stats';

const CLIENTS = 20;
const N = 500;
const TIMEOUT = 500;
/** ms between messages on each side of each link: spreads the traffic over a few seconds of faults. */
const PERIOD = 8;
/** Mean ms between random faults. */
const EVERY = 60;
const MIN_FAULTS = 50;
/** The whole exchange must be over by then (bounded; the test fails with the figures if not). */
const DEADLINE_MS = 60_000;

const seed = process.env.TETHER_SEED !== undefined ? Number(process.env.TETHER_SEED) >>> 0 : Math.floor(Math.random() * 2 ** 32);

test.serial(`${CLIENTS} devices × ${N} qos messages each way through ≥ ${MIN_FAULTS} faults: exactly once, in order`, async (t) => {
  t.timeout(DEADLINE_MS + 30_000);
  const tag = `TETHER_SEED=${seed}`;
  t.log(tag);

  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: TIMEOUT, settleDelay: 50, logger: silentLogger });
  const proxy = await ChaosProxy.start({
    targetPort: server.port,
    seed,
    every: EVERY,
    blackholeMs: 700, // longer than the timeout: the keepalive timeouts see it
    delayMs: 200, // keepalive gap 125 + 200 stays under the 500 ms timeout
    delayForMs: 800,
    splitMs: 500,
  });
  const ids = Array.from({ length: CLIENTS }, (_, i) => `q-${i + 1}`);
  const clients = ids.map(
    (id) => new Client({ id, port: proxy.port, timeout: TIMEOUT, reconnectDelay: 200, retryMin: 50, retryMax: 500, logger: silentLogger }),
  );
  t.teardown(async () => {
    for (const c of clients) c.close();
    await proxy.close();
    await server.close();
  });

  // Both the stats module and a plain record of every n received, per device and direction.
  const atServer = new QosStats();
  const atDevices = new QosStats();
  const gotByServer = new Map(ids.map((id) => [id, [] as number[]]));
  const gotByDevice = new Map(ids.map((id) => [id, [] as number[]]));
  let received = 0;
  const total = 2 * CLIENTS * N;

  // Top-up: if the random schedule lags at a tenth of the way, fault every live link by
  // hand (from halfway, a kind not seen yet first), so there are ≥ 50, of every kind, by 90 %.
  let checkpoint = 0;
  let manual = 0;
  const topUp = () => {
    const k = Math.floor((10 * received) / total);
    if (k <= checkpoint || k > 9) return;
    checkpoint = k;
    const unseen = k >= 5 ? FAULT_KINDS.find((kind) => proxy.injected[kind] === 0) : undefined;
    if (!unseen && proxy.total >= Math.ceil((MIN_FAULTS * k) / 9)) return;
    const kind = unseen ?? FAULT_KINDS[manual % FAULT_KINDS.length];
    manual++;
    if (kind === 'cut') proxy.cut();
    else if (kind === 'blackhole') proxy.blackhole(700);
    else if (kind === 'delay') proxy.delay(200, 800);
    else proxy.split(500);
  };
  const exchange = (ep: Endpoint, id: string, stats: QosStats, got: number[]): Exchange =>
    startExchange(ep, {
      peer: id,
      stats,
      count: N,
      periodMs: PERIOD,
      onLine: (line) => {
        got.push(parseQos(line)?.n ?? -1);
        received++;
        topUp();
      },
    });

  const exchanges: Exchange[] = [];
  server.on('connection', (conn) => exchanges.push(exchange(conn, conn.id, atServer, gotByServer.get(conn.id)!)));
  const started = Date.now();
  for (const c of clients) {
    exchanges.push(exchange(c, c.id, atDevices, gotByDevice.get(c.id)!));
    void c.connect();
  }

  // Done when every device and server half has sent N (all ACKed) and received N.
  const done = () =>
    exchanges.length === 2 * CLIENTS &&
    ids.every((id) => atServer.peer(id).sent === N && atDevices.peer(id).sent === N) &&
    ids.every((id) => gotByServer.get(id)!.length >= N && gotByDevice.get(id)!.length >= N);
  let faultsDuringTraffic = 0;
  const describe = (tables: boolean) => {
    const f = proxy.injected;
    return (
      `${tag}; after ${Date.now() - started} ms: faults cut ${f.cut}, blackhole ${f.blackhole}, delay ${f.delay}, split ${f.split} ` +
      `(${manual} manual rounds, ${proxy.missed} missed); received ${received}/${total}` +
      (tables ? `\nat the server:\n${atServer.table('device')}\nat the devices:\n${atDevices.table('device')}` : '')
    );
  };
  while (!done()) {
    if (Date.now() - started > DEADLINE_MS) {
      t.fail(`not finished within ${DEADLINE_MS} ms\n${describe(true)}\nlast faults: ${JSON.stringify(proxy.recent.slice(-10))}`);
      return;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  faultsDuringTraffic = proxy.total;
  const elapsed = Date.now() - started;
  proxy.calm();
  const s = { ...atServer.totals() };
  const d = { ...atDevices.totals() };
  const clean = s.duplicates + s.missing + s.outOfOrder + d.duplicates + d.missing + d.outOfOrder === 0;
  t.log(describe(!clean));

  // Through the stats module.
  for (const [side, stats] of [
    ['server', atServer],
    ['devices', atDevices],
  ] as const) {
    const s = stats.totals();
    t.is(s.duplicates, 0, `duplicates at the ${side}; ${tag}`);
    t.is(s.missing, 0, `missing at the ${side}; ${tag}`);
    t.is(s.outOfOrder, 0, `out of order at the ${side}; ${tag}`);
    t.is(s.restarts, 0, `peer restarts seen by the ${side}; ${tag}`);
    t.is(s.invalid, 0, `unreadable lines at the ${side}; ${tag}`);
    t.is(s.received, CLIENTS * N, `messages received by the ${side}; ${tag}`);
  }
  // Directly: each device's stream, each way, is exactly 0..N-1.
  const expected = Array.from({ length: N }, (_, i) => i);
  for (const id of ids) {
    t.deepEqual(gotByServer.get(id), expected, `${id} → server, exactly once and in order; ${tag}`);
    t.deepEqual(gotByDevice.get(id), expected, `server → ${id}, exactly once and in order; ${tag}`);
  }
  t.true(faultsDuringTraffic >= MIN_FAULTS, `${faultsDuringTraffic} faults during the traffic, want ≥ ${MIN_FAULTS}; ${tag}`);
  for (const k of FAULT_KINDS) t.true(proxy.injected[k] > 0, `no ${k} fault was injected; ${tag}`);

  const conns = server.connections();
  const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
  t.log(
    `${faultsDuringTraffic} faults during ${elapsed} ms of traffic; ${2 * CLIENTS * N} messages; ` +
      `server outages ${sum(conns.map((c) => c.counters.outages))}, device connects ${sum(clients.map((c) => c.connects))}; ` +
      `retransmits ${sum(conns.map((c) => c.counters.retransmits)) + sum(clients.map((c) => c.counters.retransmits))}, ` +
      `repeats dropped by the protocol ${sum(conns.map((c) => c.counters.duplicatesDropped)) + sum(clients.map((c) => c.counters.duplicatesDropped))}`,
  );
});

test.serial('npm run qos (qos/run.ts): live tables, then a clean summary and exit code 0', async (t) => {
  const args = ['--duration', '4', '--clients', '3', '--seed', String(seed), '--every', '250', '--period', '20', '--timeout', '400', '--print-every', '1'];
  const r = await new Promise<{ code: number | null; out: string; err: string }>((resolve) =>
    execFile(
      process.execPath,
      ['-r', 'ts-node/register', 'qos/run.ts', ...args],
      { cwd: path.join(__dirname, '..'), timeout: 60_000, env: { ...process.env, TS_NODE_TRANSPILE_ONLY: 'true' } },
      (e, out, err) => resolve({ code: e ? ((e as { code?: number }).code ?? null) : 0, out, err }),
    ),
  );
  const tag = `TETHER_SEED=${seed}\n${r.out}\n${r.err}`;
  t.is(r.code, 0, tag);
  t.regex(r.out, /^qos: 3 devices ↔ server through a chaos proxy \(seed \d+/m, tag);
  t.regex(r.out, /^--- \d+\.\d s; faults: cut \d+, blackhole \d+, delay \d+, split \d+$/m, tag);
  for (const id of ['qos-1', 'qos-2', 'qos-3']) t.regex(r.out, new RegExp(`^${id}\\s+(up|down)\\s+\\d+`, 'm'), tag);
  const up = /^device → server: sent (\d+), received (\d+), duplicates 0, missing 0, out of order 0$/m.exec(r.out);
  const down = /^server → device: sent (\d+), received (\d+), duplicates 0, missing 0, out of order 0$/m.exec(r.out);
  t.truthy(up && down, tag);
  t.true(Number(up![1]) > 30 && up![1] === up![2], tag);
  t.true(Number(down![1]) > 30 && down![1] === down![2], tag);
  t.regex(r.out, /^faults injected: [1-9]\d* \(cut/m, tag);
  t.regex(r.out, /^OK: every message arrived exactly once$/m, tag);
});
