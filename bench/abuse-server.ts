/**
 * Abuse benchmark child: the server under attack. A tether Server with auth on
 * (`required: false`: the good IDs are listed with sha256 hashes and must present
 * their secret, unlisted IDs may connect with a plain ID) and an app that echoes
 * every received line back with qos. Reports over IPC, per phase: peak RSS and
 * heap (sampled every 100 ms), event-loop lag, CPU, the limit and handshake
 * counters, line-level counters summed over every Connection, log volume, and
 * every `attach` of a good ID from an address that is not a good client's
 * source address (a hijack that succeeded: must never happen).
 *
 * Protocol (parent → child): { cmd: 'start', timeout, devices, goodAddrs }
 * → { type: 'ready', port }; { cmd: 'phase', name } → { type: 'phased' };
 * { cmd: 'report', gc? } → { type: 'report', ... };
 * { cmd: 'count' } → { type: 'count', openConnections, pendingHandshakes }; { cmd: 'exit' }.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Connection, createLogger, LogRecord, Server } from '../src';
import type { Link } from '../src';
import { Fleet } from '../src/fleet';
import { HttpApi } from '../src/http';

interface Start {
  cmd: 'start';
  timeout: number;
  devices: Record<string, string>;
  goodAddrs: string[];
}

function send(m: object): void {
  process.send?.(m);
}

process.on('uncaughtException', (err) => {
  send({ type: 'crash', error: String(err?.stack ?? err) });
  process.exit(70);
});
process.on('unhandledRejection', (err) => {
  send({ type: 'crash', error: `unhandled rejection: ${String((err as Error)?.stack ?? err)}` });
  process.exit(70);
});
// The parent holds the only reason to live: if it dies, so does this process.
process.on('disconnect', () => process.exit(0));

const LAG_RESOLUTION_MS = 10;
const lag = monitorEventLoopDelay({ resolution: LAG_RESOLUTION_MS });
const excess = (ns: number) => Math.max(0, ns / 1e6 - LAG_RESOLUTION_MS);
lag.enable();

let server: Server | null = null;
let api: HttpApi | null = null;
let goodIds = new Set<string>();
let goodAddrs = new Set<string>();
const hijacks: Array<{ id: string; address: string; remote: string; at: number }> = [];
let goodAttaches = 0;
let otherAttaches = 0;

/** Log records by `level msg` in the current phase (the sink only counts them). */
let logCounts: Record<string, number> = {};
let logTotal = 0;

interface Peaks {
  rss: number;
  heapUsed: number;
  heapTotal: number;
  external: number;
  openConnections: number;
  pendingHandshakes: number;
  connections: number;
}
const zeroPeaks = (): Peaks => ({ rss: 0, heapUsed: 0, heapTotal: 0, external: 0, openConnections: 0, pendingHandshakes: 0, connections: 0 });
let peaks = zeroPeaks();
let phase = 'setup';
let phaseStart = Date.now();
let cpuStart = process.cpuUsage();

function sample(): void {
  const m = process.memoryUsage();
  peaks.rss = Math.max(peaks.rss, m.rss);
  peaks.heapUsed = Math.max(peaks.heapUsed, m.heapUsed);
  peaks.heapTotal = Math.max(peaks.heapTotal, m.heapTotal);
  peaks.external = Math.max(peaks.external, m.external + m.arrayBuffers);
  if (server) {
    peaks.openConnections = Math.max(peaks.openConnections, server.openConnections);
    peaks.pendingHandshakes = Math.max(peaks.pendingHandshakes, server.pendingHandshakes);
    peaks.connections = Math.max(peaks.connections, server.connections().length);
  }
}
setInterval(sample, 100).unref();

