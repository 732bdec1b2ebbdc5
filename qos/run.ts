/**
 * `npm run qos`: the qos demo in one process. A server, N Node devices talking to it
 * through a ChaosProxy that injects faults on a seeded schedule, both sides sending
 * numbered qos messages (qos/qos.ts) for a set time; live statistics, then a summary.
 * Exit code 1 if any message was duplicated, lost or unreadable.
 *
 *   npm run qos -- --duration 20 --clients 8 --seed 7
 */
import { parseArgs } from 'node:util';
import { ChaosProxy, FAULT_KINDS, FaultKind } from '../src/chaos';
import { Client } from '../src/client';
import { createLogger, silentLogger } from '../src/log';
import { Server } from '../src/server';
import { sleep } from '../src/util';
import { Exchange, startExchange } from './qos';
import { QosStats, renderTable } from './stats';

export const USAGE = `usage: npm run qos -- [options]

  --clients N       Node devices (default 4)
  --duration S      seconds of traffic (default 60)
  --seed N          seed of the fault schedule (default 1)
  --every MS        mean ms between faults (default 2000; 0 = none)
  --kinds LIST      fault kinds, from cut,blackhole,delay,split (default all)
  --period MS       pause between messages on each side of each link (default 100)
  --timeout MS      protocol timeout of both ends (default 1000)
  --print-every S   live table every S seconds (default 5; 0 = only at the end)
  --log-level L     server and proxy log (default silent; info shows every fault and outage)
`;

export interface QosRunOptions {
  clients: number;
  durationMs: number;
  seed: number;
  every: number;
  kinds: FaultKind[];
  periodMs: number;
  timeout: number;
  printEveryMs: number;
  logLevel: 'debug' | 'info' | 'warn' | 'error' | 'silent';
  out?: (s: string) => void;
}

export interface QosResult {
  ok: boolean;
  faults: Record<FaultKind, number>;
  up: { sent: number; received: number; duplicates: number; missing: number; outOfOrder: number; invalid: number };
  down: QosResult['up'];
}

function num(v: string | undefined, name: string, dflt: number, ok: (n: number) => boolean): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n) || !ok(n)) throw new Error(`--${name}: bad value ${JSON.stringify(v)}`);
  return n;
}

/** The options, or null for --help. */
export function parseQosArgs(argv: string[]): QosRunOptions | null {
  const { values: v } = parseArgs({
    args: argv,
    options: {
      clients: { type: 'string' },
      duration: { type: 'string' },
      seed: { type: 'string' },
      every: { type: 'string' },
      kinds: { type: 'string' },
      period: { type: 'string' },
      timeout: { type: 'string' },
      'print-every': { type: 'string' },
      'log-level': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (v.help) return null;
  const kinds = (v.kinds ?? FAULT_KINDS.join(',')).split(',').filter(Boolean) as FaultKind[];
  const bad = kinds.filter((k) => !FAULT_KINDS.includes(k));
  if (kinds.length === 0 || bad.length > 0) throw new Error(`--kinds: unknown kind ${bad.join(',') || '(none)'}; choose from ${FAULT_KINDS.join(',')}`);
  const level = v['log-level'] ?? 'silent';
  if (!['debug', 'info', 'warn', 'error', 'silent'].includes(level)) throw new Error(`--log-level: bad value ${JSON.stringify(level)}`);
  return {
    clients: num(v.clients, 'clients', 4, (n) => Number.isInteger(n) && n >= 1 && n <= 1000),
    durationMs: num(v.duration, 'duration', 60, (n) => n > 0) * 1000,
    seed: num(v.seed, 'seed', 1, (n) => Number.isInteger(n) && n >= 0),
    every: num(v.every, 'every', 2000, (n) => n >= 0),
    kinds,
    periodMs: num(v.period, 'period', 100, (n) => n >= 0),
    timeout: num(v.timeout, 'timeout', 1000, (n) => Number.isInteger(n) && n >= 40),
    printEveryMs: num(v['print-every'], 'print-every', 5, (n) => n >= 0) * 1000,
    logLevel: level as QosRunOptions['logLevel'],
  };
}

/** Runs the demo; resolves with the summary when it is over and everything is closed. */
export async function runQos(o: QosRunOptions): Promise<QosResult> {
  const out = o.out ?? ((s: string) => process.stdout.write(s + '\n'));
  const log = o.logLevel === 'silent' ? silentLogger : createLogger({ level: o.logLevel, format: 'pretty', stream: process.stdout });
  const atServer = new QosStats();
  const atDevices = new QosStats();
  const stop = new AbortController();
  const server = await Server.listen({ host: '127.0.0.1', port: 0, timeout: o.timeout, logger: log.child({ side: 'server' }) });
  const proxy = await ChaosProxy.start({
    targetPort: server.port,
    seed: o.seed,
    every: o.every,
    kinds: o.kinds,
    blackholeMs: 2 * o.timeout,
    delayMs: Math.max(1, Math.floor(o.timeout / 4)),
    delayForMs: 2 * o.timeout,
    splitMs: 2 * o.timeout,
    logger: log.child({ side: 'chaos' }),
  });
  const exchanges: Exchange[] = [];
  server.on('connection', (conn) =>
    exchanges.push(startExchange(conn, { peer: conn.id, stats: atServer, periodMs: o.periodMs, stop: stop.signal })),
  );
  const ids = Array.from({ length: o.clients }, (_, i) => `qos-${i + 1}`);
  const clients = ids.map((id) => new Client({ id, port: proxy.port, timeout: o.timeout, logger: log }));
  const started = Date.now();
  out(
    `qos: ${o.clients} devices ↔ server through a chaos proxy (seed ${o.seed}, a fault every ~${o.every} ms: ${o.kinds.join(', ')}), ` +
      `a message every ${o.periodMs} ms each way, timeout ${o.timeout} ms, for ${o.durationMs / 1000} s`,
  );
  for (const c of clients) exchanges.push(startExchange(c, { peer: c.id, stats: atDevices, periodMs: o.periodMs, stop: stop.signal }));
  for (const c of clients) void c.connect();

  const table = () => {
    const rows = ids.map((id, i) => {
      const up = atServer.peer(id);
      const down = atDevices.peer(id);
      const c = clients[i];
      return [id, c.state, c.connects, down.sent, up.received, up.duplicates, up.missing, up.outOfOrder, up.sent, down.received, down.duplicates, down.missing, down.outOfOrder];
    });
    const f = proxy.injected;
    return (
      `--- ${((Date.now() - started) / 1000).toFixed(1)} s; faults: cut ${f.cut}, blackhole ${f.blackhole}, delay ${f.delay}, split ${f.split}\n` +
      renderTable(
        ['device', 'link', 'connects', 'd→s sent', 'rcvd', 'dupes', 'missing', 'ooo', 's→d sent', 'rcvd', 'dupes', 'missing', 'ooo'],
        rows,
      )
    );
  };
  const ticker = o.printEveryMs > 0 ? setInterval(() => out(table()), o.printEveryMs) : undefined;
  // Ctrl-C ends the traffic early; the summary still comes.
  let onInt!: () => void;
  const interrupted = new Promise<void>((r) => process.once('SIGINT', (onInt = r)));
  await Promise.race([sleep(o.durationMs), interrupted]);
  process.off('SIGINT', onInt);

  // Stop the faults and the senders, then let what is in flight arrive (bounded).
  stop.abort();
  proxy.calm();
  clearInterval(ticker);
  const drainMs = 20 * o.timeout;
  const deadline = Date.now() + drainMs;
  const sends = Promise.all(exchanges.map((x) => x.writing));
  await Promise.race([sends, sleep(drainMs)]);
  const caughtUp = () =>
    ids.every((id) => atServer.peer(id).last + 1 >= atDevices.peer(id).sent && atDevices.peer(id).last + 1 >= atServer.peer(id).sent);
  while (!caughtUp() && Date.now() < deadline) await sleep(50);
  const drained = caughtUp();
  out(table());

  // Sent but never received, past the last number received (not a gap the receiver can see).
  const direction = (sender: QosStats, receiver: QosStats) => {
    const d = { sent: 0, received: 0, duplicates: 0, missing: 0, outOfOrder: 0, invalid: 0 };
    for (const id of ids) {
      const s = sender.peer(id);
      const r = receiver.peer(id);
      d.sent += s.sent;
      d.received += r.received;
      d.duplicates += r.duplicates;
      d.missing += r.missing + (r.restarts === 0 ? Math.max(0, s.sent - (r.last + 1)) : 0);
      d.outOfOrder += r.outOfOrder;
      d.invalid += r.invalid;
    }
    return d;
  };
  const up = direction(atDevices, atServer);
  const down = direction(atServer, atDevices);
  const outages = server.connections().reduce((n, c) => n + c.counters.outages, 0);
  const retransmits = server.connections().reduce((n, c) => n + c.counters.retransmits, 0) + clients.reduce((n, c) => n + c.counters.retransmits, 0);
  const dropped = server.connections().reduce((n, c) => n + c.counters.duplicatesDropped, 0) + clients.reduce((n, c) => n + c.counters.duplicatesDropped, 0);

  for (const c of clients) c.close();
  await proxy.close();
  await server.close();
  await Promise.allSettled(exchanges.map((x) => x.reading));

  const f = proxy.injected;
  const ok = up.duplicates + up.missing + up.invalid + down.duplicates + down.missing + down.invalid === 0;
  const line = (name: string, d: typeof up) =>
    `${name}: sent ${d.sent}, received ${d.received}, duplicates ${d.duplicates}, missing ${d.missing}, out of order ${d.outOfOrder}` +
    (d.invalid ? `, unreadable ${d.invalid}` : '');
  out(
    [
      '',
      `summary after ${((Date.now() - started) / 1000).toFixed(1)} s (seed ${o.seed})`,
      `faults injected: ${proxy.total} (cut ${f.cut}, blackhole ${f.blackhole}, delay ${f.delay}, split ${f.split}); ` +
        `${proxy.missed} found no live link`,
      line('device → server', up),
      line('server → device', down),
      `links: ${outages} outages seen by the server, ${retransmits} retransmissions, ${dropped} repeats dropped by the protocol`,
      drained ? '' : `warning: not everything in flight arrived within ${drainMs} ms after the end; the rest counts as missing`,
      ok ? 'OK: every message arrived exactly once' : 'FAILED: messages were duplicated or lost (exit code 1)',
    ]
      .filter(Boolean)
      .join('\n'),
  );
  return { ok, faults: { ...f }, up, down };
}

if (require.main === module) {
  let opts: QosRunOptions | null;
  try {
    opts = parseQosArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`qos: ${(e as Error).message}\n\n${USAGE}`);
    process.exit(2);
  }
  if (!opts) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  runQos(opts).then(
    (r) => process.exit(r.ok ? 0 : 1),
    (e) => {
      process.stderr.write(`qos: ${(e as Error).stack ?? e}\n`);
      process.exit(1);
    },
  );
}