async function start(m: Start): Promise<void> {
  goodIds = new Set(Object.keys(m.devices));
  goodAddrs = new Set(m.goodAddrs);
  const logger = createLogger({
    level: 'info',
    sink: (r: LogRecord) => {
      logTotal++;
      const k = `${r.level} ${r.msg}`;
      logCounts[k] = (logCounts[k] ?? 0) + 1;
    },
  });
  server = await Server.listen({
    host: '127.0.0.1',
    port: 0,
    timeout: m.timeout,
    logger,
    // Every other limit stays at its default: idTimeout = timeout, maxIdLength 1024,
    // maxLineLength 65536, maxConnections 10000, maxConnectionsPerAddress 256, maxSendBuffer 1 MiB,
    // auth.maxFailures 5 in auth.failureWindow 60 s, auth.blockFor 60 s.
    auth: { devices: m.devices, required: false },
  });
  server.on('attach', (conn: Connection, link: Link) => {
    if (!goodIds.has(conn.id)) {
      otherAttaches++;
      return;
    }
    const address = link.address ?? link.remote;
    if (goodAddrs.has(address)) {
      goodAttaches++;
      return;
    }
    hijacks.push({ id: conn.id, address, remote: link.remote, at: Date.now() });
  });
  // The app: echo every line back with qos, as bench/server.ts does.
  server.on('connection', (conn: Connection) => {
    // Made-up IDs of the idcycle attack: nobody reads them (their lines wait within the buffer bounds).
    if (conn.id.startsWith('cycle-')) return;
    if (conn.id.startsWith('stream-')) {
      // The qos-false streaming attack: the app writes as fast as the device lets it.
      const pad = 's'.repeat(200);
      void (async () => {
        for (let n = 0; !conn.isClosed; n++) await conn.write(`${n} ${pad}`, { qos: false });
      })().catch(() => {});
      return;
    }
    void (async () => {
      for await (const line of conn) {
        const p = conn.write(line);
        p.catch(() => {});
        if (conn.queuedWrites >= 32) await p.catch(() => {});
      }
    })().catch(() => {});
  });
  // The HTTP API with every HTTP limit at its default: the wsflood and httpslow kinds attack it.
  api = new HttpApi({ server, fleet: new Fleet(server), host: '127.0.0.1', port: 0, logger });
  await api.listen();
  send({ type: 'ready', port: server.port, httpPort: api.port });
}

function lineCounters(): Record<string, number> {
  const sum = { longLines: 0, badLines: 0, shed: 0, messagesIn: 0, outages: 0, duplicatesDropped: 0, retransmits: 0 };
  for (const c of server?.connections() ?? []) {
    sum.longLines += c.counters.longLines;
    sum.badLines += c.counters.badLines;
    sum.shed += c.counters.shed;
    sum.messagesIn += c.counters.messagesIn;
    sum.duplicatesDropped += c.counters.duplicatesDropped;
    sum.retransmits += c.counters.retransmits;
    if (goodIds.has(c.id)) sum.outages += c.counters.outages;
  }
  return sum;
}

/**
 * The phase's figures. `gc`: also collect garbage first and report what is left
 * (the retained heap, for leaks). Only at the very end: a forced full GC leaves
 * V8's heap limits where every later burst of garbage brings back-to-back
 * incremental mark-compacts (a 20× p99 under attack in this benchmark, all of
 * it the harness's doing), so the phases themselves run without one.
 */
function report(gc: boolean): object {
  sample();
  const cpu = process.cpuUsage(cpuStart);
  const wall = Date.now() - phaseStart;
  const before = process.memoryUsage();
  if (gc && typeof global.gc === 'function') global.gc();
  const after = gc ? process.memoryUsage() : null;
  const conns = server?.connections() ?? [];
  return {
    type: 'report',
    phase,
    wallMs: wall,
    cpuPct: ((cpu.user + cpu.system) / 1000 / Math.max(1, wall)) * 100,
    // The histogram records the time between its 10 ms timer's turns: the lag is what exceeds 10 ms.
    lag: {
      p50: excess(lag.percentile(50)),
      p99: excess(lag.percentile(99)),
      max: excess(lag.max),
      mean: excess(lag.mean),
    },
    peaks,
    memNow: { rss: before.rss, heapUsed: before.heapUsed },
    afterGc: after ? { rss: after.rss, heapUsed: after.heapUsed, external: after.external + after.arrayBuffers } : null,
    limits: { ...server!.limits },
    handshakes: { ...server!.handshakes },
    lines: lineCounters(),
    connections: conns.length,
    goodConnectionsUp: conns.filter((c) => goodIds.has(c.id) && c.isUp).length,
    openConnections: server!.openConnections,
    pendingHandshakes: server!.pendingHandshakes,
    blockedAddresses: server!.blockedAddresses,
    hijacks: [...hijacks],
    goodAttaches,
    otherAttaches,
    logTotal,
    logCounts: { ...logCounts },
  };
}

process.on('message', (m: { cmd: string } & Record<string, unknown>) => {
  if (m.cmd === 'start') {
    start(m as unknown as Start).catch((e) => {
      send({ type: 'crash', error: String((e as Error)?.stack ?? e) });
      process.exit(70);
    });
  } else if (m.cmd === 'phase') {
    phase = String(m.name);
    peaks = zeroPeaks();
    logCounts = {};
    logTotal = 0;
    lag.reset();
    phaseStart = Date.now();
    cpuStart = process.cpuUsage();
    sample();
    send({ type: 'phased', phase });
  } else if (m.cmd === 'count') {
    send({ type: 'count', openConnections: server?.openConnections ?? 0, pendingHandshakes: server?.pendingHandshakes ?? 0 });
  } else if (m.cmd === 'report') {
    send(report(m.gc === true));
  } else if (m.cmd === 'exit') {
    void (api?.close() ?? Promise.resolve())
      .then(() => server?.close())
      .finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 3000).unref();
  }
});
send({ type: 'hello' });
